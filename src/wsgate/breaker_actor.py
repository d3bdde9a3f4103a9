"""The one breaker shared by all sessions, owned by one Trio task.

Sessions never touch the breaker's state: they ask the actor for a permit and
report the outcome over its channel, and may subscribe to its transitions.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque

import attrs
import trio

from .breaker import BreakerState, CircuitBreaker, Decision, Outcome, Transition

log = logging.getLogger("wsgate.breaker")


@attrs.frozen
class Permit:
    """Leave to make one call; report its outcome exactly once."""

    state: BreakerState
    issued_at: float


@attrs.frozen
class _Ask:
    reply: trio.MemorySendChannel[Permit | None]


@attrs.frozen
class _Report:
    permit: Permit
    outcome: Outcome
    finished_at: float


class BreakerActor:
    def __init__(self, breaker: CircuitBreaker | None = None, *, name: str = "auth service") -> None:
        self.name = name
        self._breaker = breaker or CircuitBreaker()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Ask | _Report](math.inf)
        self._subscribers: list[trio.MemorySendChannel[Transition]] = []
        self._waiting: deque[_Ask] = deque()
        self.stats: Counter[str] = Counter()

    @property
    def state(self) -> BreakerState:
        return self._breaker.state

    @property
    def in_flight(self) -> int:
        return self._breaker.in_flight

    def retry_after(self) -> float:
        return max(1.0, self._breaker.retry_after(trio.current_time()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the breaker until cancelled."""
        task_status.started()
        async for message in self._inbox:
            now = trio.current_time()
            if isinstance(message, _Ask):
                self._waiting.append(message)
            else:
                duration = message.finished_at - message.permit.issued_at
                transition = self._breaker.record(
                    message.outcome, duration, now, permitted_in=message.permit.state
                )
                if transition is not None:
                    self._publish(transition)
            self._answer_waiting(now)

    def _answer_waiting(self, now: float) -> None:
        while self._waiting:
            decision, transition = self._breaker.allow(now)
            if transition is not None:
                self._publish(transition)
            if decision is Decision.WAIT:
                return
            ask = self._waiting.popleft()
            self.stats["permitted" if decision is Decision.ALLOW else "rejected"] += 1
            permit = Permit(self._breaker.state, now) if decision is Decision.ALLOW else None
            try:
                ask.reply.send_nowait(permit)
            except (trio.BrokenResourceError, trio.WouldBlock):
                # The asker is gone: give the permit back.
                if permit is not None:
                    self._breaker.record(Outcome.ABANDONED, 0.0, now, permitted_in=permit.state)

    async def acquire(self) -> Permit | None:
        """A permit to call the service now, or None while the breaker refuses."""
        reply_send, reply_receive = trio.open_memory_channel[Permit | None](1)
        self._inbox_send.send_nowait(_Ask(reply_send))
        try:
            return await reply_receive.receive()
        except trio.Cancelled:
            # A permit may have arrived just as we were cancelled: give it back.
            try:
                permit = reply_receive.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                if permit is not None:
                    self.report(permit, Outcome.ABANDONED)
            raise
        finally:
            reply_receive.close()

    def report(self, permit: Permit, outcome: Outcome) -> None:
        """Report how a permitted call ended; safe to call from a cancelled task."""
        self._inbox_send.send_nowait(_Report(permit, outcome, trio.current_time()))

    def subscribe(self, buffer: int = 16) -> trio.MemoryReceiveChannel[Transition]:
        """Transitions from now on; a subscriber that falls behind misses some."""
        send, receive = trio.open_memory_channel[Transition](buffer)
        self._subscribers.append(send)
        return receive

    def _publish(self, transition: Transition) -> None:
        self.stats[f"transition.{transition.new.value}"] += 1
        log.warning(
            "%s breaker %s -> %s: %s",
            self.name,
            transition.old.value,
            transition.new.value,
            transition.reason,
            extra={
                "event": "breaker.transition",
                "outcome": transition.new.value,
                "reason": transition.reason,
            },
        )
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(transition)
            except trio.WouldBlock:
                pass
            except trio.BrokenResourceError:
                self._subscribers.remove(subscriber)
