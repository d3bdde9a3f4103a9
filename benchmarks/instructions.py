"""Instructions per handshake, wsgate against bare trio-websocket: the one number here
that does not move with the machine's load.

``python -m benchmarks.instructions [N]`` runs the in-process handshake loop of
:mod:`benchmarks.inprocess` under valgrind's cachegrind (no cache simulation),
once with ``N`` handshakes (default 200) and once with none, for each server,
and divides the difference by ``N``. Start-up, imports and the warm-up are in
both runs and cancel out. ``PYTHONHASHSEED`` is fixed, so a rerun on the same
code gives the same count to within a fraction of a percent. Time is a
different matter (see ``docs/performance.md``): wsgate touches more memory
per instruction than the bare server, so its time ratio runs higher.

Needs valgrind; without it, says so and exits. Takes about a minute and a half.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

SIDES = ("wsgate", "bare trio-websocket")


async def _run(side: str, count: int) -> None:
    from benchmarks.inprocess import _bare, _handshakes, bench_gateway

    async with bench_gateway() as (gateway, upgrade):
        handler = gateway.connections.handle_stream if side == "wsgate" else _bare
        await _handshakes(handler, 50, upgrade)  # warm-up, in both runs
        await _handshakes(handler, count, upgrade)


def total_instructions(cachegrind_output: str) -> int:
    """The ``I refs`` total from cachegrind's summary."""
    match = re.search(r"I\s+refs:\s+([\d,]+)", cachegrind_output)
    if match is None:
        raise ValueError("no instruction count in cachegrind's output")
    return int(match.group(1).replace(",", ""))


def _count(side: str, handshakes: int) -> int:
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            side,
            str(handshakes),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return total_instructions(result.stderr)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        import trio

        trio.run(_run, sys.argv[2], int(sys.argv[3]))
        return
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction counts (apt install valgrind)")
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    per: dict[str, float] = {}
    for side in SIDES:
        print(f"  {side}: counting {count} handshakes under cachegrind ...", flush=True)
        per[side] = (_count(side, count) - _count(side, 0)) / count
    wsgate, bare = per["wsgate"], per["bare trio-websocket"]
    print(f"instructions per handshake: wsgate {wsgate / 1e6:.2f} M, bare trio-websocket {bare / 1e6:.2f} M")
    print(f"ratio {wsgate / bare:.2f}")


if __name__ == "__main__":
    main()
