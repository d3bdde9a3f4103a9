"""Users are isolated: one hub per user, holding that user's sessions only.

A connection takes a lease at admission (so limits hold even for handshakes
racing each other), attaches its session once upgraded, and releases the lease
when it ends; the hub goes away with its user's last lease. A lease is a
context manager, entered the moment it is taken (``holder.take(
registry.lease(key))``), so nothing can come between taking it and the code
that gives it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio

from .errors import TooManyRequests

if TYPE_CHECKING:
    from .session import Session

UserKey = tuple[str | None, str]


class Hub:
    """The sessions of one user."""

    __slots__ = ("key", "leases", "sessions")

    def __init__(self, key: UserKey) -> None:
        self.key = key
        self.sessions: set[Session] = set()
        self.leases = 0


class Lease:
    """One connection's place in the registry, from admission to close: counted from
    when it is entered (``with``, or a :class:`LeaseHolder`) until it is left or released."""

    __slots__ = ("_hub", "_key", "_on_release", "_registry", "_session")

    def __init__(self, registry: Registry, key: UserKey) -> None:
        self._registry = registry
        self._key = key
        self._hub: Hub | None = None
        self._session: Session | None = None
        self._on_release: Callable[[], None] | None = None

    def on_release(self, give_back: Callable[[], None]) -> None:
        """Call ``give_back`` when this lease is released (the cluster's place it holds)."""
        self._on_release = give_back

    def __enter__(self) -> Lease:
        self._hub = self._registry._take(self._key)
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def attach(self, session: Session) -> None:
        assert self._hub is not None, "attach to an entered lease"
        self._session = session
        self._hub.sessions.add(session)

    def release(self) -> None:
        hub, self._hub = self._hub, None
        if hub is None:
            return
        if self._session is not None:
            hub.sessions.discard(self._session)
        self._registry._release(hub)
        give_back, self._on_release = self._on_release, None
        if give_back is not None:
            give_back()


class LeaseHolder:
    """What a connection holds from admission on: :meth:`take` enters the lease the moment
    it is given one, and leaving the holder's ``with`` block gives it back. One slot, not
    an ``ExitStack`` (a kilobyte per idle connection)."""

    __slots__ = ("lease",)

    def __init__(self) -> None:
        self.lease: Lease | None = None

    def take(self, lease: Lease) -> Lease:
        assert self.lease is None, "a connection holds one lease"
        self.lease = lease.__enter__()
        return self.lease

    def __enter__(self) -> LeaseHolder:
        return self

    def __exit__(self, *_: object) -> None:
        if self.lease is not None:
            self.lease.release()


def _nothing(key: UserKey) -> None:
    pass


class Registry:
    def __init__(
        self,
        *,
        per_user: int,
        total: int,
        on_open: Callable[[UserKey], None] = _nothing,
        on_close: Callable[[UserKey], None] = _nothing,
    ) -> None:
        """``on_open`` and ``on_close``: told when a user's first connection here is admitted
        and when its last is gone (the broker follows the user's pushes in between)."""
        self._on_open = on_open
        self._on_close = on_close
        self._hubs: dict[UserKey, Hub] = {}
        self._per_user = per_user
        self._total = total
        self._leases = 0
        self._empty = trio.Event()
        self._empty.set()

    def __len__(self) -> int:
        """Connections admitted and not yet released."""
        return self._leases

    @property
    def users(self) -> int:
        return len(self._hubs)

    def lease(self, key: UserKey, retry_after: float = 1.0) -> Lease:
        """A place for one more connection of ``key``, or :class:`TooManyRequests`. It
        counts once entered: enter it at once (``with``, or a :class:`LeaseHolder`); nothing
        may wait in between, or two handshakes could both take the last place."""
        if self._leases >= self._total:
            raise TooManyRequests("too many connections on this server", retry_after=retry_after)
        hub = self._hubs.get(key)
        if hub is not None and hub.leases >= self._per_user:
            raise TooManyRequests("too many connections for this user", retry_after=retry_after)
        return Lease(self, key)

    def _take(self, key: UserKey) -> Hub:
        hub = self._hubs.get(key)
        if hub is None:
            self._on_open(key)  # first: if it fails, nothing here has changed
            hub = self._hubs[key] = Hub(key)
        if self._leases == 0:
            self._empty = trio.Event()
        hub.leases += 1
        self._leases += 1
        return hub

    def _release(self, hub: Hub) -> None:
        hub.leases -= 1
        self._leases -= 1
        if hub.leases == 0:
            del self._hubs[hub.key]
        if self._leases == 0:
            self._empty.set()
        if hub.leases == 0:
            self._on_close(hub.key)  # last: if it fails, the counts are already right

    async def wait_empty(self) -> None:
        """Return once no connection holds a lease."""
        await self._empty.wait()

    def sessions_of(self, key: UserKey) -> list[Session]:
        hub = self._hubs.get(key)
        return list(hub.sessions) if hub is not None else []

    def all_sessions(self) -> Iterator[Session]:
        for hub in list(self._hubs.values()):
            yield from list(hub.sessions)
