"""An agent service for the upstream benchmark: Starlette + sse-starlette on uvicorn.

``python -m benchmarks.backend SECRET`` prints ``agent backend on port N`` and streams,
for each run, the no-op agent's five events as SSE, after verifying the gateway's JWT
(as a real backend would, so its cost is in the backend's column, not the gateway's).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator

import jwt
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET = sys.argv[1] if len(sys.argv) > 1 else "b" * 40
EVENTS = [
    ("agent_started", {}),
    ("agent_thinking", {}),
    ("tool_executing", {"tool": "noop"}),
    ("tool_completed", {"tool": "noop"}),
    ("agent_completed", {"status": "ok"}),
]


async def runs(request: Request) -> Response:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        jwt.decode(token, SECRET, algorithms=["HS256"], audience="wsgate-upstream")
    except jwt.PyJWTError:
        return JSONResponse({"error": "bad token"}, status_code=401)
    await request.body()

    async def events() -> AsyncIterator[dict[str, str]]:
        for kind, fields in EVENTS:
            yield {"event": kind, "data": json.dumps(fields)}

    return EventSourceResponse(events())


app = Starlette(routes=[Route("/runs", runs, methods=["POST"])])


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"agent backend on port {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])


if __name__ == "__main__":
    main()
