"""The circuit breaker as a plain state machine (sans-IO: time is passed in).

closed: calls flow, at most ``max_concurrent_calls`` at a time (more wait for
a free slot, so a burst cannot send more calls than one window before the
first outcomes arrive); outcomes fill a count-based sliding window. Once the
window holds ``min_calls`` outcomes, a failure rate or a slow-call rate at or
above its threshold opens the breaker.
open: no call is permitted until ``open_wait`` has passed; then half-open.
half-open: ``half_open_calls`` probes are permitted. Any failed probe opens the
breaker again (for another ``open_wait``); when every probe has succeeded it
closes with an empty window. A probe given up without an outcome (its caller
was cancelled) frees its permit.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    #: The permitted call was abandoned (cancelled): it says nothing about the service.
    ABANDONED = "abandoned"


class Decision(enum.Enum):
    ALLOW = "allow"
    REJECT = "reject"
    WAIT = "wait"  # closed, but every call slot is taken: ask again when one frees


@attrs.frozen
class BreakerConfig:
    window: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    min_calls: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    failure_rate: float = attrs.field(default=0.5, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    slow_call_duration: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    slow_call_rate: float = attrs.field(
        default=1.0, validator=[attrs.validators.gt(0), attrs.validators.le(1)]
    )
    open_wait: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    half_open_calls: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    max_concurrent_calls: int = attrs.field(default=20, validator=attrs.validators.ge(1))


@attrs.frozen
class Transition:
    old: BreakerState
    new: BreakerState
    at: float
    #: Why, with the numbers (``failure rate 6/10 >= 0.5``), for the log line.
    reason: str = ""


class CircuitBreaker:
    """Decides whether a call may be made now, and learns from each outcome."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.state = BreakerState.CLOSED
        self.opened_at = 0.0
        # (failed, slow) per call, newest last
        self._window: deque[tuple[bool, bool]] = deque(maxlen=self.config.window)
        self._probes_issued = 0
        self._probes_succeeded = 0
        self.in_flight = 0

    def retry_after(self, now: float) -> float:
        """Seconds until a call may be permitted again (0 when it may be now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self.opened_at + self.config.open_wait - now)
        return 0.0

    def allow(self, now: float) -> tuple[Decision, Transition | None]:
        """May a call be made now? Also returns the transition this caused, if any."""
        transition = None
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.config.open_wait:
            transition = self._move(BreakerState.HALF_OPEN, now, f"{self.config.open_wait:g} s open")
        if self.state is BreakerState.CLOSED:
            if self.in_flight >= self.config.max_concurrent_calls:
                return Decision.WAIT, transition
            self.in_flight += 1
            return Decision.ALLOW, transition
        if self.state is BreakerState.HALF_OPEN and self._probes_issued < self.config.half_open_calls:
            self._probes_issued += 1
            self.in_flight += 1
            return Decision.ALLOW, transition
        return Decision.REJECT, transition

    def record(
        self, outcome: Outcome, duration: float, now: float, *, permitted_in: BreakerState
    ) -> Transition | None:
        """Learn from a call permitted while in state ``permitted_in``."""
        self.in_flight -= 1
        if self.state is BreakerState.HALF_OPEN and permitted_in is BreakerState.HALF_OPEN:
            if outcome is Outcome.ABANDONED:
                self._probes_issued -= 1
                return None
            if outcome is Outcome.FAILURE:
                return self._move(BreakerState.OPEN, now, "a probe failed")
            if duration >= self.config.slow_call_duration:
                return self._move(BreakerState.OPEN, now, f"a probe took {duration:.3g} s")
            self._probes_succeeded += 1
            if self._probes_succeeded >= self.config.half_open_calls:
                return self._move(BreakerState.CLOSED, now, f"{self._probes_succeeded} probes succeeded")
            return None
        if self.state is not BreakerState.CLOSED or permitted_in is not BreakerState.CLOSED:
            return None  # a late answer from an earlier state says nothing about now
        if outcome is Outcome.ABANDONED:
            return None
        self._window.append((outcome is Outcome.FAILURE, duration >= self.config.slow_call_duration))
        if len(self._window) < self.config.min_calls:
            return None
        calls = len(self._window)
        failures = sum(failed for failed, _ in self._window)
        slow = sum(is_slow for _, is_slow in self._window)
        config = self.config
        if failures / calls >= config.failure_rate:
            return self._move(
                BreakerState.OPEN, now, f"failure rate {failures}/{calls} >= {config.failure_rate:g}"
            )
        if slow / calls >= config.slow_call_rate:
            reason = (
                f"slow-call rate {slow}/{calls} >= {config.slow_call_rate:g}"
                f" (slow: {config.slow_call_duration:g} s or more)"
            )
            return self._move(BreakerState.OPEN, now, reason)
        return None

    def _move(self, new: BreakerState, now: float, reason: str) -> Transition:
        old, self.state = self.state, new
        if new is BreakerState.OPEN:
            self.opened_at = now
        if new is BreakerState.HALF_OPEN:
            self._probes_issued = self._probes_succeeded = 0
        if new is BreakerState.CLOSED:
            self._window.clear()
        return Transition(old, new, now, reason)
