"""Instructions per handshake and per message, wsgate against bare trio-websocket: the
numbers here that do not move with the machine's load.

``python -m benchmarks.instructions [N]`` runs the in-process loops of
:mod:`benchmarks.inprocess` under valgrind's cachegrind (no cache simulation),
once with ``N`` handshakes (default 200) and once with none, for each server,
and divides the difference by ``N``; then the same for messages on one
connection, as ``N`` / 4 batches of 50 pipelined pings and as 5 x ``N`` pings
each answered before the next is sent, divided by the number of messages.
Start-up, imports and the warm-up are in both runs and cancel out.
``PYTHONHASHSEED`` is fixed, so a rerun on the same code gives the same count
to within about 1%. Time is a different matter (see
``docs/performance.md``): wsgate touches more memory per instruction than the
bare server, so its time ratio runs higher.

Needs valgrind; without it, says so and exits. Takes about four minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import trio

from benchmarks.inprocess import BATCH, bare_server, bench_gateway, handshakes_over, messages_over

SIDES = ("wsgate", "bare trio-websocket")


async def _run(side: str, what: str, count: int) -> None:
    async with bench_gateway() as (gateway, upgrade):
        handler = gateway.connections.handle_stream if side == "wsgate" else bare_server
        await handshakes_over(handler, 50, upgrade)  # warm-up, in both runs
        if what == "handshakes":
            await handshakes_over(handler, count, upgrade)
        else:
            reply = b'"pong"' if side == "wsgate" else b'"ping"'
            await messages_over(handler, count, upgrade, reply, BATCH if what == "pipelined" else 1)


def total_instructions(cachegrind_output: str) -> int:
    """The ``I refs`` total from cachegrind's summary."""
    match = re.search(r"I\s+refs:\s+([\d,]+)", cachegrind_output)
    if match is None:
        raise ValueError("no instruction count in cachegrind's output")
    return int(match.group(1).replace(",", ""))


def cachegrind(module: str, *args: str) -> int:
    """Instructions that ``python -m module --child *args`` executes under cachegrind."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-m",
            module,
            "--child",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return total_instructions(result.stderr)


def have_valgrind() -> bool:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction counts (apt install valgrind)")
        return False
    return True


def _count(side: str, what: str, count: int) -> int:
    return cachegrind("benchmarks.instructions", side, what, str(count))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        trio.run(_run, sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if not have_valgrind():
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    measures = (
        ("handshakes", "handshake", count, 1),
        ("pipelined", f"message, {BATCH} pipelined", max(count // 4, 1), BATCH),
        ("one at a time", "message answered before the next is sent", count * 5, 1),
    )
    for what, unit, runs, per_run in measures:
        per: dict[str, float] = {}
        for side in SIDES:
            print(f"  {side}: counting {runs * per_run} {what} under cachegrind ...", flush=True)
            per[side] = (_count(side, what, runs) - _count(side, what, 0)) / (runs * per_run)
        wsgate, bare = per["wsgate"], per["bare trio-websocket"]
        print(
            f"instructions per {unit}: wsgate {wsgate / 1e3:,.0f} k,"
            f" bare trio-websocket {bare / 1e3:,.0f} k, ratio {wsgate / bare:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
