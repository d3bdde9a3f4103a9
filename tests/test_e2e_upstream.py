"""End to end through a real agent service: ``wsgate serve --upstream`` as a subprocess in
front of a Starlette + sse-starlette backend on uvicorn (tests/agent_backend.py), with the
``websockets`` client over loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets

from conftest import Server, run_once, start_process, start_server, stop, until

pytestmark = pytest.mark.slow

SECRET = "s3cret-of-the-agent-service-" + "x" * 16
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    proc, match = start_process(
        [sys.executable, str(HERE / "agent_backend.py"), SECRET],
        r"agent backend on (http://\S+)",
        what="backend",
    )
    yield match.group(1)
    proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def seen(backend: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{backend}/seen", timeout=10).json()
    return answer


def gateway(tmp_path: Path, url: str, **env: str) -> Server:
    return start_server(
        tmp_path,
        "--upstream",
        url,
        env={"WSGATE_AGENT__UPSTREAM_SECRET": SECRET, **env},
    )


async def receive(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
    return message


async def run(ws: Any, text: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "user_message", "text": text}))
    events = []
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] == "agent_completed":
            return events


async def connect(server: Server, token: str) -> Any:
    ws = await websockets.connect(server.url, additional_headers={"Authorization": f"Bearer {token}"})
    assert (await receive(ws))["type"] == "session.ready"
    return ws


def test_the_golden_path_streams_through_the_backend_which_sees_the_gateways_token(
    backend: str, tmp_path: Path
) -> None:
    server = gateway(tmp_path, f"{backend}/sse")
    try:
        events = run_once(server, "one two three")
    finally:
        stop(server)
    assert [e["type"] for e in events] == [
        "agent_started",
        "agent_delta",
        "agent_delta",
        "agent_delta",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ]
    assert "".join(e["text"] for e in events if e["type"] == "agent_delta") == "one two three "
    assert events[-1]["status"] == "ok" and events[-1]["output"] == "alice: 3 words"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    request = next(
        r
        for r in seen(backend)["requests"]
        if r.get("body", {}).get("message", {}).get("text") == "one two three"
    )
    claims = request["claims"]
    assert claims["sub"] == "alice" and claims["aud"] == "wsgate-upstream"
    assert claims["jti"] == request["request_id"] == f"{request['body']['session_id']}:r1"
    # Never the client's own token: the bearer is signed with the upstream secret, and the
    # client's dev token is signed with the dev key.
    assert claims["iss"] == "wsgate"
    assert jwt.decode(
        request["authorization"].split()[1], SECRET, algorithms=["HS256"], audience="wsgate-upstream"
    )


@pytest.mark.parametrize(("route", "vocabulary"), [("ndjson", "wsgate"), ("agui", "ag-ui")])
def test_ndjson_and_ag_ui_backends(backend: str, tmp_path: Path, route: str, vocabulary: str) -> None:
    server = gateway(tmp_path, f"{backend}/{route}", WSGATE_AGENT__UPSTREAM_EVENTS=vocabulary)
    try:
        events = run_once(server, "hello world", "bob")
    finally:
        stop(server)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "agent_started" and kinds[-1] == "agent_completed"
    assert [e["text"] for e in events if e["type"] == "agent_delta"] == ["hello ", "world "]
    assert "tool_executing" in kinds and "tool_completed" in kinds
    assert events[-1]["status"] == "ok"


def test_failures_end_runs_cleanly_and_leave_the_connection_and_its_neighbours_alone(
    backend: str, tmp_path: Path
) -> None:
    """A backend that answers 503 then 200 is retried; one that never answers is timed out;
    one that sends garbage is a protocol error; cancel closes the backend's stream. Every run
    ends with one agent_completed, the connection stays open, and a neighbour never waits."""
    results: dict[str, Any] = {}
    for route in ("flaky", "hang", "garbage", "slow"):
        (tmp_path / route).mkdir()
        server = gateway(
            tmp_path / route,
            f"{backend}/{route}",
            WSGATE_AGENT__FIRST_EVENT_TIMEOUT="2",
            WSGATE_AGENT__RUN_TIMEOUT="10",
        )
        try:
            tokens = server.token("--sub", "carol"), server.token("--sub", "dave")
            results[route] = asyncio.run(exercise(server, *tokens, cancel=route == "slow"))
        finally:
            stop(server)
    assert results["flaky"][-1]["status"] == "ok"
    assert results["hang"][-1]["error"]["code"] == "upstream_timeout"
    assert results["garbage"][-1]["error"]["code"] == "upstream_protocol"
    assert [e["type"] for e in results["slow"]] == ["agent_started", "agent_completed"]
    assert results["slow"][-1]["status"] == "cancelled"
    for route in ("flaky", "hang", "garbage"):
        assert [e["type"] for e in results[route]].count("agent_completed") == 1
    observed = seen(backend)
    flaky = [r for r in observed["requests"] if r.get("path") == "/flaky"]
    assert len(flaky) == 2 and flaky[0]["claims"]["jti"] == flaky[1]["claims"]["jti"]
    slow = next(r for r in observed["requests"] if r.get("path") == "/slow")
    # The backend notices the hang-up on its own schedule.
    hung_up = asyncio.run(until(lambda: slow["claims"]["jti"] in seen(backend)["disconnected"], "hang-up"))
    assert hung_up


async def exercise(server: Server, first: str, second: str, *, cancel: bool) -> list[dict[str, Any]]:
    """One run on one connection (cancelled once started, with ``cancel``) while a neighbour
    pings; then the connection is shown to be still open."""
    ws, neighbour = await connect(server, first), await connect(server, second)
    async with ws, neighbour:
        if cancel:
            await ws.send(json.dumps({"type": "user_message", "text": "wait"}))
            started = await receive(ws)
            await ws.send(json.dumps({"type": "run.cancel", "run_id": started["run_id"]}))
            events = [started, await receive(ws)]
        else:
            task = asyncio.ensure_future(run(ws, "hi"))
            await neighbour.send(json.dumps({"type": "ping", "id": "n"}))
            pong = await receive(neighbour)
            assert (pong["type"], pong["id"]) == ("pong", "n")
            events = await task
        await ws.send(json.dumps({"type": "ping", "id": "after"}))
        assert (await receive(ws))["id"] == "after"  # still open
        return events


def test_the_breaker_opens_on_a_down_backend_and_then_no_call_is_made(backend: str, tmp_path: Path) -> None:
    server = gateway(
        tmp_path,
        f"{backend}/down",
        WSGATE_AGENT__RETRIES="0",
        WSGATE_BREAKER__WINDOW="4",
        WSGATE_BREAKER__MIN_CALLS="4",
        WSGATE_BREAKER__OPEN_WAIT="60",
    )
    before = len([r for r in seen(backend)["requests"] if r.get("path") == "/down"])
    try:
        token = server.token("--sub", "erin")

        async def main() -> list[dict[str, Any]]:
            ws = await connect(server, token)
            async with ws:
                return [(await run(ws, f"try {n}"))[-1] for n in range(6)]

        ends = asyncio.run(main())
    finally:
        stop(server)
    assert all(end["error"]["code"] == "upstream_unavailable" for end in ends)
    assert [end["error"]["message"] for end in ends[-2:]] == ["the agent service's breaker is open"] * 2
    calls = len([r for r in seen(backend)["requests"] if r.get("path") == "/down"]) - before
    assert calls == 4
