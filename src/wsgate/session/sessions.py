"""Where sessions come from, and what they use of the gateway: :class:`Sessions`.

It makes each connection's :class:`Session` (a :class:`SessionCore` of the
admitted identity, hosted by a :class:`SessionHost`, on its socket), keeps every
session that lives (served or detached) to resume, and serves what a session
asks: the wall clock, the one auth path for refreshes, resumes, and re-checks
with the auth service, including the loop that re-checks degraded sessions when
the breaker changes.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

import trio
from trio_websocket import WebSocketConnection

from ..agent import Agent
from ..auth.authenticator import Authenticated, Authenticator
from ..auth.policy import ServiceAnswer
from ..auth.tokens import TokenSource
from ..breaker_actor import BreakerActor
from ..clock import WallClock
from ..cluster.sessions import SessionStore
from ..config import Settings
from ..errors import CloseCode, GatewayError
from ..handshake import Admission
from ..protocol import SessionResume
from ..registry import Registry, UserKey
from .core import SessionCore
from .effects import WINDOW_PASSED, Rules, State
from .host import Resumption, SessionHost
from .lifecycle import LifecycleConfig, TokenLifecycle
from .log import resume_hash
from .shell import Session
from .stored import StoredSessions

log = logging.getLogger("wsgate.session")

#: How many sessions that expired unresumed are remembered (for ``recovered: false, expired``).
EXPIRED_KEPT = 10_000


def new_session_id() -> str:
    return f"s-{secrets.token_hex(6)}"


class Sessions:
    """Makes sessions and is their :class:`~wsgate.session.SessionServices`."""

    def __init__(
        self,
        settings: Settings,
        agent: Agent,
        auth: Authenticator,
        registry: Registry,
        clock: WallClock,
        stats: Counter[str],
        nursery: trio.Nursery,
        *,
        new_id: Callable[[], str] = new_session_id,
        store: SessionStore | None = None,
    ) -> None:
        self._settings = settings
        #: Where detached sessions are kept for other nodes to resume (with Redis).
        self._stored = (
            StoredSessions(store, nursery, clock.now, settings.resume) if store is not None else None
        )
        self._nursery = nursery  # where runs live: they may outlive their connection
        self._hosts: dict[str, SessionHost] = {}  # every session alive, served or detached
        self._waiting: dict[UserKey, dict[str, SessionHost]] = {}  # detached, by user, oldest first
        # Sessions that expired unresumed, for a while: (resume token's hash, user), by id.
        self._expired: OrderedDict[str, tuple[bytes, UserKey]] = OrderedDict()
        self._agent = agent
        self._auth = auth
        self._registry = registry
        self._clock = clock
        self._stats = stats
        self._new_id = new_id
        self._rules = Rules.of(settings)
        auth_settings = settings.auth
        # Shared by every session: indexed by whether the session keeps its token for re-checks.
        self._lifecycles = tuple(
            LifecycleConfig(
                refresh_ahead=auth_settings.refresh_ahead,
                grace=auth_settings.expiry_grace,
                revalidate_interval=auth_settings.revalidate_interval if rechecked else None,
            )
            for rechecked in (False, True)
        )

    def admission(self, result: Authenticated, subprotocol: str | None, token: str | None) -> Admission:
        """What an authenticated token admits. The token itself is kept (in memory only)
        where the auth service may re-check it or the agent service is to be given it
        (``agent.forward_client_token``), and never for an anonymous session."""
        keep = self._auth.introspection is not None or self._settings.agent.forward_client_token
        kept = token if keep and not result.identity.anonymous else None
        return Admission(result.identity, subprotocol, result.degraded, token=kept)

    def new(self, ws: WebSocketConnection, admission: Admission) -> Session:
        return Session(
            self._host(self._core(self._new_id(), admission)), ws, admission, self._settings.server, self
        )

    def _core(self, session_id: str, admission: Admission) -> SessionCore:
        """The core of a session ``admission`` admits, now."""
        identity = admission.identity
        lifecycle = TokenLifecycle(
            self._lifecycles[admission.token is not None and self._auth.introspection is not None],
            identity.expires_at,
            identity.issued_at,
            self._clock.now(),
        )
        return SessionCore(
            session_id, admission, lifecycle, self._rules, now=trio.current_time(), stats=self._stats
        )

    def _host(self, core: SessionCore) -> SessionHost:
        host = self._hosts[core.id] = SessionHost(core, self._agent, self._nursery, self)
        return host

    def detached_hosts(self) -> Iterator[SessionHost]:
        """The sessions waiting for their client to resume them."""
        return (host for host in self._hosts.values() if host.core.state is State.DETACHED)

    def log_bytes(self) -> int:
        """What the detached sessions keep to replay."""
        return sum(host.core.log.bytes for host in self.detached_hosts())

    # -- resuming --------------------------------------------------------------------

    def resume_token(self) -> str | None:
        return secrets.token_urlsafe(24) if self._rules.resume_window > 0 else None

    async def resume(self, session: Session, message: SessionResume) -> Resumption:
        """Serve the session ``message`` names on ``session``'s connection, if it is the same
        user's, the token is its current one, and its log reaches back to ``last_seq``.
        Anything else is ``unknown`` (whether such a session exists is not told). With a
        store, the claim there makes the token good once across every node."""
        user, token = session.identity.user_key, message.resume_token
        new_token = self.resume_token()
        assert new_token is not None  # session.resume is refused when resuming is off
        host = self._hosts.get(message.session_id)
        if host is not None and host is not session.host:
            core = host.core
            if (
                core.state is State.CLOSED
                or core.identity.user_key != user
                or not core.resume_key.matches(token)
            ):
                return self._refused(message, user)
            if self._stored is not None and core.state is State.DETACHED:
                # Claimed in the store too, unless it never got there (then only here has it).
                was_stored = self._stored.saved(host)
                reason = await self._claim(host.core, message, new_token)
                if reason is not None and (was_stored or reason != "unknown"):
                    return self._refused(message, user, reason)
                if host.core.state is State.CLOSED or not host.core.resume_key.matches(token):
                    return self._refused(message, user)  # ended, or resumed meanwhile
                self._stored.stop(host)  # served here again: nothing more to ship
            replay = host.core.log.after(message.last_seq)
            if replay is None:
                return self._refused(message, user, "gap")
        elif self._stored is not None and host is None:
            fresh_core = self._core(message.session_id, session.admission)
            try:
                host, reason = await self._stored.take(
                    fresh_core, token, new_token, message.last_seq, self._host
                )
            except Exception as exc:
                log.warning("resume from the store failed: %s", exc, extra={"event": "session.store"})
                host, reason = None, "unknown"
            if host is None:
                return self._refused(message, user, reason)
            replay = host.core.log.after(message.last_seq)
            if replay is None:  # trimmed between the claim and the read: taken, but not whole
                host.end(host.core.end(CloseCode.GOING_AWAY, "the stored log no longer reaches back"))
                return self._refused(message, user, "gap")
        else:
            return self._refused(message, user)
        # From here to the replay being queued, nothing is awaited: what the session numbers
        # next goes after it.
        fresh = session.host
        self._not_waiting(host)
        host.attach(session)
        fresh.end(fresh.core.end(CloseCode.NORMAL, "replaced by a resumed session"))
        self._stats["session.resumed"] += 1
        self._stats["replayed"] += len(replay)
        return Resumption(host, new_token, replay)

    async def _claim(self, core: SessionCore, message: SessionResume, new_token: str) -> str | None:
        assert self._stored is not None
        try:
            claim = await self._stored.claim(core, message.resume_token, new_token, message.last_seq)
        except Exception as exc:  # the store is away: this node's own word holds
            log.warning("resume claim failed: %s", exc, extra={"event": "session.store"})
            return None
        return claim.reason

    def _refused(self, message: SessionResume, user: UserKey, reason: str | None = None) -> Resumption:
        if reason is None:
            digest, owner = self._expired.get(message.session_id, (b"", None))
            known = owner == user and digest == resume_hash(message.resume_token)
            reason = "expired" if known else "unknown"
        self._stats[f"session.resume_{'refused' if reason == 'unknown' else reason}"] += 1
        return Resumption(None, self.resume_token(), reason=reason)

    # -- what hosts tell ---------------------------------------------------------------

    def detached(self, host: SessionHost) -> None:
        self._stats["session.detached"] += 1
        # A user keeps as many detached sessions as it may have connections: reconnecting in a
        # loop does not pile them up (the oldest ends, as if its window had passed).
        waiting = self._waiting.setdefault(host.core.identity.user_key, {})
        waiting[host.id] = host
        if len(waiting) > self._settings.server.max_connections_per_user:
            oldest = next(iter(waiting.values()))
            oldest.end(oldest.core.close(WINDOW_PASSED), expired=True)
        if self._stored is not None:
            self._stored.detached(host)

    def logged(self, host: SessionHost) -> None:
        if self._stored is not None:
            self._stored.logged(host)

    def run_done(self, host: SessionHost, run_id: str) -> None:
        if self._stored is not None:
            self._stored.run_done(host, run_id)

    async def still_ours(self, host: SessionHost) -> bool:
        return self._stored is None or await self._stored.still_ours(host)

    def _not_waiting(self, host: SessionHost) -> None:
        user = host.core.identity.user_key
        waiting = self._waiting.get(user)
        if waiting is not None and waiting.pop(host.id, None) is not None and not waiting:
            del self._waiting[user]

    def ended(self, host: SessionHost, *, expired: bool) -> None:
        self._not_waiting(host)
        if self._hosts.get(host.id) is host:
            del self._hosts[host.id]
        if self._stored is not None:
            self._stored.ended(host)
        if expired:
            self._stats["session.expired"] += 1
            self._expired[host.id] = (host.core.resume_key.digest, host.core.identity.user_key)
            while len(self._expired) > EXPIRED_KEPT:
                self._expired.popitem(last=False)

    async def flushed(self) -> None:
        """Every detached session written to the store (if any): before a drained node exits."""
        if self._stored is not None:
            await self._stored.flushed()

    # -- what sessions use ---------------------------------------------------------

    def wall_now(self) -> float:
        return self._clock.now()

    def trio_time(self, wall: float) -> float:
        return self._clock.to_trio(wall)

    async def refresh(self, token: str) -> Admission:
        try:
            result = await self._auth.authenticate(token, TokenSource.REFRESH)
        except GatewayError as error:
            self._stats[f"refresh.{error.status}"] += 1
            raise
        return self.admission(result, None, token)

    async def recheck(self, session: Session) -> None:
        """Ask the auth service about a live session again; close it if it is no longer active."""
        token = session.token
        if token is None:
            return
        answer = await self._auth.recheck(token)
        if session.token != token:
            return  # refreshed meanwhile (or closed): the new token was checked on its own
        if answer is ServiceAnswer.INACTIVE:
            self._stats["recheck.inactive"] += 1
            session.revoke()
        elif answer is ServiceAnswer.ACTIVE:
            session.restored()

    async def revalidate_degraded(self, breaker: BreakerActor) -> None:
        """Re-check degraded sessions when the breaker changes state, and every ``open_wait``,
        using at most half of ``breaker.max_concurrent_calls``.

        The re-checks go through the breaker like any call, so while it is open they cost
        nothing, and they are what probes a recovered service when no handshake does.
        """
        transitions = breaker.subscribe()
        settings = self._settings.breaker
        # At most half of the breaker's calls in flight: after an outage, new handshakes are
        # not queued behind the re-checks of every session admitted while it lasted.
        limiter = trio.CapacityLimiter(max(1, settings.max_concurrent_calls // 2))

        async def recheck(session: Session) -> None:
            async with limiter:
                await self.recheck(session)

        while True:
            with trio.move_on_after(settings.open_wait):
                await transitions.receive()
            degraded = [s for s in self._registry.all_sessions() if s.degraded]
            if degraded:
                async with trio.open_nursery() as nursery:
                    for session in degraded:
                        nursery.start_soon(recheck, session)
