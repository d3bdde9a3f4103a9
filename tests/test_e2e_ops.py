"""Isolation, limits, slow consumers and drain over real sockets (``wsgate serve`` subprocess)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from conftest import Server, recv, start_server, stop
from wsgate.auth.tokens import mint_token

API_KEY = "an-admin-api-key-for-tests"


class Gateway:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.secret = server.dev_key.read_bytes().strip()

    def headers(self, sub: str) -> dict[str, str]:
        token = mint_token(self.secret, sub, now=time.time(), ttl=300, issuer="wsgate-dev", audience="wsgate")
        return {"Authorization": f"Bearer {token}"}

    def publish(self, subject: str, event: dict[str, Any], key: str = API_KEY) -> httpx.Response:
        return httpx.post(
            f"{self.server.admin}/publish",
            json={"subject": subject, "event": event},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = start_server(
        tmp_path_factory.mktemp("ops"),
        "--admin-port",
        "0",
        env={
            "WSGATE_ADMIN__API_KEY": API_KEY,
            "WSGATE_SERVER__SLOW_CONSUMER_TIMEOUT": "1",
            "WSGATE_SERVER__SEND_QUEUE_BYTES": "65536",
        },
    )
    assert server.admin is not None
    yield Gateway(server)
    stop(server)


def test_admin_push_reaches_only_its_user(gateway: Gateway) -> None:
    async def scenario() -> None:
        url = gateway.server.url
        async with (
            websockets.connect(url, additional_headers=gateway.headers("alice")) as a1,
            websockets.connect(url, additional_headers=gateway.headers("alice")) as a2,
            websockets.connect(url, additional_headers=gateway.headers("bob")) as bob,
        ):
            for ws in (a1, a2, bob):
                await recv(ws)
            response = await asyncio.to_thread(gateway.publish, "alice", {"note": "for alice"})
            assert response.json() == {"delivered": 2, "connections": 2}
            for ws in (a1, a2):
                assert (await recv(ws))["event"] == {"note": "for alice"}
            await bob.send(json.dumps({"type": "ping", "id": "p"}))
            assert (await recv(bob))["type"] == "pong"  # the next thing bob sees: no alice event
            refused = await asyncio.to_thread(gateway.publish, "alice", {}, "wrong-key-wrong-key")
            assert refused.status_code == 401

    asyncio.run(scenario())
    health = httpx.get(f"{gateway.server.admin}/healthz", timeout=5)
    ready = httpx.get(f"{gateway.server.admin}/readyz", timeout=5)
    assert (health.status_code, ready.status_code) == (200, 200)


def test_the_eleventh_connection_of_a_user_gets_429(gateway: Gateway) -> None:
    async def scenario() -> tuple[int, str | None]:
        url = gateway.server.url
        held = []
        try:
            for _ in range(10):
                ws = await websockets.connect(url, additional_headers=gateway.headers("carol"))
                await recv(ws)
                held.append(ws)
            with pytest.raises(websockets.InvalidStatus) as caught:
                await websockets.connect(url, additional_headers=gateway.headers("carol"))
            return caught.value.response.status_code, caught.value.response.headers.get("Retry-After")
        finally:
            for ws in held:
                await ws.close()

    status, retry_after = asyncio.run(scenario())
    assert status == 429 and retry_after is not None


def test_a_client_that_stops_reading_is_closed_while_others_are_served(gateway: Gateway) -> None:
    big = {"blob": "x" * 50_000}

    async def scenario() -> None:
        url = gateway.server.url
        async with (
            # No compression: its 50 KB of "x" would be a few bytes each on the wire.
            websockets.connect(
                url, additional_headers=gateway.headers("slow"), max_queue=1, compression=None
            ) as slow,
            websockets.connect(url, additional_headers=gateway.headers("fast")) as fast,
        ):
            await recv(slow)
            await recv(fast)
            connections = 1
            for n in range(400):  # ~20 MB towards a client that reads nothing
                result = (await asyncio.to_thread(gateway.publish, "slow", big)).json()
                connections = result["connections"]
                await asyncio.to_thread(gateway.publish, "fast", {"n": n})
                assert (await recv(fast))["event"] == {"n": n}
                if connections == 0:
                    break
            assert connections == 0, "the slow consumer was never closed"

    asyncio.run(scenario())


def test_sigterm_drains_with_1001_and_exits_0(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        env={"WSGATE_AGENT__STEP_DELAY": "0.5", "WSGATE_SERVER__DRAIN_TIMEOUT": "10"},
    )
    secret = server.dev_key.read_bytes().strip()
    token = mint_token(secret, "dave", now=time.time(), ttl=300, issuer="wsgate-dev", audience="wsgate")

    async def scenario() -> tuple[list[str], int | None, str]:
        async with websockets.connect(
            server.url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "user_message", "text": "finish me"}))
            assert (await recv(ws))["type"] == "agent_started"
            server.proc.send_signal(signal.SIGTERM)
            seen = []
            try:
                while True:
                    seen.append((await recv(ws))["type"])
            except websockets.ConnectionClosed as closed:
                return (
                    seen,
                    closed.rcvd.code if closed.rcvd else None,
                    closed.rcvd.reason if closed.rcvd else "",
                )

    start = time.monotonic()
    seen, code, reason = asyncio.run(scenario())
    assert seen[0] == "session.draining"
    assert seen[-1] == "agent_completed"
    assert code == 1001 and "reconnect after" in reason
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 10
    stop(server)


def test_the_handshake_limit_is_per_client_address(tmp_path: Path) -> None:
    """One address using up its handshakes must not refuse another address."""
    server = start_server(
        tmp_path, env={"WSGATE_SERVER__HANDSHAKE_RATE": "0.01", "WSGATE_SERVER__HANDSHAKE_BURST": "2"}
    )
    gateway = Gateway(server)

    async def attempt(source: str) -> int:
        try:
            async with websockets.connect(
                server.url, additional_headers=gateway.headers("alice"), local_addr=(source, 0)
            ) as ws:
                await recv(ws)
                return 101
        except websockets.InvalidStatus as refused:
            return refused.response.status_code

    async def scenario() -> list[int]:
        return [await attempt(source) for source in ("127.0.0.1",) * 3 + ("127.0.0.2",) * 2]

    try:
        assert asyncio.run(scenario()) == [101, 101, 429, 101, 101]
    finally:
        stop(server)


def test_a_push_that_is_not_valid_json_text_is_refused_and_harms_nobody(gateway: Gateway) -> None:
    """A /publish body with an unpaired surrogate (or NaN) is a 400 naming the problem;
    the receiving user's connection is not touched (it was closed with 1011 before)."""

    def raw_publish(body: str) -> httpx.Response:
        return httpx.post(
            f"{gateway.server.admin}/publish",
            content=body.encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=10,
        )

    async def scenario() -> None:
        async with websockets.connect(gateway.server.url, additional_headers=gateway.headers("alice")) as ws:
            await recv(ws)
            for body, says in (
                ('{"subject": "alice", "event": {"text": "\\ud800"}}', "unpaired surrogate"),
                ('{"subject": "alice", "event": {"n": NaN}}', "NaN is not JSON"),
            ):
                refused = await asyncio.to_thread(raw_publish, body)
                assert refused.status_code == 400
                assert says in refused.json()["error"]
            paired = await asyncio.to_thread(
                raw_publish, '{"subject": "alice", "event": {"t": "\\ud83d\\ude00"}}'
            )
            assert paired.json() == {"delivered": 1, "connections": 1}
            assert (await recv(ws))["event"] == {"t": "\U0001f600"}

    asyncio.run(scenario())
