"""The auth-service path: handshakes with introspection (cold and warm cache), and the
outage run: clients connecting while the auth service goes down and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import websockets

from .servers import token


class FakeAuth:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate.testing.fakeauth"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        match = re.search(r"on (http://\S+)", self.proc.stdout.readline())
        assert match, "fake auth service did not start"
        self.url = match.group(1)

    def control(self, **change: Any) -> dict[str, Any]:
        result: dict[str, Any] = httpx.post(f"{self.url}/_control", json=change, timeout=5).json()
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def handshake_rate(url: str, tokens: list[str], concurrency: int) -> float:
    queue = list(tokens)
    start = time.monotonic()

    async def worker() -> None:
        while queue:
            tok = queue.pop()
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
                await ws.recv()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(tokens) / (time.monotonic() - start)


async def auth_path(wsgate_url: str, quick: bool) -> dict[str, float]:
    count = 300 if quick else 3000
    cold = await handshake_rate(wsgate_url, [token("cold", f"c{i}") for i in range(count)], 8)
    warm_token = token("warm", "w")
    warm = await handshake_rate(wsgate_url, [warm_token] * count, 8)
    return {"cold_cache": cold, "warm_cache": warm}


ADMIN_API_KEY = "benchmark-admin-api-key"


class Held:
    """One admitted client of the outage run and everything it received."""

    def __init__(self, subject: str, ws: Any, ready: dict[str, Any]) -> None:
        self.subject = subject
        self.ws = ws
        self.messages: list[dict[str, Any]] = [ready]
        self.completed = asyncio.Event()

    async def read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                message = json.loads(raw)
                self.messages.append(message)
                if message.get("type") == "agent_completed":
                    self.completed.set()

    def seq_gaps(self) -> int:
        """Messages missing between the first and the last one received (by ``seq``)."""
        seqs = [m["seq"] for m in self.messages if "seq" in m]
        return sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1)


async def outage(
    wsgate_url: str, admin_url: str, fake: FakeAuth, clients: int, down_for: float
) -> dict[str, Any]:
    """Clients connect at a steady pace for 3 * down_for seconds; the service is down in the
    middle third. Events are published to every admitted user while it is down and after it
    is back, and every admitted client runs the agent once at the end: what the gateway
    acknowledged (queued) must arrive, with ``seq`` unbroken."""
    outcomes: Counter[str] = Counter()
    closes: Counter[int] = Counter()
    latencies: list[tuple[float, float]] = []
    held: list[Held] = []
    readers: list[asyncio.Task[None]] = []
    published = {"acknowledged": 0}
    span = 3 * down_for
    start = time.monotonic()
    calls_before = fake.control()["calls"]

    async def client(i: int) -> None:
        await asyncio.sleep(span * i / clients)
        began = time.monotonic()
        try:
            ws = await websockets.connect(
                wsgate_url,
                additional_headers={"Authorization": f"Bearer {token(f'u{i}', str(i))}"},
                open_timeout=20,
            )
            ready = json.loads(await ws.recv())
            outcomes["degraded" if ready.get("degraded") else "admitted"] += 1
            one = Held(f"u{i}", ws, ready)
            held.append(one)
            readers.append(asyncio.create_task(one.read()))
        except websockets.InvalidStatus as exc:
            outcomes[f"rejected {exc.response.status_code}"] += 1
        except (OSError, TimeoutError, websockets.WebSocketException):
            outcomes["failed"] += 1
        latencies.append((began - start, time.monotonic() - began))

    async def publish_round(http: httpx.AsyncClient, label: str) -> None:
        async def one(subject: str) -> None:
            reply = await http.post(
                f"{admin_url}/publish",
                json={"subject": subject, "event": {"round": label}},
                headers={"Authorization": f"Bearer {ADMIN_API_KEY}"},
            )
            published["acknowledged"] += int(reply.json()["delivered"])

        subjects = [h.subject for h in held]
        for i in range(0, len(subjects), 16):
            await asyncio.gather(*(one(subject) for subject in subjects[i : i + 16]))

    revalidated_after: float | None = None

    async def script() -> None:
        nonlocal revalidated_after
        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.sleep(down_for)
            fake.control(mode="down")
            await asyncio.sleep(down_for / 2)
            await publish_round(http, "down")
            await asyncio.sleep(max(0.0, start + 2 * down_for - time.monotonic()))
            fake.control(mode="up")
            recovered_at = time.monotonic()
            while outcomes["degraded"] and time.monotonic() - recovered_at < 60:
                # How long until no session is degraded any more.
                text = (await http.get(f"{admin_url}/metrics")).text
                match = re.search(r'wsgate_connections_open\{outcome="degraded"\} ([0-9.]+)', text)
                if match and float(match.group(1)) == 0:
                    revalidated_after = time.monotonic() - recovered_at
                    break
                await asyncio.sleep(0.1)
            await publish_round(http, "recovered")

    await asyncio.gather(script(), *(client(i) for i in range(clients)))
    calls = fake.control()["calls"] - calls_before
    for one in held:
        if one.ws.close_code is not None:
            closes[one.ws.close_code] += 1
    open_ones = [one for one in held if one.ws.close_code is None]
    for one in open_ones:
        with contextlib.suppress(websockets.ConnectionClosed):
            await one.ws.send(json.dumps({"type": "user_message", "text": "still there?"}))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(one.completed.wait() for one in open_ones))
    await asyncio.gather(*(one.ws.close() for one in held), return_exceptions=True)
    for reader in readers:
        reader.cancel()
    received = sum(1 for one in held for m in one.messages if m.get("type") == "event")
    latencies.sort()
    return {
        "clients": clients,
        "outcomes": dict(outcomes),
        "auth_calls": calls,
        "close_codes_before_end": dict(closes),
        "closed_1011": closes.get(1011, 0),
        "degraded_revalidated_after_s": revalidated_after,
        "events_acknowledged": published["acknowledged"],
        "events_received": received,
        "runs_started": len(open_ones),
        "runs_completed": sum(one.completed.is_set() for one in open_ones),
        "seq_gaps": sum(one.seq_gaps() for one in held),
        "handshake_p99_s": sorted(d for _, d in latencies)[int(len(latencies) * 0.99) - 1]
        if latencies
        else None,
        "latency_over_time": latencies,
    }
