"""What a new user meets first: start-up failures, dev tokens from anywhere, plain HTTP on /ws."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import websockets

from conftest import data_home, recv, start_server, stop

pytestmark = pytest.mark.slow


def serve(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``wsgate serve ARGS`` expected to fail at start-up."""
    return subprocess.run(
        [sys.executable, "-m", "wsgate", "serve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **data_home(cwd), **(env or {})},
    )


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_busy_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with busy_port() as sock:
        port = sock.getsockname()[1]
        line = one_line(serve(tmp_path, "--port", str(port)))
    assert (
        line == f"wsgate: server.host, server.port: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_a_busy_admin_port_is_one_line(tmp_path: Path) -> None:
    with busy_port() as sock:
        port = sock.getsockname()[1]
        line = one_line(
            serve(tmp_path, "--port", "0", "--admin-port", str(port), env={"WSGATE_ADMIN__API_KEY": "k" * 20})
        )
    assert line.startswith(f"wsgate: admin.host, admin.port: cannot listen on 127.0.0.1:{port}")


def test_an_address_not_of_this_machine_is_one_line(tmp_path: Path) -> None:
    line = one_line(serve(tmp_path, "--host", "192.0.2.1", "--port", "0"))
    assert (
        line
        == "wsgate: server.host, server.port: cannot listen on 192.0.2.1:0: cannot assign requested address"
    )


def test_a_missing_key_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text(
        '[[auth.keys]]\nkind = "public"\npem_file = "/no/such/key.pem"\nalgorithms = ["RS256"]\n'
    )
    line = one_line(serve(tmp_path, "--config", str(config), "--port", "0"))
    assert line == "wsgate: config: auth.keys[0]: [Errno 2] No such file or directory: '/no/such/key.pem'"


def test_unreachable_signing_keys_under_strict_in_production_are_one_line(tmp_path: Path) -> None:
    with busy_port() as sock:  # listening, never answering: the fetch times out
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks"
        env = {
            "WSGATE_ENVIRONMENT": "production",
            "WSGATE_AUTH__POLICY": "strict",
            "WSGATE_AUTH__CALL_TIMEOUT": "0.2",
            "WSGATE_AUTH__DEADLINE": "0.3",
        }
        line = one_line(serve(tmp_path, "--port", "0", "--jwks-url", url, env=env))
    assert line == (
        "wsgate: auth.jwks_url: the signing keys could not be fetched (no answer within"
        " auth.call_timeout, 0.2 s);"
        " refused to start (strict, in production)"
    )


def test_wsgate_token_from_another_directory_is_accepted_by_the_running_dev_server(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "elsewhere").mkdir()
    server = start_server(tmp_path / "server")
    try:
        token = server.token("--sub", "alice", cwd=tmp_path / "elsewhere")
        claims = jwt.decode(token, options={"verify_signature": False})
        assert len(claims["jti"]) == 16  # a dev token can be revoked by its jti

        async def ready() -> dict[str, object]:
            async with websockets.connect(
                server.url, additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                return await recv(ws)

        assert asyncio.run(ready())["subject"] == "alice"
    finally:
        stop(server)


def test_wsgate_token_says_so_loudly_when_it_had_to_make_a_new_key(tmp_path: Path) -> None:
    def token() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wsgate", "token", "--sub", "alice", "--jti", "mine"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **data_home(tmp_path)},
        )

    first = token()
    assert first.returncode == 0
    assert "made a new one" in first.stderr and "restart it" in first.stderr
    assert jwt.decode(first.stdout.strip(), options={"verify_signature": False})["jti"] == "mine"
    assert token().stderr == ""  # the key is there now: nothing to warn about


def test_a_negative_ttl_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "token", "--sub", "a", "--ttl", "-60"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **data_home(tmp_path)},
    )
    assert result.returncode == 2 and "must be more than 0 seconds" in result.stderr


def test_plain_http_on_the_websocket_path_says_what_it_is_and_is_logged(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        response = httpx.get(server.url.replace("ws://", "http://"), timeout=10)
        assert response.status_code == 400 and response.reason_phrase == "Bad Request"
        assert response.text.startswith("this is a WebSocket endpoint: connect with a WebSocket client")
        refused = httpx.get(
            server.url.replace("ws://", "http://"),
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            timeout=10,
        )
        assert (refused.status_code, refused.reason_phrase) == (401, "Unauthorized")
    finally:
        logs = stop(server)
    assert "handshake refused: not a WebSocket upgrade" in logs


def test_a_dropped_connection_is_logged_as_1006_not_as_a_close(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    token = server.token("--sub", "alice")
    try:

        async def drop() -> None:
            async with websockets.connect(
                server.url, additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                await recv(ws)
                ws.transport.abort()  # TCP gone, no close frame

        asyncio.run(drop())
    finally:  # stop() waits for the server to exit: by then it has logged the close
        logs = stop(server)
    closed = [line for line in logs.splitlines() if "session closed" in line]
    assert (
        len(closed) == 1 and "code=1006" in closed[0] and "connection dropped (no close frame)" in closed[0]
    )
    assert "client closed" not in closed[0]


def test_the_dev_banner_recommends_what_installs_and_names_the_demo_page(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsgate", "serve", "--port", "0", "--admin-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **data_home(tmp_path), "WSGATE_ADMIN__API_KEY": "banner-test-admin-key"},
    )
    assert proc.stdout is not None
    banner = [proc.stdout.readline() for _ in range(12)]
    proc.terminate()
    proc.communicate(timeout=30)
    text = "".join(banner)
    assert str(tmp_path / "data" / "wsgate" / "dev.key") in text
    assert "npx wscat -c ws://127.0.0.1:" in text and "websocat" not in text
    assert "(demo page: http://127.0.0.1:" in text and "/demo)" in text
