"""Resuming over real sockets: a ``websockets`` client cuts its TCP connection mid-run (no
close frame) and resumes; with Redis, on another node, and after a drain on a new process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import Redis, Server, cluster_node, recv, start_server, stop, until
from wsgate.auth.tokens import mint_token
from wsgate.cluster.broker import FANOUT

pytestmark = pytest.mark.slow

RUN = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


async def connect(server: Server, token: str) -> Any:
    return await websockets.connect(server.url, additional_headers={"Authorization": f"Bearer {token}"})


def cut(ws: Any) -> None:
    """Drop the TCP connection as a network does: no close frame, no closing handshake."""
    ws.transport.abort()


async def resume(ws: Any, ready: dict[str, Any], last_seq: int) -> dict[str, Any]:
    await ws.send(
        json.dumps(
            {
                "type": "session.resume",
                "session_id": ready["session_id"],
                "resume_token": ready["resume_token"],
                "last_seq": last_seq,
            }
        )
    )
    answer = await recv(ws)
    assert answer["type"] == "session.resumed", answer
    return answer


async def until_type(ws: Any, kind: str) -> list[dict[str, Any]]:
    received = [await recv(ws)]
    while received[-1]["type"] != kind:
        received.append(await recv(ws))
    return received


async def cut_mid_run(server: Server, token: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start a run, cut the connection once its tool is executing: the ready, what arrived."""
    ws = await connect(server, token)
    ready = await recv(ws)
    await ws.send(json.dumps({"type": "user_message", "text": "resume me", "id": "m1"}))
    before = await until_type(ws, "tool_executing")
    cut(ws)
    return ready, before


async def resumed_rest(
    server: Server, token: str, ready: dict[str, Any], last_seq: int
) -> list[dict[str, Any]]:
    ws = await connect(server, token)
    try:
        assert (await recv(ws))["type"] == "session.ready"
        answer = await resume(ws, ready, last_seq)
        assert answer["recovered"] is True and answer["session_id"] == ready["session_id"], answer
        return await until_type(ws, "agent_completed")
    finally:
        await ws.close()


def check_whole(events: list[dict[str, Any]]) -> None:
    assert [e["type"] for e in events] == RUN
    assert [e["seq"] for e in events] == list(range(1, len(RUN) + 1))
    assert {e["message_id"] for e in events} == {"m1"}


def test_a_run_cut_off_by_a_dropped_tcp_connection_is_resumed_whole(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"WSGATE_AGENT__STEP_DELAY": "0.4"})
    try:
        token = server.token("--sub", "alice")

        async def main() -> None:
            ready, before = await cut_mid_run(server, token)
            check_whole(before + await resumed_rest(server, token, ready, before[-1]["seq"]))

        asyncio.run(main())
    finally:
        stop(server)


# -- across nodes, with a real redis-server -------------------------------------------------

SECRET = "resume-test-hmac-secret-0123456789abcdef"


def node(root: Path, name: str, redis: Redis, **env: str) -> Server:
    settings = {"WSGATE_AUTH__HMAC_SECRET": SECRET, "WSGATE_AGENT__STEP_DELAY": "0.4", **env}
    return cluster_node(root, name, redis, env=settings)


def token(subject: str = "alice") -> str:
    return mint_token(SECRET.encode(), subject, now=time.time(), ttl=600)


async def connected(redis: Redis, nodes: int) -> None:
    """Once ``nodes`` nodes are connected to Redis (each follows the fan-out channel): a node
    serves before it has reached Redis, and until then it cannot claim a stored session."""

    async def followers() -> bool:
        counts = await redis.query("pubsub_numsub", FANOUT)
        return bool(counts[FANOUT.encode()] == nodes)

    await until(followers, f"{nodes} nodes connected to Redis")


async def stored(redis: Redis, ready: dict[str, Any]) -> None:
    """Once the node the connection dropped from has written the session to Redis."""
    key = f"wsgate:session:{ready['session_id']}"
    await until(lambda: redis.query("exists", [key]), "the detached session stored")


def test_a_run_cut_off_on_one_node_is_resumed_on_another_while_it_goes_on(
    tmp_path: Path, redis: Redis
) -> None:
    a, b = node(tmp_path, "a", redis), node(tmp_path, "b", redis)
    try:

        async def main() -> None:
            await connected(redis, 2)
            ready, before = await cut_mid_run(a, token())
            await stored(redis, ready)
            # Node a still runs it; b replays what a logged and relays the rest as it comes.
            after = await resumed_rest(b, token(), ready, before[-1]["seq"])
            check_whole(before + after)
            # The resume token was good once, on every node.
            for server in (a, b):
                ws = await connect(server, token())
                await recv(ws)
                assert (await resume(ws, ready, len(RUN)))["reason"] == "unknown"
                await ws.close()

        asyncio.run(main())
    finally:
        stop(a)
        stop(b)


def test_a_drained_node_hands_its_sessions_to_a_new_process(tmp_path: Path, redis: Redis) -> None:
    """SIGTERM: the run finishes, the connection closes with 1001 (the session detached and
    written to Redis); a new process on the same Redis resumes it with every event once."""
    old = node(tmp_path, "old", redis)
    new = None
    try:

        async def main() -> None:
            nonlocal new
            ws = await connect(old, token())
            ready = await recv(ws)
            await ws.send(json.dumps({"type": "user_message", "text": "drain me", "id": "m1"}))
            first = await recv(ws)
            old.proc.terminate()
            seen = [first, *await until_type(ws, "agent_completed")]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert [e["type"] for e in seen if e["type"] != "session.draining"] == RUN
            assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
            assert old.proc.wait(timeout=30) == 0
            new = node(tmp_path, "new", redis)
            await connected(redis, 1)
            rest = await resumed_after_ping(new, ready, seen[-1]["seq"])
            assert rest == [{"type": "pong", "id": "after", "seq": seen[-1]["seq"] + 1}]

        asyncio.run(main())
    finally:
        stop(old)
        if new is not None:
            stop(new)


async def resumed_after_ping(server: Server, ready: dict[str, Any], last_seq: int) -> list[dict[str, Any]]:
    ws = await connect(server, token())
    try:
        await recv(ws)
        answer = await resume(ws, ready, last_seq)
        assert answer["recovered"] is True, answer
        await ws.send(json.dumps({"type": "ping", "id": "after"}))
        return await until_type(ws, "pong")
    finally:
        await ws.close()


def test_a_detached_run_whose_node_dies_ends_node_lost_never_in_silence(tmp_path: Path, redis: Redis) -> None:
    env = {"WSGATE_CLUSTER__LEASE_TTL": "2", "WSGATE_AGENT__STEP_DELAY": "3"}
    a, b = node(tmp_path, "a", redis, **env), node(tmp_path, "b", redis, **env)
    try:

        async def main() -> None:
            await connected(redis, 2)
            ws = await connect(a, token())
            ready = await recv(ws)
            await ws.send(json.dumps({"type": "user_message", "text": "doomed", "id": "m1"}))
            first = await recv(ws)
            cut(ws)
            await stored(redis, ready)
            a.proc.kill()  # the node running the detached run is gone
            rest = await resumed_rest(b, token(), ready, first["seq"])
            events = [first, *rest]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert events[-1]["status"] == "error" and events[-1]["error"]["code"] == "node_lost"
            assert events[-1]["run_id"] == "r1" and events[-1]["message_id"] == "m1"

        asyncio.run(main())
    finally:
        stop(a)
        stop(b)
