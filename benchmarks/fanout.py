"""Fan-out: one push of ``events`` events to ``users`` idle users, each on its own connection.

wsgate gets it as one ``POST /publish`` (``everyone``, ``events``) on its admin listener;
bare trio-websocket as one ``fanout N`` message, after which it loops over its
connections and sends each event to each (what one would write on the bare stack).
Reported: events delivered per second (from the request to the last event received by
the last client) and the server's CPU per delivered event, both servers side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import websockets

from .servers import token


async def _listeners(url: str, users: int) -> list[Any]:
    held = []
    for i in range(users):
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token(f'fan-{i}')}"},
            compression=None,
            ping_interval=None,
            max_queue=None,
        )
        await ws.recv()
        held.append(ws)
    return held


async def _received(ws: Any, events: int) -> None:
    """Every event, once and in order (by its ``event.n``)."""
    for n in range(events):
        message = json.loads(await ws.recv())
        if message["event"]["n"] != n:
            raise AssertionError(f"event {message['event']['n']} arrived where {n} was due")


async def fanout(server: Any, users: int, events: int, trigger: Any) -> dict[str, float]:
    """``trigger()`` starts the push; every listener must receive ``events`` events."""
    held = await _listeners(server.url, users)
    try:
        await asyncio.sleep(0.5)
        cpu = server.cpu_seconds()
        start = time.perf_counter()
        waiting = [asyncio.ensure_future(_received(ws, events)) for ws in held]
        await trigger()
        await asyncio.wait_for(asyncio.gather(*waiting), 120)
        elapsed = time.perf_counter() - start
        delivered = users * events
        return {
            "events_per_s": round(delivered / elapsed, 1),
            "cpu_us_per_event": round((server.cpu_seconds() - cpu) / delivered * 1e6, 2),
        }
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)


def publish_trigger(admin_port: int, api_key: str, events: int) -> Any:
    body = {"everyone": True, "events": [{"n": n} for n in range(events)]}

    async def trigger() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.post(
                f"http://127.0.0.1:{admin_port}/publish",
                json=body,
                headers={"Authorization": f"Bearer {api_key}"},
            )
            answer.raise_for_status()

    return trigger


pending: list[Any] = []  # the control connections' last reads, kept until the run ends


def bare_trigger(url: str, events: int) -> Any:
    async def trigger() -> None:
        control = await websockets.connect(url.replace("/ws", "/control"), compression=None)
        await control.recv()
        await control.send(f"fanout {events}")
        pending.append(asyncio.ensure_future(control.recv()))  # "done", once all are sent

    return trigger
