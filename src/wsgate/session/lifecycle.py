"""A live connection's token lifecycle, as a plain object (sans-IO: time passed in).

Times are wall-clock epoch seconds, like the token's ``exp``. The session's
watchdog task sleeps until :meth:`TokenLifecycle.next_deadline`, then acts on
:meth:`TokenLifecycle.due`; a refresh moves the deadline.

The one rule for a refresh racing the expiry: a refresh counts only if it is
*decided* (verified and admitted) strictly before ``exp + grace``. At that
instant or later the connection is closed with 4401, even if a refresh is
still being verified.
"""

from __future__ import annotations

import enum

import attrs


class Action(enum.Enum):
    WARN = "warn"  # send auth.expiring
    EXPIRE = "expire"  # close 4401
    REVALIDATE = "revalidate"  # ask the auth service again


@attrs.frozen
class LifecycleConfig:
    #: Seconds before ``exp`` to warn; None: 60 s or 10 % of the lifetime, whichever is smaller.
    refresh_ahead: float | None = None
    grace: float = 0.0
    #: Seconds between re-checks with the auth service; None: never.
    revalidate_interval: float | None = None


class TokenLifecycle:
    __slots__ = ("_next_check", "_warn_at", "_warned", "config", "expires_at", "refreshes")

    def __init__(
        self, config: LifecycleConfig, expires_at: float, issued_at: float | None, now: float
    ) -> None:
        self.config = config
        self.expires_at = expires_at
        self._warn_at = self._warn_time(expires_at, issued_at, now)
        self._warned = False
        self._next_check = (
            now + config.revalidate_interval if config.revalidate_interval is not None else None
        )
        self.refreshes = 0

    def _warn_time(self, expires_at: float, issued_at: float | None, now: float) -> float:
        ahead = self.config.refresh_ahead
        if ahead is None:
            lifetime = expires_at - (issued_at if issued_at is not None else now)
            ahead = min(60.0, 0.1 * max(lifetime, 0.0))
        return expires_at - ahead

    @property
    def deadline(self) -> float:
        """When the connection is closed unless refreshed: ``exp + grace``."""
        return self.expires_at + self.config.grace

    def accepts_refresh(self, now: float) -> bool:
        """The racing rule: a refresh decided at ``now`` counts only before the deadline."""
        return now < self.deadline

    def next_deadline(self) -> float:
        """The earliest time at which something is due."""
        times = [self.deadline]
        if not self._warned:
            times.append(self._warn_at)
        if self._next_check is not None:
            times.append(self._next_check)
        return min(times)

    def due(self, now: float) -> list[Action]:
        """What to do now; each action is returned once per arming."""
        if now >= self.deadline:
            return [Action.EXPIRE]
        actions = []
        if not self._warned and now >= self._warn_at:
            self._warned = True
            actions.append(Action.WARN)
        if self._next_check is not None and now >= self._next_check:
            assert self.config.revalidate_interval is not None
            self._next_check = now + self.config.revalidate_interval
            actions.append(Action.REVALIDATE)
        return actions

    def on_refresh(self, expires_at: float, issued_at: float | None, now: float) -> None:
        """A refresh was accepted: re-arm the warning and move the deadline."""
        self.expires_at = expires_at
        self._warn_at = self._warn_time(expires_at, issued_at, now)
        self._warned = False
        self.refreshes += 1
