"""Live-token behaviour over a real socket: ``wsgate serve`` and the ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.typing import Subprotocol

from conftest import Server, recv, start_server, stop
from wsgate.auth.tokens import mint_token


class DevServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.secret = server.dev_key.read_bytes().strip()

    def token(self, sub: str, ttl: float) -> str:
        return mint_token(self.secret, sub, now=time.time(), ttl=ttl, issuer="wsgate-dev", audience="wsgate")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    server = start_server(
        tmp_path_factory.mktemp("live"),
        env={"WSGATE_AUTH__FIRST_MESSAGE": "true", "WSGATE_AUTH__FIRST_MESSAGE_TIMEOUT": "1"},
    )
    yield DevServer(server)
    stop(server)


async def close_code(ws: Any) -> int | None:
    try:
        async with asyncio.timeout(15):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


def test_short_token_expiring_refreshed_in_band_then_4401(dev: DevServer) -> None:
    first = dev.token("alice", ttl=3)
    second = dev.token("alice", ttl=5)

    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {first}"}
        async with websockets.connect(dev.server.url, additional_headers=headers) as ws:
            ready = await recv(ws)
            await ws.send(json.dumps({"type": "user_message", "text": "before"}))
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["type"] != "auth.expiring":
                seen.append(await recv(ws))
            assert seen[-1]["expires_at"] == ready["expires_at"]
            await ws.send(json.dumps({"type": "auth.refresh", "token": second}))
            while seen[-1]["type"] != "auth.refreshed":
                seen.append(await recv(ws))
            refreshed_until = seen[-1]["expires_at"]
            assert refreshed_until > ready["expires_at"]
            # Past the first token's expiry the connection still streams events. The server's
            # own warning for the new token marks the time (no sleep to order things).
            seen.append(await recv(ws))
            while seen[-1]["type"] != "auth.expiring":
                seen.append(await recv(ws))
            assert seen[-1]["expires_at"] == refreshed_until
            assert time.time() > ready["expires_at"]
            await ws.send(json.dumps({"type": "user_message", "text": "after"}))
            while seen[-1]["type"] != "agent_completed" or seen[-1]["run_id"] != "r2":
                seen.append(await recv(ws))
            assert [m["seq"] for m in seen] == list(range(1, 1 + len(seen)))
            assert await close_code(ws) == 4401
            assert time.time() >= refreshed_until - 0.5

    asyncio.run(scenario())


def test_refresh_with_another_subject_is_closed_4403(dev: DevServer) -> None:
    async def scenario() -> int | None:
        headers = {"Authorization": f"Bearer {dev.token('alice', ttl=60)}"}
        async with websockets.connect(dev.server.url, additional_headers=headers) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "auth.refresh", "token": dev.token("mallory", ttl=60)}))
            return await close_code(ws)

    assert asyncio.run(scenario()) == 4403


def test_first_message_auth_and_its_timeout(dev: DevServer) -> None:
    async def authenticated() -> list[str]:
        async with websockets.connect(dev.server.url, subprotocols=[Subprotocol("wsgate.v1")]) as ws:
            await ws.send(json.dumps({"type": "auth", "token": dev.token("carol", ttl=60)}))
            ready = await recv(ws)
            assert ready["subject"] == "carol"
            await ws.send(json.dumps({"type": "user_message", "text": "hi"}))
            return [(await recv(ws))["type"] for _ in range(5)]

    assert asyncio.run(authenticated())[-1] == "agent_completed"

    async def silent() -> int | None:
        async with websockets.connect(dev.server.url) as ws:
            return await close_code(ws)

    assert asyncio.run(silent()) == 4408
