"""Three ``wsgate serve`` nodes on one real ``redis-server``, ``websockets`` clients on each:
pushes reach a user on every node in order, revocations every node (and a node started
later), and Redis going away is not an outage: local runs go on, pushes say what they could
not reach, and once Redis is back, pushes and the revocations made meanwhile go through."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from conftest import Redis, Server, cluster_node, stop, until
from wsgate.auth.tokens import mint_token

pytestmark = pytest.mark.slow

SECRET = "cluster-test-hmac-secret-0123456789abcdef"
API_KEY = "cluster-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {API_KEY}"}


def node(root: Path, name: str, redis: Redis, **env: str) -> Server:
    return cluster_node(
        root,
        name,
        redis,
        "--admin-port",
        "0",
        env={
            "WSGATE_AUTH__HMAC_SECRET": SECRET,
            "WSGATE_ADMIN__API_KEY": API_KEY,
            "WSGATE_AGENT__STEP_DELAY": "0",
            "WSGATE_CLUSTER__RECONNECT_MAX": "0.5",
            **env,
        },
    )


def token(subject: str, jti: str | None = None) -> str:
    return mint_token(SECRET.encode(), subject, now=time.time(), ttl=600, jti=jti or secrets.token_hex(8))


def admin(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{server.admin}{path}", json=body, headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def broker_state(server: Server) -> str:
    state: str = httpx.get(f"{server.admin}/readyz", timeout=10).json()["broker"]
    return state


async def connected(*servers: Server) -> None:
    await until(lambda: all(broker_state(s) == "connected" for s in servers), "every broker connected")


async def disconnected(*servers: Server) -> None:
    await until(lambda: all(broker_state(s) != "connected" for s in servers), "every broker disconnected")


async def followed(redis: Redis, subject: str, nodes: int) -> bool:
    """Whether ``nodes`` nodes follow the user's pushes."""
    return await redis.subscribers((None, subject)) == nodes


async def held(redis: Redis, subject: str, places: int) -> bool:
    """Whether the user holds ``places`` places in the per-user limit, over every node."""
    return await redis.places((None, subject)) == places


async def opened(server: Server, bearer: str) -> Any:
    ws = await websockets.connect(server.url, additional_headers={"Authorization": f"Bearer {bearer}"})
    assert json.loads(await ws.recv())["type"] == "session.ready"
    return ws


async def pushed(ws: Any, count: int) -> list[int]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 10))["event"]["n"] for _ in range(count)]


def test_pushes_and_revocations_reach_every_node(tmp_path: Path, redis: Redis) -> None:
    a, b, c = (node(tmp_path, name, redis) for name in "abc")
    late: Server | None = None
    try:
        old = token("alice", jti="alice-1")

        async def main() -> None:
            nonlocal late
            await connected(a, b, c)
            on_b, on_c = await opened(b, old), await opened(c, token("alice"))
            await until(lambda: followed(redis, "alice", 2), "B and C follow alice")
            answers = [admin(a, "/publish", {"subject": "alice", "event": {"n": n}}) for n in range(20)]
            assert all(x == {"delivered": 0, "connections": 0, "nodes": 2} for x in answers)
            assert await pushed(on_b, 20) == list(range(20))  # in order, on every node
            assert await pushed(on_c, 20) == list(range(20))
            # One push to several users, or everyone, reaches every node (its fan-out channel).
            on_a = await opened(a, token("bob"))
            events = [{"n": n} for n in range(20, 30)]
            answer = admin(a, "/publish", {"subjects": ["alice", "bob"], "events": events})
            assert answer == {"delivered": 10, "connections": 1, "nodes": 2}
            for ws in (on_a, on_b, on_c):
                assert await pushed(ws, 10) == list(range(20, 30))
            assert admin(b, "/publish", {"everyone": True, "event": {"n": 99}})["nodes"] == 2
            for ws in (on_a, on_b, on_c):
                assert await pushed(ws, 1) == [99]
            await on_a.close()
            # A revocation on A closes alice's token on B at once, and C's other token lives.
            start = time.monotonic()
            assert admin(a, "/revoke", {"jti": "alice-1"}) == {"closed": 0, "cluster": "announced"}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(on_b.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            assert time.monotonic() - start < 1.0
            await on_c.send(json.dumps({"type": "ping", "id": "still"}))
            assert json.loads(await on_c.recv())["id"] == "still"
            # A subject revocation on B closes alice everywhere, within a second too.
            start = time.monotonic()
            assert admin(b, "/revoke", {"subject": "alice"})["cluster"] == "announced"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(on_c.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            assert time.monotonic() - start < 1.0
            # A node started afterwards still refuses the revoked token.
            late = node(tmp_path, "late", redis)
            await connected(late)
            with pytest.raises(websockets.InvalidStatus) as refused:
                await opened(late, old)
            assert refused.value.response.status_code == 403

        asyncio.run(main())
    finally:
        for server in (a, b, c, *([late] if late else [])):
            stop(server)


def test_redis_away_is_not_an_outage_and_its_return_heals_the_cluster(tmp_path: Path, redis: Redis) -> None:
    a, b = node(tmp_path, "a", redis), node(tmp_path, "b", redis)
    try:
        doomed = token("bob", jti="bob-1")

        async def main() -> None:
            await connected(a, b)
            on_b = await opened(b, doomed)
            redis.kill()
            await disconnected(a)
            # Local connections go on: a full run on A.
            ws = await opened(a, token("carol"))
            async with ws:
                await ws.send(json.dumps({"type": "user_message", "text": "hi"}))
                kinds = [json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] for _ in range(5)]
            assert kinds[-1] == "agent_completed"
            answer = admin(a, "/publish", {"subject": "bob", "event": {"n": 0}})
            assert answer["nodes"] is None and "broker" in answer["unreached"]
            assert admin(a, "/revoke", {"jti": "bob-1"})["cluster"].startswith("pending")
            redis.start()
            await connected(a, b)
            # The revocation made meanwhile reaches B once Redis is back...
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(on_b.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            # ...and pushes go through again, without restarting any node.
            on_b = await opened(b, token("bob"))
            await until(lambda: followed(redis, "bob", 1), "B follows bob")
            assert admin(a, "/publish", {"subject": "bob", "event": {"n": 1}})["nodes"] == 1
            assert await pushed(on_b, 1) == [1]
            await on_b.close()

        asyncio.run(main())
    finally:
        for server, name in ((a, "a"), (b, "b")):
            log = stop(server)
            assert "1011" not in log and "Traceback" not in log, f"{name}: {log[-2000:]}"


def test_a_revocation_survives_its_trip_through_json() -> None:
    from wsgate.cluster.broker import Revocation

    for revocation in (Revocation("jti", "j-1", 1.5e9), Revocation("subject", "alice", 1.2e9, "acme")):
        assert Revocation.from_json(revocation.to_json()) == revocation
    assert Revocation("subject", "alice", 0, "acme").key == 'wsgate:revoked:subject:["acme", "alice"]'
    with pytest.raises(ValueError, match="not a revocation"):
        Revocation.from_json('{"kind": "everything", "name": "x", "at": 0}')


def test_the_per_user_limit_counts_every_node_and_a_dead_nodes_places_come_back(
    tmp_path: Path, redis: Redis
) -> None:
    limits = {"WSGATE_SERVER__MAX_CONNECTIONS_PER_USER": "2", "WSGATE_CLUSTER__LEASE_TTL": "2"}
    a, b, c = (node(tmp_path, name, redis, **limits) for name in "abc")
    try:

        async def refused(server: Server) -> int:
            with pytest.raises(websockets.InvalidStatus) as refusal:
                await opened(server, token("dana"))
            status: int = refusal.value.response.status_code
            return status

        async def opened_or_none(server: Server) -> Any:
            try:
                return await opened(server, token("dana"))
            except websockets.InvalidStatus:
                return None

        async def main() -> None:
            await connected(a, b, c)
            on_a, on_b = await opened(a, token("dana")), await opened(b, token("dana"))
            assert await refused(c) == 429  # two on other nodes: none left here
            await on_a.close()
            await until(lambda: held(redis, "dana", 1), "A gives its place back")
            on_c = await opened(c, token("dana"))
            assert await refused(a) == 429
            # A node killed outright gives nothing back; its lease expires (2 s) instead.
            b.proc.kill()
            b.proc.communicate()
            start = time.monotonic()
            again = await until(lambda: opened_or_none(a), "the dead node's place comes back", within=5)
            assert time.monotonic() - start <= 2 + 1
            await again.close()
            await on_c.close()
            del on_b

        asyncio.run(main())
    finally:
        for server in (a, c):
            stop(server)
        if b.proc.poll() is None:
            stop(b)


def test_with_redis_away_the_limit_falls_back_to_each_nodes_own(tmp_path: Path, redis: Redis) -> None:
    limits = {"WSGATE_SERVER__MAX_CONNECTIONS_PER_USER": "1"}
    a, b = node(tmp_path, "a", redis, **limits), node(tmp_path, "b", redis, **limits)
    try:

        async def main() -> None:
            await connected(a, b)
            redis.kill()
            await disconnected(a, b)
            on_a, on_b = await opened(a, token("erin")), await opened(b, token("erin"))  # one per node
            with pytest.raises(websockets.InvalidStatus):
                await opened(a, token("erin"))  # the node's own limit still holds
            await on_a.close()
            await on_b.close()

        asyncio.run(main())
        metrics = httpx.get(f"{a.admin}/metrics", timeout=10).text
        assert 'wsgate_broker_total{event="limit_fallback"} 1.0' in metrics
        assert "wsgate_broker_connected 0.0" in metrics
    finally:
        stop(a)
        stop(b)
