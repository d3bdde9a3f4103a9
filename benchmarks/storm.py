"""A reconnect storm: ``clients`` connections on one process, which is drained (SIGTERM) while
a new process already listens on the same port (SO_REUSEPORT); every client reconnects
after the hint of its 1001.

Counted: handshakes refused (no listener), ended with no answer (EOF), answered 503;
timed from the SIGTERM: when 99 % of the clients are admitted again (on the new process),
beside the largest hint; and the old process's CPU per session it closed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import websockets


class _Count(Counter[str]):
    """The clients' events; ``reached(n)`` once ``n`` clients are connected."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[int, asyncio.Event] = {}

    def connected(self) -> None:
        self["connected"] += 1
        event = self.waiting.pop(self["connected"], None)
        if event is not None:
            event.set()

    async def reached(self, count: int) -> None:
        if self["connected"] < count:
            await self.waiting.setdefault(count, asyncio.Event()).wait()


async def _client(
    url: str, headers: dict[str, str], events: _Count, back: list[float], t0: list[float]
) -> None:
    """Connect; when closed with 1001, wait out the hint and connect again (once admitted anew, stop)."""
    first = True
    while True:
        try:
            ws = await websockets.connect(
                url, additional_headers=headers, compression=None, ping_interval=None
            )
        except ConnectionRefusedError:
            events["refused"] += 1
            await asyncio.sleep(0.05)
            continue
        except websockets.InvalidStatus as refused:
            events[f"http_{refused.response.status_code}"] += 1
            await asyncio.sleep(float(refused.response.headers.get("Retry-After", "1")))
            continue
        except (websockets.InvalidMessage, EOFError, ConnectionError, OSError):
            events["eof"] += 1
            await asyncio.sleep(0.05)
            continue
        await ws.recv()  # session.ready
        if not first:
            back.append(time.monotonic() - t0[0])
            await ws.close()
            return
        first = False
        events.connected()
        try:
            while True:
                await ws.recv()  # session.draining, then the close
        except websockets.ConnectionClosed as closed:
            reason = closed.rcvd.reason if closed.rcvd is not None else ""
        match = re.search(r"reconnect after ([\d.]+) s", reason)
        hint = float(match.group(1)) if match else 0.0
        events["hint_max_ms"] = max(events["hint_max_ms"], int(hint * 1000))
        await asyncio.sleep(hint)


async def storm(old: Any, start_new: Any, clients: int, headers: dict[str, str]) -> dict[str, Any]:
    """``old`` (a benchmarks ``Server``) takes ``clients``; ``start_new()`` starts the process
    taking over its port; then ``old`` is drained."""
    events = _Count()
    back: list[float] = []
    t0 = [0.0]
    tasks = []
    for i in range(clients):
        tasks.append(asyncio.ensure_future(_client(old.url, headers, events, back, t0)))
        if i % 100 == 99:
            await events.reached(i - 99)  # a hundred handshakes in flight at most
    await events.reached(clients)
    new = start_new()
    try:
        cpu = [old.cpu_seconds()] * 2
        t0[0] = time.monotonic()
        old.proc.terminate()

        async def sample() -> None:  # the old process's CPU, read until it has exited
            while old.proc.poll() is None:
                try:
                    cpu[1] = old.cpu_seconds()
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    return
                await asyncio.sleep(0.02)

        sampler = asyncio.ensure_future(sample())
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        await sampler
        old.proc.wait(30)
    finally:
        new.stop()
    back.sort()
    return {
        "storm_clients": clients,
        "storm_failures": events["refused"] + events["eof"],
        "storm_refused": events["refused"],
        "storm_eof": events["eof"],
        "storm_503": events["http_503"],
        "storm_t99_s": round(back[int(len(back) * 0.99) - 1], 3) if back else None,
        "storm_t50_s": round(back[len(back) // 2], 3) if back else None,
        "storm_t_first_s": round(back[0], 3) if back else None,
        "storm_hint_max_s": events["hint_max_ms"] / 1000,
        "storm_old_cpu_us_per_session": round((cpu[1] - cpu[0]) / clients * 1e6, 1),
    }
