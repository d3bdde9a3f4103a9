"""The gateway: admission before the upgrade, then one :class:`Session` per connection.

``Gateway.handle_stream`` serves one connection over any Trio stream, so the
same code runs behind the TCP listener and over in-memory streams in tests.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import attrs
import httpx
import trio

from .admin import AdminApp
from .agent import Agent, NoopAgent
from .apps import RawApp, is_agent, resolve
from .auth.authenticator import Authenticator
from .auth.devkey import DevTokens, dev_key_path, load_dev_secret
from .auth.introspection import IntrospectionClient
from .auth.jwks import KeySetSource
from .auth.keys import load_keys
from .auth.policy import Level
from .auth.tokens import TokenSource, TokenVerifier
from .breaker import BreakerConfig, CircuitBreaker
from .breaker_actor import BreakerActor
from .clock import WallClock
from .cluster.broker import Audience, Broker, LocalBroker, Revocation
from .cluster.redis import RedisBroker
from .cluster.sessions import RedisSessions, SessionStore
from .config import Settings
from .connection import ConnectionServer
from .errors import GatewayError, StartupError, bind_error
from .fanout import deliver
from .httpserver import serve_http
from .metrics import Metrics, Stats
from .registry import Registry
from .session.sessions import Sessions, new_session_id
from .upstream.agent import UpstreamAgent
from .workers import reuse_port_listener

__all__ = ["Gateway", "open_gateway", "serve"]

log = logging.getLogger("wsgate.server")


class Gateway:
    """Admits connections and runs their sessions. Create with :func:`open_gateway`."""

    def __init__(
        self,
        settings: Settings,
        nursery: trio.Nursery,
        *,
        agent: Agent | None = None,
        verifier: TokenVerifier | None = None,
        clock: WallClock | None = None,
        http: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
        session_store: SessionStore | None = None,
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self.clock = clock or WallClock()
        dev_secret = None
        #: Mints tokens this gateway accepts (dev mode only).
        self.dev_tokens: DevTokens | None = None
        if settings.dev_mode:
            path = dev_key_path(settings.dev.key_file)
            dev_secret = load_dev_secret(path)
            self.dev_tokens = DevTokens(
                dev_secret, path, settings.dev.issuer, settings.dev.audience, self.clock.now
            )
        auth = settings.auth
        if settings.dev_mode:
            auth = attrs.evolve(
                auth,
                issuer=auth.issuer or settings.dev.issuer,
                audience=auth.audience or settings.dev.audience,
            )
        if verifier is None:
            verifier = TokenVerifier.from_settings(auth, load_keys(auth, dev_secret))
        self.verifier = verifier
        self._rng = rng or random.Random()
        cluster = settings.cluster
        #: What this node tells the others (pushes, revocations), and hears from them.
        self.broker: Broker = (
            RedisBroker(
                cluster.redis_url,
                call_timeout=cluster.call_timeout,
                reconnect_max=cluster.reconnect_max,
                lease_ttl=cluster.lease_ttl,
                rng=self._rng,
            )
            if cluster.redis_url is not None
            else LocalBroker()
        )
        self.registry = Registry(
            per_user=settings.server.max_connections_per_user,
            total=settings.server.max_connections,
            on_open=self.broker.watch,
            on_close=self.broker.unwatch,
        )
        self.stats: Counter[str] = Stats()
        self.addresses: list[tuple[str, int]] = []
        self._accepting = trio.CancelScope()  # until the drain
        self.admin_port: int | None = None
        self.draining = False
        self.metrics = Metrics()
        # BreakerSettings (validated configuration) and BreakerConfig (the pure machine's) share field names.
        self.breaker = BreakerActor(
            CircuitBreaker(BreakerConfig(**settings.breaker.for_calls(auth.call_timeout)))
        )
        needs_http = bool(settings.introspects or auth.jwks_url or auth.discovery)
        self.http = http or (httpx.AsyncClient(timeout=auth.deadline * 2) if needs_http else None)
        self._owns_http = http is None and self.http is not None
        introspection = key_set = None
        if self.http is not None and settings.introspects:
            introspection = IntrospectionClient(
                auth,
                self.http,
                self.breaker,
                nursery,
                self.clock.now,
                rng=self._rng,
                observe=self.metrics.auth_call_seconds.observe,
            )
        if self.http is not None and (auth.jwks_url or auth.discovery):
            key_set = KeySetSource(
                auth, self.http, self.verifier.set_dynamic_keys, on_endpoints=self._discovered
            )
        self.auth = Authenticator(
            self.verifier,
            Level(auth.policy),
            self.clock,
            introspection=introspection,
            key_set=key_set,
            anonymous_ttl=auth.anonymous_ttl,
        )
        #: The agent service, when runs are relayed to one (``agent.upstream_url``).
        self.upstream: UpstreamAgent | None = agent if isinstance(agent, UpstreamAgent) else None
        if agent is None and settings.agent.upstream_url is not None:
            agent = self.upstream = UpstreamAgent.from_settings(settings, self.clock.now, rng=self._rng)
        app = agent or resolve(settings.agent)
        raw_app = None if is_agent(app) else cast(RawApp, app)
        self.agent: Agent = NoopAgent() if raw_app is not None else cast(Agent, app)
        # Session ids are not secrets (the client is told its own); seeded, they are reproducible.
        new_id = new_session_id if rng is None else lambda: f"s-{self._rng.getrandbits(48):012x}"
        # With Redis, detached sessions are kept there too: a client may resume on any node.
        store = session_store
        if store is None and isinstance(self.broker, RedisBroker):
            store = RedisSessions.of(self.broker, settings)
        parts = (self.agent, self.auth, self.registry, self.clock, self.stats, nursery)
        self.sessions = Sessions(settings, *parts, new_id=new_id, store=store)
        self.connections = ConnectionServer(self, raw_app=raw_app)
        self.metrics.watch(
            stats=self.stats,
            sessions=self.registry,
            auth=self.auth,
            breaker=self.breaker,
            upstream=self.upstream,
            broker=self.broker if isinstance(self.broker, RedisBroker) else None,
            detached=self.sessions,
        )

    def _discovered(self, introspection_url: str | None, token_url: str | None) -> None:
        """Discovery found the provider's endpoints: use them where none is set explicitly."""
        client = self.auth.introspection
        if client is None:
            return
        if client.url is None and introspection_url is not None:
            client.url = introspection_url
            log.info("introspection endpoint discovered", extra={"event": "discovery.introspection"})
        if client.client_auth.token_url is None:
            client.client_auth.token_url = token_url

    async def _start(self) -> None:
        await self._nursery.start(self.breaker.run)
        await self._nursery.start(self.broker.run, self)
        if self.upstream is not None:
            await self._nursery.start(self.upstream.breaker.run)
        admin = self.settings.admin
        if admin.port is not None:
            app = AdminApp(self, admin.api_key)
            try:
                self.admin_port = await self._nursery.start(serve_http, app.handle, admin.host, admin.port)
            except OSError as exc:
                raise bind_error(exc, "admin.host, admin.port", admin.host, admin.port) from None
        key_set = self.auth.key_set
        if key_set is not None:
            await self._nursery.start(key_set.run)
            if not key_set.loaded:
                where = "auth.discovery" if self.settings.auth.discovery else "auth.jwks_url"
                cause = f"the signing keys could not be fetched ({key_set.last_error})"
                if self.settings.environment == "production" and self.auth.level is Level.STRICT:
                    raise StartupError(f"{where}: {cause}; refused to start (strict, in production)")
                log.warning(
                    "%s: %s; starting not ready, retrying", where, cause, extra={"event": "jwks.failed"}
                )
        if self.auth.introspection is not None:
            self._nursery.start_soon(self.sessions.revalidate_degraded, self.breaker)

    async def _stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self._owns_http and self.http is not None:
                await self.http.aclose()
            if self.upstream is not None:
                await self.upstream.aclose()

    # -- serving ------------------------------------------------------------

    async def serve_tcp(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the configured host and port until cancelled."""
        server = self.settings.server
        try:
            if server.reuse_port:
                listeners = [await reuse_port_listener(server.host, server.port)]
            else:
                listeners = await trio.open_tcp_listeners(server.port, host=server.host)
        except OSError as exc:
            raise bind_error(exc, "server.host, server.port", server.host, server.port) from None
        self.addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        # Cancelled as the drain begins: the listeners close and the port is the next process's
        # (SO_REUSEPORT); the connections go on, in the gateway's nursery.
        with self._accepting:
            await trio.serve_listeners(
                self.connections.handle_stream,
                listeners,
                handler_nursery=self._nursery,
                task_status=task_status,
            )

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over ``stream``, from the HTTP upgrade to the close (never raises)."""
        await self.connections.handle_stream(stream)

    # -- operator API -----------------------------------------------------------

    def publish(self, subject: str, event: dict[str, Any], *, tenant: str | None = None) -> tuple[int, int]:
        """Push ``event`` to every connection of one user (never anyone else's), on this node.

        Returns (connections that queued it, connections of the user). A connection whose
        queue is full is told it missed events, and closed if it stays full.
        """
        return deliver(self.registry, Audience((subject,), tenant), [event], self.stats)

    def public_url(self) -> str:
        """The WebSocket URL this gateway listens on (the first address)."""
        server = self.settings.server
        host, port = self.addresses[0] if self.addresses else (server.host, server.port)
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}{self.settings.server.path}"

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining")
        if not self.addresses:
            problems.append("not listening")
        if self.auth.key_set is not None and not self.auth.key_set.loaded:
            problems.append("signing keys not loaded")
        introspection = self.auth.introspection
        if introspection is not None:
            if introspection.url is None:
                problems.append("introspection endpoint not discovered")
            if introspection.refusal is not None:
                problems.append(
                    f"auth service refuses the gateway's requests: {introspection.refusal.summary}"
                )
        return problems

    def readiness_detail(self) -> dict[str, Any]:
        """What ``/readyz`` shows besides its problems: the agent service's breaker and the
        broker, if any. Neither is a problem of this node's: every node shares them, and a
        node without Redis still serves its own connections."""
        detail: dict[str, Any] = {}
        if self.upstream is not None:
            detail["upstream_breaker"] = self.upstream.breaker.state.value
        if self.settings.cluster.redis_url is not None:
            detail["broker"] = self.broker.state
        return detail

    async def drain(self) -> None:
        """Stop accepting (the port is left to whoever shares it) and admitting (503), let runs
        finish up to ``drain_timeout``, then cancel them; connections end with 1001 and a hint."""
        if self.draining:
            return
        self.draining = True
        self._accepting.cancel()  # new connections go to the process taking over the port
        server = self.settings.server
        log.warning(
            "draining", extra={"event": "gateway.draining", "outcome": f"{len(self.registry)} connections"}
        )
        for session in self.registry.all_sessions():
            session.drain(self._rng.uniform(0, server.drain_reconnect_jitter))
        with trio.move_on_after(server.drain_timeout):
            await self.registry.wait_empty()
        for session in self.registry.all_sessions():
            session.cancel_runs()
        for host in self.sessions.detached_hosts():  # their runs end too, logged "cancelled"
            host.cancel_runs()
        with trio.move_on_after(server.close_timeout + 1):
            await self.registry.wait_empty()
        with trio.move_on_after(server.close_timeout):
            await self.sessions.flushed()  # the drained sessions, kept for the node that resumes them

    def revoke(self, *, jti: str | None = None, subject: str | None = None, tenant: str | None = None) -> int:
        """Revoke a token (by ``jti``) or everything of a subject on this node; close the
        affected connections. Returns how many were closed; later handshakes with a revoked
        token are refused (403). :meth:`revoke_everywhere` tells the other nodes too."""
        return self._apply(self._revocation(jti, subject, tenant))

    async def revoke_everywhere(
        self, *, jti: str | None = None, subject: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """:meth:`revoke` here, and on every node through the broker (``/revoke``)."""
        revocation = self._revocation(jti, subject, tenant)
        answer: dict[str, Any] = {"closed": self._apply(revocation)}
        if self.settings.cluster.redis_url is not None:
            stored = await self.broker.revoke(revocation)
            answer["cluster"] = (
                "announced" if stored else "pending: the broker is unreachable; sent once back"
            )
        return answer

    def _revocation(self, jti: str | None, subject: str | None, tenant: str | None) -> Revocation:
        if (jti is None) == (subject is None):
            raise ValueError("revoke exactly one of jti or subject")
        now = self.clock.now()
        if subject is not None:
            return Revocation("subject", subject, now, tenant)
        expiries = [s.identity.expires_at for s in self.registry.all_sessions() if s.identity.token_id == jti]
        return Revocation("jti", str(jti), max(expiries, default=now + 86400))

    def _apply(self, revocation: Revocation) -> int:
        if revocation.kind == "subject":
            self.auth.revocations.revoke_subject((revocation.tenant, revocation.name), revocation.at)
            candidates = self.registry.sessions_of((revocation.tenant, revocation.name))
        else:
            self.auth.revocations.revoke_token(revocation.name, revocation.at)
            candidates = list(self.registry.all_sessions())
        affected = [s for s in candidates if revocation.covers(s.identity)]
        for session in affected:
            session.revoke()
        # Detached sessions end too: their runs stop, and they cannot be resumed.
        for host in [h for h in self.sessions.detached_hosts() if revocation.covers(h.core.identity)]:
            host.revoke()
        self.stats["revoked"] += len(affected)
        return len(affected)

    # -- what other nodes tell this one (the broker's Node) ----------------------------

    def deliver(self, audience: Audience, events: list[Any]) -> None:
        deliver(self.registry, audience, events, self.stats)

    def apply(self, revocation: Revocation) -> None:
        self._apply(revocation)

    async def push(self, audience: Audience, events: list[dict[str, Any]]) -> dict[str, Any]:
        """``events`` to every connection of ``audience``, here and on the other nodes
        (``/publish``): what it reached."""
        delivered, connections = deliver(self.registry, audience, events, self.stats)
        answer: dict[str, Any] = {"delivered": delivered, "connections": connections}
        if self.settings.cluster.redis_url is not None:
            reach = await self.broker.publish(audience, events)
            answer["nodes"] = reach.nodes
            if reach.problem is not None:
                answer["unreached"] = reach.problem
        return answer

    # -- admission ----------------------------------------------------------

    async def check_token(self, token: str) -> dict[str, Any]:
        """What a handshake with ``token`` would be answered now, for ``/auth/check``: the
        status and the reason the refusal itself would carry, never more."""
        try:
            result = await self.auth.authenticate(token, TokenSource.HEADER)
        except GatewayError as error:
            return {"admitted": False, "status": error.status, "reason": error.reason}
        return {"admitted": True, "status": 101, "reason": "admitted", "degraded": result.degraded}


@asynccontextmanager
async def open_gateway(settings: Settings, **options: Any) -> AsyncIterator[Gateway]:
    """Run a gateway's background services; connections are served while inside. ``options``
    are :class:`Gateway`'s (``agent``, ``verifier``, ``clock``, ``http``, ``rng``, and
    ``session_store``: where detached sessions are kept for other nodes, else Redis with
    ``cluster.redis_url``)."""
    async with trio.open_nursery() as nursery:
        gateway = Gateway(settings, nursery, **options)
        try:
            await gateway._start()
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
            await gateway._stop()


async def serve(
    settings: Settings,
    *,
    agent: Agent | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway on TCP until cancelled."""
    async with open_gateway(settings, agent=agent) as gateway:
        await gateway._nursery.start(gateway.serve_tcp)
        task_status.started(gateway)
        await trio.sleep_forever()
