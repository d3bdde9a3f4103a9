"""Running the gateway as a service: what ``wsgate serve`` does, for embedding too.

:func:`run` sets up logging and the collector, serves until SIGTERM or SIGINT,
then drains (a second signal stops without waiting), and returns the exit
status: 0, or 2 after printing each start-up problem on one line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial

import trio

from .agent import Agent
from .config import Settings
from .errors import ConfigError, StartupError, leaves
from .log import configure_logging
from .server import Gateway, serve
from .workers import supervise

BANNER = "=" * 72
log = logging.getLogger("wsgate.runner")


def run(settings: Settings, *, agent: Agent | None = None) -> int:
    """Serve ``settings`` (with ``agent``, if given) until a signal has drained it; with
    ``server.workers`` above 1, in that many processes (:mod:`wsgate.workers`)."""
    configure_logging(settings.log.level, settings.log.format)
    if settings.server.workers > 1:
        return supervise(settings, partial(run, agent=agent))
    tune_gc(settings.server.gc_threshold)
    failures: list[str] = []
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_run_server, settings, agent)
    except* StartupError as group:
        failures += [f"wsgate: {error}" for error in leaves(group)]
    except* ConfigError as group:
        failures += [
            f"wsgate: config: {problem}"
            for error in leaves(group)
            if isinstance(error, ConfigError)
            for problem in error.problems
        ]
    for failure in failures:
        print(failure, file=sys.stderr)
    return 2 if failures else 0


async def _run_server(settings: Settings, agent: Agent | None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return (exit status 0)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            gateway: Gateway = await nursery.start(partial(serve, settings, agent=agent))
            _print_banner(gateway)
            async for signum in signals:
                log.warning("%s received: draining", signal.Signals(signum).name)
                break
            with trio.CancelScope() as drain_scope:
                nursery.start_soon(_second_signal_stops, signals, drain_scope)
                await gateway.drain()
            nursery.cancel_scope.cancel()


#: A signal this soon after the first is the same request delivered twice (a service manager
#: signals every process of the group, and the workers' parent forwards it), not a second one.
DUPLICATE_SIGNAL_WINDOW = 1.0


async def _second_signal_stops(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    first = trio.current_time()
    async for _ in signals:
        if trio.current_time() - first < DUPLICATE_SIGNAL_WINDOW:
            continue
        log.warning("second signal: stopping without waiting for the drain")
        scope.cancel()
        return


def _print_banner(gateway: Gateway) -> None:
    settings = gateway.settings
    url = gateway.public_url()
    lines = [f"wsgate listening on {url}"]
    if gateway.admin_port is not None:
        admin = f"http://{settings.admin.host}:{gateway.admin_port}"
        lines.append(f"admin listener on {admin} (demo page: {admin}/demo)")
    if gateway.dev_tokens is not None:
        token = gateway.dev_tokens.mint("alice", ttl=3600)
        lines = [
            BANNER,
            f"  DEV MODE: tokens are signed with the dev key at {gateway.dev_tokens.path}",
            "  (wsgate token uses the same one, from any directory). Not for production.",
            BANNER,
            *lines,
            "token for 'alice' (1 hour; more with: wsgate token --sub NAME):",
            token,
            "connect, e.g.:",
            f"  npx wscat -c {url} -H 'Authorization: Bearer {token}'",
            "  or the Python client in the README",
            'then send: {"type":"user_message","text":"hi"}',
        ]
    print("\n".join(lines), flush=True)


def tune_gc(threshold: int) -> tuple[int, int, int]:
    """Set the young-generation GC threshold (0: leave it); returns the previous thresholds.

    Python's default (700) makes the collector walk every live connection's objects far
    more often than it finds garbage: seconds of collection while connections ramp up,
    and pauses of hundreds of milliseconds that every connection waits out.
    """
    previous = gc.get_threshold()
    if threshold:
        gc.set_threshold(threshold, previous[1], previous[2])
    return previous
