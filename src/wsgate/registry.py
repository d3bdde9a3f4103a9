"""Users are isolated: one hub per user, holding that user's sessions only.

A connection takes a lease at admission (so limits hold even for handshakes
racing each other), attaches its session once upgraded, and releases the lease
when it ends; the hub goes away with its user's last lease. A lease is a
context manager, entered the moment it is taken (``stack.enter_context(
registry.lease(key))``), so nothing can come between taking it and the code
that gives it back.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    """One connection's place in the registry, from admission to close; released on
    leaving its ``with`` block (or by :meth:`release`), once."""

    __slots__ = ("_hub", "_registry", "_released", "_session")

    def __init__(self, registry: Registry, hub: Hub) -> None:
        self._registry = registry
        self._hub = hub
        self._session: Session | None = None
        self._released = False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def attach(self, session: Session) -> None:
        self._session = session
        self._hub.sessions.add(session)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._session is not None:
            self._hub.sessions.discard(self._session)
        self._registry._release(self._hub)


class Registry:
    def __init__(self, *, per_user: int, total: int) -> None:
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
        """Reserve a connection for ``key`` or raise :class:`TooManyRequests`; enter the
        lease at once (``with``, or an exit stack) so that it is given back."""
        if self._leases >= self._total:
            raise TooManyRequests("too many connections on this server", retry_after=retry_after)
        hub = self._hubs.get(key)
        if hub is not None and hub.leases >= self._per_user:
            raise TooManyRequests("too many connections for this user", retry_after=retry_after)
        if hub is None:
            hub = self._hubs[key] = Hub(key)
        hub.leases += 1
        self._leases += 1
        if self._empty.is_set():
            self._empty = trio.Event()
        return Lease(self, hub)

    def _release(self, hub: Hub) -> None:
        hub.leases -= 1
        self._leases -= 1
        if hub.leases == 0:
            del self._hubs[hub.key]
        if self._leases == 0:
            self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no connection holds a lease."""
        await self._empty.wait()

    def sessions_of(self, key: UserKey) -> list[Session]:
        hub = self._hubs.get(key)
        return list(hub.sessions) if hub is not None else []

    def all_sessions(self) -> Iterator[Session]:
        for hub in list(self._hubs.values()):
            yield from list(hub.sessions)
