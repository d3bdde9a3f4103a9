"""A failure raised at each step of admission and session start leaves nothing behind.

A trace function raises :class:`Fault` at the N-th step, a step being a call of a
function of the server's modules (a coroutine's start, not its resumptions: a real
failure arises in the innermost frame, and raising in an outer frame that is being
resumed would corrupt Trio's own bookkeeping), from the moment a client connects
until its ``session.ready`` arrives, for every N of a clean run. After each,
once the connection has ended: no lease, hub entry, pending handshake or open
connection in the metrics is left, and the gateway admits the next client.

How it proves itself: make ``Registry.lease`` count the lease before constructing
the :class:`~wsgate.registry.Lease` (or take a lease without entering it into the
connection's lease holder) and this test fails at the step that falls in between.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest
import trio
import trio.testing

from conftest import gateway_state
from wsgate.testing import GatewayHarness, open_harness, settings_for_tests

SERVER_MODULES = (
    "wsgate.auth.authenticator",
    "wsgate.auth.keys",
    "wsgate.auth.policy",
    "wsgate.auth.sources",
    "wsgate.auth.tokens",
    "wsgate.cluster.broker",
    "wsgate.connection",
    "wsgate.handshake",
    "wsgate.protocol",
    "wsgate.ratelimit",
    "wsgate.registry",
    "wsgate.server",
    "wsgate.session.core",
    "wsgate.session.effects",
    "wsgate.session.lifecycle",
    "wsgate.session.messages",
    "wsgate.session.outbound",
    "wsgate.session.sessions",
    "wsgate.session.shell",
    "wsgate.streams",
    "wsgate.wsconn",
)
#: What gives a lease or a pending place back, and the shell around the connection's own
#: error boundary: a fault there is not a step of admission but a fault of the mechanism.
NOT_STEPS = {"__exit__", "release", "_release", "Gateway.handle_stream"}


class Fault(Exception):
    """The failure injected."""


class Injector:
    """A trace function counting steps in the server's modules; raises at step ``at``."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.steps = 0
        self.fired: str | None = None
        self._entered_handle_stream = False
        self._frames: set[FrameType] = set()  # held for the window: a frame seen is a resumption

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or self.fired is not None or frame in self._frames:
            return None
        self._frames.add(frame)
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_qualname
        if module not in SERVER_MODULES or frame.f_code.co_name in NOT_STEPS or name in NOT_STEPS:
            return None
        if name == "ConnectionServer.handle_stream" and not self._entered_handle_stream:
            self._entered_handle_stream = True  # its entry is before its own error boundary
            return None
        self.steps += 1
        if self.steps == self.at:
            self.fired = f"{module}.{name}"
            raise Fault(f"injected at step {self.at}: {self.fired}")
        return None


async def connect_once(h: GatewayHarness, injector: Injector) -> bool:
    """One client, from connecting to its session.ready, with ``injector`` tracing."""
    previous = sys.gettrace()
    sys.settrace(injector)
    try:
        async with h.connect(h.token("alice")) as client:
            ready: str = (await client.receive_json())["type"]
            return ready == "session.ready"
    except Exception:
        return False  # the fault ended the connection, one way or another
    finally:
        sys.settrace(previous)


async def steps_of_a_clean_handshake() -> int:
    async with open_harness(settings_for_tests()) as h:
        injector = Injector(at=None)
        assert await connect_once(h, injector)
        return injector.steps


STEPS = trio.run(steps_of_a_clean_handshake, clock=trio.testing.MockClock(autojump_threshold=0))


async def fault_at(step: int) -> tuple[Injector, dict[str, Any], dict[str, Any], bool]:
    async with open_harness(settings_for_tests()) as h:
        before = gateway_state(h)
        injector = Injector(at=step)
        await connect_once(h, injector)
        with trio.fail_after(120):
            await h.gateway.registry.wait_empty()
            await trio.testing.wait_all_tasks_blocked()
        after = gateway_state(h)
        async with h.connect(h.token("bob")) as client:
            served = (await client.receive_json())["type"] == "session.ready"
        return injector, before, after, served


def test_a_handshake_has_steps_to_fail_at() -> None:
    assert STEPS > 50  # the injector sees the server's code (not, say, only the client's)


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_fault_at_each_step_leaves_nothing_behind(step: int) -> None:
    injector, before, after, served = trio.run(
        fault_at, step, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    # Trio runs ready tasks in a deliberately varied order, so a run may have a step or
    # two fewer than the clean one counted: then there was no such step to fail at.
    assert injector.fired is not None or injector.steps < step
    assert after == before, injector.fired
    assert served, injector.fired


def test_every_module_named_is_a_module_of_code() -> None:
    """A module renamed or moved must not drop out of the fault injection unnoticed."""
    import importlib
    from pathlib import Path

    for name in SERVER_MODULES:
        module = importlib.import_module(name)
        assert module.__file__ is not None and Path(module.__file__).name != "__init__.py", name
