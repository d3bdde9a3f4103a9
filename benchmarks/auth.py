"""The auth-service path: handshakes with introspection (cold and warm cache), and the
outage run: clients connecting while the auth service goes down and comes back."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import jwt
import websockets

from .servers import AUDIENCE, ISSUER, SECRET


class FakeAuth:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate.fakeauth"],
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


def token(subject: str, jti: str) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600, "jti": jti}
    return jwt.encode(claims, SECRET, algorithm="HS256")


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


async def outage(
    wsgate_url: str, admin_url: str, fake: FakeAuth, clients: int, down_for: float
) -> dict[str, Any]:
    """Clients connect at a steady pace for 3 * down_for seconds; the service is down in the middle third."""
    outcomes: Counter[str] = Counter()
    closes: Counter[int] = Counter()
    latencies: list[tuple[float, float]] = []
    held: list[Any] = []
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
            ready = await ws.recv()
            outcomes["degraded" if '"degraded":true' in str(ready) else "admitted"] += 1
            held.append(ws)
        except websockets.InvalidStatus as exc:
            outcomes[f"rejected {exc.response.status_code}"] += 1
        except (OSError, TimeoutError, websockets.WebSocketException):
            outcomes["failed"] += 1
        latencies.append((began - start, time.monotonic() - began))

    revalidated_after: float | None = None

    async def script() -> None:
        nonlocal revalidated_after
        await asyncio.sleep(down_for)
        fake.control(mode="down")
        await asyncio.sleep(down_for)
        fake.control(mode="up")
        recovered_at = time.monotonic()
        async with httpx.AsyncClient() as http:  # how long until no session is degraded
            while time.monotonic() - recovered_at < 60:
                text = (await http.get(f"{admin_url}/metrics")).text
                match = re.search(r'wsgate_connections_open\{outcome="degraded"\} ([0-9.]+)', text)
                if match and float(match.group(1)) == 0 and outcomes["degraded"]:
                    revalidated_after = time.monotonic() - recovered_at
                    return
                await asyncio.sleep(0.1)

    await asyncio.gather(script(), *(client(i) for i in range(clients)))
    calls = fake.control()["calls"] - calls_before
    for ws in held:
        if ws.close_code is not None:
            closes[ws.close_code] += 1
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    latencies.sort()
    return {
        "clients": clients,
        "outcomes": dict(outcomes),
        "auth_calls": calls,
        "close_codes_before_end": dict(closes),
        "closed_1011": closes.get(1011, 0),
        "degraded_revalidated_after_s": revalidated_after,
        "handshake_p99_s": sorted(d for _, d in latencies)[int(len(latencies) * 0.99) - 1]
        if latencies
        else None,
        "latency_over_time": latencies,
    }
