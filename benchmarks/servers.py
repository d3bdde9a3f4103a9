"""The servers compared by the benchmarks, each run as its own process.

``python -m benchmarks.servers bare|peer`` prints ``port N`` once listening:
- ``bare``: trio-websocket alone, the floor of our stack: accept, send a ready
  message, echo every message;
- ``bare-fanout``: the same, and a connection to ``/control`` that sends ``fanout N``
  has N events sent to every other connection;
- ``peer-trio``: the same on websockets' own Trio implementation (``websockets.trio``);
- ``peer``: what a user would write instead with the ``websockets`` (asyncio)
  package: the same pyjwt HS256 verification before accepting, then the same.
wsgate itself runs as ``wsgate serve --app noop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import sys
import time
from functools import partial
from typing import Any

import jwt
import trio
import trio_websocket
import websockets
from websockets.http11 import Request, Response

from wsgate.auth.tokens import mint_token

SECRET = "benchmark-secret-hs256-0123456789abcdef"
ISSUER, AUDIENCE = "bench", "wsgate"
READY = '{"type":"session.ready"}'


def token(subject: str, jti: str | None = None) -> str:
    """An hour's HS256 token that all three servers accept."""
    claims = {"jti": jti} if jti is not None else {}
    return mint_token(
        SECRET.encode(), subject, now=time.time(), ttl=3600, issuer=ISSUER, audience=AUDIENCE, **claims
    )


async def bare() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.send_message(READY)
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        print(f"port {server.port}", flush=True)


async def bare_fanout() -> None:
    """trio-websocket alone, fanning out as one would write it: a connection that sends
    ``fanout N`` has N events sent to every other connection, one send after another."""
    listeners: set[trio_websocket.WebSocketConnection] = set()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        control = request.path.endswith("/control")
        ws = await request.accept()
        try:
            await ws.send_message(READY)
            if not control:
                listeners.add(ws)
                await ws.get_message()  # until it closes
                return
            message = await ws.get_message()
            for n in range(int(str(message).split()[1])):
                event = f'{{"type":"event","event":{{"n":{n}}},"seq":{n + 1}}}'
                for other in list(listeners):
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await other.send_message(event)
            await ws.send_message("done")
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            listeners.discard(ws)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        print(f"port {server.port}", flush=True)


def _refused(connection: Any, request: Request) -> Response | None:
    """pyjwt's HS256 verification of the bearer token before accepting (both peers')."""
    try:
        jwt.decode(
            request.headers.get("Authorization", "").removeprefix("Bearer "),
            SECRET,
            algorithms=["HS256"],
            issuer=ISSUER,
            audience=AUDIENCE,
        )
    except jwt.PyJWTError:
        refusal: Response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "invalid token\n")
        return refusal
    return None


async def _echo(ws: Any) -> None:
    await ws.send(READY)
    async for message in ws:
        await ws.send(message)


async def peer_trio() -> None:
    """``peer`` on Trio: websockets' own Trio server, with the same verification."""
    from websockets.trio.server import serve

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve, _echo, 0, host="127.0.0.1", process_request=_refused, compression=None, max_queue=64
            )
        )
        print(f"port {server.listeners[0].socket.getsockname()[1]}", flush=True)


async def peer() -> None:
    async with websockets.serve(_echo, "127.0.0.1", 0, process_request=_refused, max_queue=64) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"port {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        trio.run(bare)
    elif sys.argv[1] == "bare-fanout":
        trio.run(bare_fanout)
    elif sys.argv[1] == "peer-trio":
        trio.run(peer_trio)
    else:
        asyncio.run(peer())
