"""Server-only instructions per handshake and per round trip, over real sockets.

``python -m benchmarks.server_instructions [N]``: each server runs under valgrind's
cachegrind (no cache simulation) in its own process while this process, the
client, does ``N`` handshakes (default 200: connect, read the ready message,
close) or ``5 N`` round trips on one connection; once with none, to subtract
start-up and shutdown. Only the server's instructions count: the client's cost,
and the machine's load, are not in the figure. Servers: wsgate (``--app noop``),
bare trio-websocket, websockets on Trio and websockets on asyncio (both with
pyjwt verifying the token, as wsgate does). Takes a few minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import websockets

from .instructions import have_valgrind, total_instructions
from .servers import token

ROOT = Path(__file__).resolve().parent.parent

SERVERS: dict[str, list[str]] = {
    "wsgate": ["-m", "wsgate", "serve", "--port", "0", "--app", "noop"],
    "bare trio-websocket": ["-m", "benchmarks.servers", "bare"],
    "websockets.trio + pyjwt": ["-m", "benchmarks.servers", "peer-trio"],
    "websockets asyncio + pyjwt": ["-m", "benchmarks.servers", "peer"],
}


async def _handshakes(url: str, count: int) -> None:
    auth = {"Authorization": f"Bearer {token('instr')}"}
    for _ in range(count):
        async with websockets.connect(url, additional_headers=auth, compression=None) as ws:
            await ws.recv()


async def _round_trips(url: str, count: int, wsgate: bool) -> None:
    auth = {"Authorization": f"Bearer {token('instr')}"}
    message = json.dumps({"type": "ping"}) if wsgate else '"ping"'
    async with websockets.connect(url, additional_headers=auth, compression=None) as ws:
        await ws.recv()
        for _ in range(count):
            await ws.send(message)
            await ws.recv()


def _server_instructions(name: str, what: str, count: int) -> int:
    from .__main__ import WSGATE_ENV

    env = {**os.environ, **WSGATE_ENV, "PYTHONHASHSEED": "0", "WSGATE_SERVER__HEARTBEAT_INTERVAL": "0"}
    proc = subprocess.Popen(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable]
        + SERVERS[name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    port = None
    while port is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"{name} did not start under valgrind: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
            )
        match = re.search(r"port (\d+)|listening on ws://[^:]+:(\d+)", line)
        if match:
            port = int(match.group(1) or match.group(2))
    url = f"ws://127.0.0.1:{port}/ws"
    if what == "handshakes":
        asyncio.run(_handshakes(url, count))
    else:
        asyncio.run(_round_trips(url, count, name == "wsgate"))
    proc.terminate()
    _, err = proc.communicate(timeout=300)
    return total_instructions(err)


def measure(count: int) -> dict[str, dict[str, float]]:
    """{metric: {server: instructions}} for handshakes and round trips."""
    out: dict[str, dict[str, float]] = {
        "server_instructions_per_handshake": {},
        "server_instructions_per_round_trip": {},
    }
    for name in SERVERS:
        base = _server_instructions(name, "handshakes", 0)
        shakes = _server_instructions(name, "handshakes", count)
        trips = _server_instructions(name, "round_trips", 5 * count)
        handshake = (shakes - base) / count
        out["server_instructions_per_handshake"][name] = round(handshake)
        # A round-trip run holds one connection (one handshake) besides its messages.
        out["server_instructions_per_round_trip"][name] = round((trips - base - handshake) / (5 * count))
        print(
            f"  {name}: {handshake / 1000:,.0f} k per handshake,"
            f" {out['server_instructions_per_round_trip'][name] / 1000:,.0f} k per round trip",
            flush=True,
        )
    return out


def main() -> None:
    if not have_valgrind():
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    results = measure(count)
    for metric, by in results.items():
        bare = by["bare trio-websocket"]
        print(
            metric
            + ": "
            + ", ".join(
                f"{name} {value / 1000:,.0f} k ({value / bare:.2f}x bare)" for name, value in by.items()
            )
        )


def as_results(count: int) -> dict[str, Any]:
    return measure(count) if have_valgrind() else {}


if __name__ == "__main__":
    main()
