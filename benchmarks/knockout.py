"""What the parts of a wsgate handshake cost: instructions per handshake with a part taken out.

``python -m benchmarks.knockout [N]`` counts instructions per handshake, as
:mod:`benchmarks.instructions` does, for bare trio-websocket, for wsgate as
it is, and for wsgate with parts of a session replaced by the least that
still answers the handshake:

- ``no watchdog``: the session starts no watchdog task;
- ``no writer``: no writer task; the session's own task writes ``session.ready``;
- ``no watchdog or writer``: neither of the two;
- ``no session nursery``: no nursery, so neither task: the session's own task
  writes ``session.ready``, reads until the client closes, and closes;
- ``no verification``: each token is verified once, then its identity comes
  from a cache;
- ``neither``: no session nursery and no verification.

These variants exist only to be measured: they drop what the design asks of
a session (its timers, its bounded queue and writer) and never serve anyone.
Each part's cost is its variant's difference from wsgate as it is; the
output also gives the extra cost that a handshake rate of 0.85x bare
trio-websocket would leave room for, if time followed instructions. Needs
valgrind; takes about five minutes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from benchmarks.inprocess import _bare, _handshakes, bench_gateway
from benchmarks.instructions import cachegrind, have_valgrind
from wsgate.errors import CloseCode
from wsgate.protocol import encode
from wsgate.session import _WATCHDOG, _WRITER, Session
from wsgate.tokens import Identity, TokenSource, TokenVerifier
from wsgate.wsconn import send_texts

VARIANTS = {
    "wsgate": "",
    "no watchdog": "watchdog",
    "no writer": "writer",
    "no watchdog or writer": "watchdog+writer",
    "no session nursery": "nursery",
    "no verification": "verify",
    "neither": "nursery+verify",
}
TARGET = 0.85
MODULE = "benchmarks.knockout"


async def _write_ready(session: Session) -> None:
    await send_texts(session.ws, [encode({**session._ready_message(), "seq": 1})])


def _without_tasks(*, watchdog: bool, writer: bool) -> Callable[[Session], Coroutine[Any, Any, None]]:
    """``Session.run`` without the watchdog task, the writer task, or both."""

    async def run(self: Session) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if writer:
                    nursery.start_soon(self._writer, name=_WRITER)
                    await self.send(self._ready_message())
                else:
                    await _write_ready(self)
                if watchdog:
                    nursery.start_soon(self._watchdog, nursery, name=_WATCHDOG)
                await self._reader(nursery)
                self._wind_down(nursery)
        except Exception:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        await self._finish()

    return run


async def _without_nursery(self: Session) -> None:
    await _write_ready(self)
    await self._reader(None)  # type: ignore[arg-type]  # no client message needs it here
    await self._finish()


def knock_out(parts: str, patch: Callable[[object, str, object], None] = setattr) -> None:
    """Replace the parts named in ``parts`` (joined by '+') through ``patch`` (a test passes
    one that is undone afterwards; here, for the rest of this process)."""
    names = set(filter(None, parts.split("+")))
    if "nursery" in names:
        patch(Session, "run", _without_nursery)
    elif names & {"watchdog", "writer"}:
        patch(Session, "run", _without_tasks(watchdog="watchdog" not in names, writer="writer" not in names))
    if "verify" in names:
        verify = TokenVerifier.verify
        cache: dict[str, Identity] = {}

        def cached(self: TokenVerifier, token: str, now: float, source: TokenSource) -> Identity:
            if token not in cache:
                cache[token] = verify(self, token, now, source)
            return cache[token]

        patch(TokenVerifier, "verify", cached)


async def serve_handshakes(variant: str, count: int) -> None:
    """``count`` handshakes (after 50 to warm up) with ``variant``; raises unless every one
    was admitted and closed normally, so that nothing is measured that did not serve."""
    async with bench_gateway() as (gateway, upgrade):
        handler = _bare if variant == "bare" else gateway.connections.handle_stream
        await _handshakes(handler, 50, upgrade)
        await _handshakes(handler, count, upgrade)
        if variant != "bare":
            served = {key: gateway.stats[key] for key in ("handshake.admitted", "close.1000")}
            if set(served.values()) != {50 + count} or gateway.stats["connection.bug"]:
                raise RuntimeError(f"{variant}: {served}, {gateway.stats['connection.bug']} failed")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        variant = sys.argv[2]
        if variant != "bare":
            knock_out(VARIANTS[variant])
        trio.run(serve_handshakes, variant, int(sys.argv[3]))
        return
    if not have_valgrind():
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    per: dict[str, float] = {}
    for variant in ("bare", *VARIANTS):
        print(f"  {variant}: counting {count} handshakes under cachegrind ...", flush=True)
        spent = cachegrind(MODULE, variant, str(count)) - cachegrind(MODULE, variant, "0")
        per[variant] = spent / count
    bare, ours = per["bare"], per["wsgate"]
    print(f"\ninstructions per handshake: bare trio-websocket {bare / 1e3:,.0f} k,", end="")
    print(f" wsgate {ours / 1e3:,.0f} k")
    for variant in VARIANTS:
        if variant != "wsgate":
            saved = ours - per[variant]
            print(f"  {variant:<24} {per[variant] / 1e3:8,.0f} k   saves {saved / 1e3:6,.0f} k")
    room = bare * (1 / TARGET - 1)
    print(
        f"{TARGET}x bare leaves room for {room / 1e3:,.0f} k more than bare; wsgate spends"
        f" {(ours - bare) / 1e3:,.0f} k more, of which the session nursery with its two tasks and"
        f" verification are {(ours - per['neither']) / 1e3:,.0f} k"
    )


if __name__ == "__main__":
    main()
