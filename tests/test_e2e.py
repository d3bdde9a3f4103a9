"""End to end: ``wsgate serve`` as a subprocess, the ``websockets`` client over loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets

from conftest import Server, start_server, stop
from wsgate.auth.tokens import mint_token

AGENT_EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("dev"))
    yield server
    stop(server)


async def golden_path(url: str, **connect: Any) -> tuple[str | None, dict[str, Any], list[dict[str, Any]]]:
    async with websockets.connect(url, open_timeout=10, **connect) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.send(json.dumps({"type": "user_message", "text": "hi"}))
        events = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(5)]
        return ws.subprotocol, ready, events


def test_dev_mode_banner_key_file_and_golden_path_with_bearer_header(dev_server: Server) -> None:
    key_file = dev_server.dev_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    token = dev_server.token("--sub", "alice")
    protocol, ready, events = asyncio.run(
        golden_path(dev_server.url, additional_headers={"Authorization": f"Bearer {token}"})
    )
    assert protocol is None
    assert ready["type"] == "session.ready" and ready["subject"] == "alice"
    assert [e["type"] for e in events] == AGENT_EVENTS
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)) and "seq" not in ready


def test_golden_path_with_subprotocol_token(dev_server: Server) -> None:
    token = dev_server.token("--sub", "bob", "--ttl", "60")
    protocol, ready, events = asyncio.run(
        golden_path(dev_server.url, subprotocols=["wsgate.v1", f"bearer.{token}"])
    )
    assert protocol == "wsgate.v1"
    assert ready["subject"] == "bob"
    assert [e["type"] for e in events] == AGENT_EVENTS


async def rejected(url: str, **connect: Any) -> tuple[int, dict[str, str], bytes]:
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(url, open_timeout=10, **connect):
            pass  # pragma: no cover
    response = caught.value.response
    headers = {k.lower(): v for k, v in response.headers.raw_items()}
    return response.status_code, headers, bytes(response.body or b"")


@pytest.mark.parametrize("case", ["missing", "other_key", "expired", "garbage"])
def test_bad_tokens_get_401(dev_server: Server, case: str) -> None:
    tokens: dict[str, Callable[[], str]] = {
        "missing": lambda: "",
        "other_key": lambda: jwt.encode(
            {"sub": "alice", "exp": int(time.time()) + 60, "iss": "wsgate-dev", "aud": "wsgate"},
            b"another-key-entirely-0123456789abcdef",
            algorithm="HS256",
        ),
        "expired": lambda: mint_token(
            dev_server.dev_key.read_bytes().strip(),
            "alice",
            now=time.time() - 120,
            ttl=60,
            issuer="wsgate-dev",
            audience="wsgate",
        ),
        "garbage": lambda: "not.a.token",
    }
    token = tokens[case]()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, response_headers, body = asyncio.run(rejected(dev_server.url, additional_headers=headers))
    assert status == 401
    assert response_headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert body.strip() in {b"token missing", b"bad signature", b"token expired", b"malformed token"}


def test_a_configured_server_is_not_in_dev_mode(tmp_path: Path) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text(
        '[auth]\nhmac_secret = "a-configured-secret-of-at-least-32-bytes"\nissuer = "me"\naudience = "you"\n'
    )
    server = start_server(
        tmp_path, "--config", str(config), env={"WSGATE_AGENT__APP": "echo"}
    )  # the raw echo app
    try:
        token = jwt.encode(
            {"sub": "carol", "exp": int(time.time()) + 60, "iss": "me", "aud": "you"},
            b"a-configured-secret-of-at-least-32-bytes",
            algorithm="HS256",
        )

        async def echo() -> tuple[Any, Any]:
            headers = {"Authorization": f"Bearer {token}"}
            async with websockets.connect(server.url, additional_headers=headers) as ws:
                await ws.send("any text at all")
                text = await ws.recv()
                await ws.send(b"\x00\x01binary")
                return text, await ws.recv()

        assert asyncio.run(echo()) == ("any text at all", b"\x00\x01binary")
        assert not (tmp_path / ".wsgate").exists()
    finally:
        err = stop(server)
    assert "DEV MODE" not in err
    assert token not in err


def test_bad_configuration_is_refused_naming_the_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "serve", "--port", "70000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "server.port: must be between 0 and 65535" in result.stderr
