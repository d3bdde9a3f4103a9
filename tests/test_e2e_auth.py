"""End to end with a real loopback introspection server (``python -m wsgate.testing.fakeauth``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets

from conftest import Server, start_fake_auth, start_server, stop

SECRET = "an-hs256-secret-for-the-e2e-tests-only"


class Fake:
    def __init__(self, url: str) -> None:
        self.url = url

    def control(self, **change: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/_control", json=change, timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    @property
    def calls(self) -> int:
        return int(self.control()["calls"])


@pytest.fixture
def fake() -> Iterator[Fake]:
    proc, url = start_fake_auth()
    yield Fake(url)
    proc.terminate()
    proc.wait(10)


def token(sub: str, **claims: Any) -> str:
    payload = {"sub": sub, "iss": "e2e", "aud": "wsgate", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def gateway(tmp_path: Path, fake: Fake, policy: str) -> Server:
    env = {
        "WSGATE_AUTH__HMAC_SECRET": SECRET,
        "WSGATE_AUTH__ISSUER": "e2e",
        "WSGATE_AUTH__AUDIENCE": "wsgate",
        "WSGATE_AUTH__CLIENT_AUTH": "none",
        "WSGATE_AUTH__CALL_TIMEOUT": "0.3",
        "WSGATE_AUTH__DEADLINE": "1.0",
        "WSGATE_BREAKER__OPEN_WAIT": "2",
        "WSGATE_BREAKER__MIN_CALLS": "4",
        "WSGATE_BREAKER__WINDOW": "4",
    }
    return start_server(
        tmp_path, "--policy", policy, "--introspection-url", f"{fake.url}/introspect", env=env
    )


async def outcome(url: str, tok: str) -> tuple[int, dict[str, Any] | dict[str, str]]:
    """(101, session.ready) or (status, response headers)."""
    try:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
            return 101, json.loads(await ws.recv())
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, {k.lower(): v for k, v in exc.response.headers.raw_items()}


def test_strict_with_a_real_introspection_server(tmp_path: Path, fake: Fake) -> None:
    server = gateway(tmp_path, fake, "strict")
    try:
        status, ready = asyncio.run(outcome(server.url, token("alice")))
        assert status == 101 and ready["degraded"] is False
        inactive = token("alice", jti="inactive")
        fake.control(inactive_tokens=[inactive])
        assert asyncio.run(outcome(server.url, inactive))[0] == 401
        fake.control(mode="down")
        start = time.monotonic()
        status, headers = asyncio.run(outcome(server.url, token("bob")))
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        assert time.monotonic() - start < 3  # auth.deadline (1 s) plus process overheads
        # A few more failures open the breaker; then handshakes make no call until the wait passed.
        for i in range(4):
            asyncio.run(outcome(server.url, token(f"u{i}")))
        calls = fake.calls
        for i in range(10):
            assert asyncio.run(outcome(server.url, token(f"v{i}")))[0] == 503
        assert fake.calls == calls
        # What follows open_wait (one probe, then admitted once the service is back) is a
        # matter of time: test_breaker_trips_rejects_without_calling_probes_and_closes drives
        # it with MockClock instead of waiting out the real wait here.
    finally:
        stop(server)


def test_tolerant_admits_degraded_then_closes_4403_when_revoked(tmp_path: Path, fake: Fake) -> None:
    server = gateway(tmp_path, fake, "tolerant")
    try:
        fake.control(mode="down")
        revoked = token("dave")

        async def scenario() -> tuple[dict[str, Any], int | None, float]:
            async with websockets.connect(
                server.url, additional_headers={"Authorization": f"Bearer {revoked}"}
            ) as ws:
                ready = json.loads(await ws.recv())
                fake.control(mode="up", inactive_tokens=[revoked])
                back = time.monotonic()
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                return ready, closed.value.rcvd.code if closed.value.rcvd else None, time.monotonic() - back

        ready, code, took = asyncio.run(scenario())
        assert ready["degraded"] is True
        assert code == 4403
        assert took < 4  # within breaker.open_wait (2 s) plus overheads
    finally:
        stop(server)
