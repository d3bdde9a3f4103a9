"""Operating it: health, readiness, metrics, logs without tokens, check-config."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import websockets

from conftest import start_server, stop
from wsgate.auth.tokens import mint_token


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_metrics_and_logs_without_tokens(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        "--admin-port",
        "0",
        "--log-format",
        "json",
        env={"WSGATE_ADMIN__API_KEY": "operate-test-api-key"},
    )
    secret = server.dev_key.read_bytes().strip()
    good = mint_token(secret, "alice", now=time.time(), ttl=60, issuer="wsgate-dev", audience="wsgate")
    bad = mint_token(b"x" * 40, "alice", now=time.time(), ttl=60, issuer="wsgate-dev", audience="wsgate")
    try:
        assert server.admin is not None
        assert httpx.get(f"{server.admin}/healthz").status_code == 200
        ready = httpx.get(f"{server.admin}/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        before = httpx.get(f"{server.admin}/metrics").text

        async def connections() -> None:
            headers = {"Authorization": f"Bearer {good}"}
            async with websockets.connect(server.url, additional_headers=headers) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "user_message", "text": "count me"}))
                for _ in range(5):
                    await ws.recv()
            try:
                async with websockets.connect(
                    server.url, additional_headers={"Authorization": f"Bearer {bad}"}
                ):
                    pass
            except websockets.InvalidStatus:
                pass
            async with websockets.connect(server.url, subprotocols=["wsgate.v1", f"bearer.{good}"]) as ws:  # type: ignore[list-item]
                await ws.recv()

        asyncio.run(connections())
        after = httpx.get(f"{server.admin}/metrics").text
        assert (
            metric(after, "wsgate_handshakes_total", outcome="admitted")
            == metric(before, "wsgate_handshakes_total", outcome="admitted") + 2
        )
        assert metric(after, "wsgate_handshakes_total", outcome="401") == 1
        assert metric(after, "wsgate_agent_runs_total", status="ok") == 1
        assert metric(after, "wsgate_close_codes_total", code="1000") >= 1
        assert metric(after, "wsgate_handshake_seconds_count") >= 3
        assert "wsgate_breaker_state 0.0" in after
    finally:
        err = stop(server)
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = {r.get("event") for r in records}
    assert {"session.opened", "session.closed", "handshake.refused"} <= events
    assert all("session" in r for r in records if r.get("event") == "session.opened")
    for secret_text in (good, bad, good.split(".")[1], good.split(".")[2]):
        assert secret_text not in err


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsgate", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_prints_masked_settings_and_names_bad_ones(tmp_path: Path) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text('[auth]\nhmac_secret = "a-secret-that-must-never-be-printed-ok"\n')
    ok = check_config(config)
    assert ok.returncode == 0
    assert '# hmac_secret = "***"  (set; masked)' in ok.stdout
    assert "a-secret-that-must-never-be-printed-ok" not in ok.stdout
    config.write_text('[server]\nport = "eighty"\nhandshake_timeout = -1\n[auth]\nleeway = 9000\n')
    bad = check_config(config)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert any("server.port" in line for line in lines)
    assert any("server.handshake_timeout" in line for line in lines)
    assert any("auth.leeway" in line for line in lines)
    assert len(lines) == 3
