"""Resuming over real sockets: a ``websockets`` client cuts its TCP connection mid-run (no
close frame) and resumes; with Redis, on another node, and after a drain on a new process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import Server, recv, start_server, stop

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
