"""A reconnect wave: many sessions, each mid-run, lose their TCP connection at once and resume.

``wsgate serve`` (the demo agent, slow enough that every run is still going) takes
``count`` sessions; each starts a run, and the client cuts every connection
(no close frame). Then all of them resume at once on new connections. Reported:
the time until every one is recovered (its replay received), the server's CPU
per resume beside its CPU per plain connect (the same count of new connections
that only wait for ``session.ready``, measured first), and the resident memory a
detached session holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import websockets

from .servers import token


async def _open(url: str, auth: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(url, additional_headers=auth, compression=None, ping_interval=None)
    ready: dict[str, Any] = json.loads(await ws.recv())
    return ws, ready


async def _started(url: str, auth: dict[str, str]) -> tuple[dict[str, Any], int]:
    """A session with a run going, cut off: its ready and the last seq it saw."""
    ws, ready = await _open(url, auth)
    await ws.send(json.dumps({"type": "user_message", "text": "resume wave"}))
    started = json.loads(await ws.recv())
    ws.transport.abort()
    return ready, int(started["seq"])


async def _resumed(url: str, auth: dict[str, str], ready: dict[str, Any], last_seq: int) -> bool:
    ws, _ = await _open(url, auth)
    try:
        message = {
            "type": "session.resume",
            "session_id": ready["session_id"],
            "resume_token": ready["resume_token"],
            "last_seq": last_seq,
        }
        await ws.send(json.dumps(message))
        answer = json.loads(await ws.recv())
        return bool(answer["recovered"])
    finally:
        await ws.close()


async def _plain(url: str, auth: dict[str, str]) -> None:
    ws, _ = await _open(url, auth)
    await ws.close()


async def _wave(count: int, one: Any) -> tuple[list[Any], float]:
    limit = asyncio.Semaphore(200)  # the client's own sockets: no more handshakes at once than this

    async def bounded(i: int) -> Any:
        async with limit:
            return await one(i)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(count)))
    return list(results), time.perf_counter() - start


async def measure_resume(server: Any, count: int) -> dict[str, Any]:
    """``server`` (a benchmarks ``Server`` running wsgate with long runs) takes the wave."""
    auth = {"Authorization": f"Bearer {token('resume-bench')}"}
    url = server.url
    cpu = server.cpu_seconds()
    _, connect_s = await _wave(count, lambda i: _plain(url, auth))
    connect_cpu = server.cpu_seconds() - cpu
    await asyncio.sleep(1)
    before = server.rss_kib()
    sessions, _ = await _wave(count, lambda i: _started(url, auth))
    await asyncio.sleep(1)  # every drop noticed: the sessions are detached, their runs going on
    detached_kib = (server.rss_kib() - before) / count
    cpu = server.cpu_seconds()
    recovered, resume_s = await _wave(count, lambda i: _resumed(url, auth, *sessions[i]))
    resume_cpu = server.cpu_seconds() - cpu
    if not all(recovered):
        print(f"  resume: {count - sum(recovered)} of {count} not recovered", file=sys.stderr)
    return {
        "resume_sessions": count,
        "resume_recovered": sum(recovered),
        "resume_all_recovered_s": round(resume_s, 3),
        "resume_connect_wave_s": round(connect_s, 3),
        "resume_cpu_us_per_resume": round(resume_cpu / count * 1e6, 1),
        "resume_cpu_us_per_connect": round(connect_cpu / count * 1e6, 1),
        "resume_detached_kib_per_session": round(detached_kib, 2),
    }
