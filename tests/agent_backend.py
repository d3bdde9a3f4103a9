"""A real agent service for the end-to-end tests: Starlette with sse-starlette, on uvicorn.

``python tests/agent_backend.py SECRET`` serves on 127.0.0.1 and a free port, printing
``agent backend on http://127.0.0.1:PORT``. Each route is one kind of backend:

- ``/sse`` streams the wsgate events of a run (and ``agent_delta`` chunks) as SSE;
  ``/ndjson`` the same as NDJSON; ``/agui`` as AG-UI events;
- ``/flaky`` answers 503 to a run's first request and streams on its second;
- ``/slow`` streams ``agent_started`` and then waits (for cancel tests);
- ``/hang`` never sends a byte; ``/garbage`` sends what is not JSON; ``/down`` is 503.

Every request's token is verified with pyjwt (a bad one is a 401); ``GET /seen`` returns
what the backend saw: each request's claims and headers, and each stream whose client
hung up before it ended.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SECRET = sys.argv[1] if len(sys.argv) > 1 else "u" * 40
SEEN: dict[str, list[Any]] = {"requests": [], "disconnected": [], "finished": []}
ATTEMPTS: dict[str, int] = {}
Events = list[tuple[str, dict[str, Any]]]


async def _verified(request: Request) -> tuple[dict[str, Any], dict[str, Any]] | Response:
    _, _, token = request.headers.get("authorization", "").partition(" ")
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="wsgate-upstream")
    except jwt.PyJWTError as exc:
        rejected = {"rejected": str(exc), "authorization": request.headers.get("authorization")}
        SEEN["requests"].append(rejected)
        return JSONResponse({"error": str(exc)}, status_code=401)
    body = await request.json()
    SEEN["requests"].append(
        {
            "path": request.url.path,
            "claims": claims,
            "authorization": request.headers.get("authorization"),
            "request_id": request.headers.get("x-request-id"),
            "traceparent": request.headers.get("traceparent"),
            "body": body,
        }
    )
    return claims, body


Handler = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Response]]


def verified(route: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The route, given the request's verified claims and JSON body (a bad token: 401)."""

    async def handle(request: Request) -> Response:
        checked = await _verified(request)
        return checked if isinstance(checked, Response) else await route(*checked)

    return handle


def _events(body: dict[str, Any]) -> Events:
    text = body["message"]["text"]
    words = text.split()
    return [
        ("agent_started", {}),
        *[("agent_delta", {"text": word + " "}) for word in words],
        ("tool_executing", {"tool": "count"}),
        ("tool_completed", {"tool": "count", "result": {"words": len(words)}}),
        ("agent_completed", {"status": "ok", "output": f"{body['user']['sub']}: {len(words)} words"}),
    ]


async def _watched(run: str, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream, noting whether it ran to its end or its client hung up first."""
    try:
        async for event in events:
            yield event
        SEEN["finished"].append(run)
    except (asyncio.CancelledError, GeneratorExit):
        SEEN["disconnected"].append(run)
        raise


async def _sse_stream(
    events: list[tuple[str, dict[str, Any]]], pause: float = 0.01
) -> AsyncIterator[dict[str, str]]:
    for kind, fields in events:
        await asyncio.sleep(pause)
        yield {"event": kind, "data": json.dumps(fields)}


@verified
async def sse(claims: dict[str, Any], body: dict[str, Any]) -> Response:
    return EventSourceResponse(_watched(claims["jti"], _sse_stream(_events(body))))


@verified
async def ndjson(claims: dict[str, Any], body: dict[str, Any]) -> Response:

    async def lines() -> AsyncIterator[bytes]:
        for kind, fields in _events(body):
            await asyncio.sleep(0.01)
            yield (json.dumps({"type": kind, **fields}) + "\n").encode()

    return StreamingResponse(_watched(claims["jti"], lines()), media_type="application/x-ndjson")


@verified
async def agui(claims: dict[str, Any], body: dict[str, Any]) -> Response:
    run = body["run_id"]

    async def stream() -> AsyncIterator[dict[str, str]]:
        ag = [
            {"type": "RUN_STARTED", "threadId": body["session_id"], "runId": run},
            {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
            *[
                {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": word + " "}
                for word in body["message"]["text"].split()
            ],
            {"type": "TEXT_MESSAGE_END", "messageId": "m1"},
            {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "count"},
            {"type": "TOOL_CALL_END", "toolCallId": "c1"},
            {"type": "TOOL_CALL_RESULT", "messageId": "m2", "toolCallId": "c1", "content": "done"},
            {"type": "RUN_FINISHED", "threadId": body["session_id"], "runId": run},
        ]
        for event in ag:
            await asyncio.sleep(0.01)
            yield {"data": json.dumps(event)}  # AG-UI's SSE encoding: the type is in the data

    return EventSourceResponse(_watched(claims["jti"], stream()))


@verified
async def flaky(claims: dict[str, Any], body: dict[str, Any]) -> Response:
    ATTEMPTS[claims["jti"]] = ATTEMPTS.get(claims["jti"], 0) + 1
    if ATTEMPTS[claims["jti"]] == 1:
        return JSONResponse({"error": "warming up"}, status_code=503)
    return EventSourceResponse(_watched(claims["jti"], _sse_stream(_events(body))))


@verified
async def slow(claims: dict[str, Any], _body: dict[str, Any]) -> Response:

    async def stream() -> AsyncIterator[dict[str, str]]:
        yield {"event": "agent_started", "data": "{}"}
        await asyncio.sleep(3600)

    return EventSourceResponse(_watched(claims["jti"], stream()))


async def hang(request: Request) -> Response:
    await _verified(request)
    await asyncio.sleep(3600)
    return Response(status_code=204)  # pragma: no cover - the gateway gives up first


@verified
async def garbage(_claims: dict[str, Any], _body: dict[str, Any]) -> Response:

    async def stream() -> AsyncIterator[bytes]:
        yield b"data: this is not json\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def down(request: Request) -> Response:
    SEEN["requests"].append({"path": "/down"})
    return JSONResponse({"error": "down"}, status_code=503)


async def seen(request: Request) -> Response:
    return JSONResponse(SEEN)


app = Starlette(
    routes=[
        Route("/sse", sse, methods=["POST"]),
        Route("/ndjson", ndjson, methods=["POST"]),
        Route("/agui", agui, methods=["POST"]),
        Route("/flaky", flaky, methods=["POST"]),
        Route("/slow", slow, methods=["POST"]),
        Route("/hang", hang, methods=["POST"]),
        Route("/garbage", garbage, methods=["POST"]),
        Route("/down", down, methods=["POST"]),
        Route("/seen", seen, methods=["GET"]),
    ]
)


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"agent backend on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
