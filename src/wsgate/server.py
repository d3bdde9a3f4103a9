"""The gateway: admission before the upgrade, then one :class:`Session` per connection.

``Gateway.handle_stream`` serves one connection over any Trio stream, so the
same code runs behind the TCP listener and over in-memory streams in tests.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import WebSocketConnection

from .admin import AdminApp
from .agent import Agent, builtin_agent
from .auth import Authenticated, Authenticator
from .breaker import BreakerConfig, CircuitBreaker
from .breaker_actor import BreakerActor
from .clock import WallClock
from .config import Settings
from .connection import ConnectionServer
from .devkey import dev_key_path, load_dev_secret
from .errors import CloseCode, GatewayError, StartupError, bind_error
from .handshake import Admission
from .httpserver import serve_http
from .introspection import IntrospectionClient
from .jwks import KeySetSource
from .lifecycle import LifecycleConfig, TokenLifecycle
from .metrics import Metrics, Stats
from .policy import Level, ServiceAnswer
from .registry import Registry
from .session import Session
from .tokens import TokenSource, TokenVerifier, load_keys, mint_token

__all__ = ["Admission", "Gateway", "WallClock", "open_gateway", "serve"]

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
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self.clock = clock or WallClock()
        #: Where the dev key is (dev mode only).
        self.dev_key_path = dev_key_path(settings.dev.key_file) if settings.dev_mode else None
        self.dev_secret = load_dev_secret(self.dev_key_path) if self.dev_key_path is not None else None
        auth = settings.auth
        if settings.dev_mode:
            auth = attrs.evolve(
                auth,
                issuer=auth.issuer or settings.dev.issuer,
                audience=auth.audience or settings.dev.audience,
            )
        if verifier is None:
            verifier = TokenVerifier.from_settings(auth, load_keys(auth, self.dev_secret))
        self.verifier = verifier
        self.agent = agent or builtin_agent(settings.agent.name, settings.agent.step_delay)
        self.registry = Registry(
            per_user=settings.server.max_connections_per_user, total=settings.server.max_connections
        )
        # Shared by every session: indexed by whether the session keeps its token for re-checks.
        self._lifecycles = tuple(
            LifecycleConfig(
                refresh_ahead=auth.refresh_ahead,
                grace=auth.expiry_grace,
                revalidate_interval=auth.revalidate_interval if rechecked else None,
            )
            for rechecked in (False, True)
        )
        self.stats: Counter[str] = Stats()
        self.addresses: list[tuple[str, int]] = []
        self.admin_port: int | None = None
        self.draining = False
        self._rng = rng or random.Random()
        self.metrics = Metrics()
        self.connections = ConnectionServer(self)
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
        self.metrics.watch(stats=self.stats, sessions=self.registry, auth=self.auth, breaker=self.breaker)

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
            self._nursery.start_soon(self._revalidate_degraded)

    async def _revalidate_degraded(self) -> None:
        """Re-check degraded sessions when the breaker changes state, and every ``open_wait``,
        using at most half of ``breaker.max_concurrent_calls``.

        The re-checks go through the breaker like any call, so while it is open they cost
        nothing, and they are what probes a recovered service when no handshake does.
        """
        transitions = self.breaker.subscribe()
        # At most half of the breaker's calls in flight: after an outage, new handshakes are
        # not queued behind the re-checks of every session admitted while it lasted.
        limiter = trio.CapacityLimiter(max(1, self.settings.breaker.max_concurrent_calls // 2))

        async def recheck(session: Session) -> None:
            async with limiter:
                await self.recheck(session)

        while True:
            with trio.move_on_after(self.settings.breaker.open_wait):
                await transitions.receive()
            degraded = [s for s in self.registry.all_sessions() if s.degraded]
            if degraded:
                async with trio.open_nursery() as nursery:
                    for session in degraded:
                        nursery.start_soon(recheck, session)

    async def recheck(self, session: Session) -> None:
        """Ask the auth service about a live session again; close it if it is no longer active."""
        token = session.token
        if token is None or session.close_code is not None:
            return
        answer = await self.auth.recheck(token)
        if session.token != token:
            return  # refreshed meanwhile: the new token was checked on its own
        if answer is ServiceAnswer.INACTIVE:
            self.stats["recheck.inactive"] += 1
            session.close(CloseCode.FORBIDDEN, "token revoked")
        elif answer is ServiceAnswer.ACTIVE and session.degraded:
            self.stats["recheck.restored"] += 1
            session.degraded = False
            session.offer({"type": "session.restored", "degraded": False})

    async def _stop(self) -> None:
        if self._owns_http and self.http is not None:
            with trio.CancelScope(shield=True):
                await self.http.aclose()

    # -- serving ------------------------------------------------------------

    async def serve_tcp(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the configured host and port until cancelled."""
        server = self.settings.server
        try:
            listeners = await trio.open_tcp_listeners(server.port, host=server.host)
        except OSError as exc:
            raise bind_error(exc, "server.host, server.port", server.host, server.port) from None
        self.addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        await trio.serve_listeners(
            self.connections.handle_stream, listeners, handler_nursery=self._nursery, task_status=task_status
        )

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over ``stream``, from the HTTP upgrade to the close (never raises)."""
        await self.connections.handle_stream(stream)

    def admission(self, result: Authenticated, subprotocol: str | None, token: str | None) -> Admission:
        """What an authenticated token admits. The token itself is kept (in memory only)
        where the auth service may re-check it, and never for an anonymous session."""
        kept = token if self.auth.introspection is not None else None
        return Admission(result.identity, subprotocol, result.degraded, token=kept)

    def new_session(self, ws: WebSocketConnection, admission: Admission) -> Session:
        identity = admission.identity
        auth = self.settings.auth
        lifecycle = TokenLifecycle(
            self._lifecycles[admission.token is not None],
            identity.expires_at,
            identity.issued_at,
            self.clock.now(),
        )
        return Session(
            f"s-{secrets.token_hex(6)}",
            ws,
            identity,
            self.agent,
            self.settings.server,
            hooks=self,
            lifecycle=lifecycle,
            stats=self.stats,
            degraded=admission.degraded,
            token=admission.token,
            refresh_limit=(auth.refresh_limit, auth.refresh_window),
        )

    # -- session hooks --------------------------------------------------------

    def wall_now(self) -> float:
        return self.clock.now()

    def trio_time(self, wall: float) -> float:
        return self.clock.to_trio(wall)

    async def refresh(self, token: str) -> Admission:
        try:
            result = await self.auth.authenticate(token, TokenSource.REFRESH)
        except GatewayError as error:
            self.stats[f"refresh.{error.status}"] += 1
            raise
        return self.admission(result, None, token)

    # -- operator API -----------------------------------------------------------

    def publish(self, subject: str, event: dict[str, Any], *, tenant: str | None = None) -> tuple[int, int]:
        """Push ``event`` to every connection of one user (never anyone else's).

        Returns (connections that queued it, connections of the user). A connection whose
        queue is full is told it missed events, and closed if it stays full.
        """
        sessions = self.registry.sessions_of((tenant, subject))
        delivered = sum(session.offer({"type": "event", "event": event}) for session in sessions)
        self.stats["published"] += delivered
        return delivered, len(sessions)

    def public_url(self) -> str:
        """The WebSocket URL this gateway listens on (the first address)."""
        host, port = (
            self.addresses[0] if self.addresses else (self.settings.server.host, self.settings.server.port)
        )
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

    async def drain(self) -> None:
        """Stop admitting (503), let runs finish up to ``drain_timeout``, then cancel them;
        every connection ends with 1001 and a jittered reconnect hint."""
        if self.draining:
            return
        self.draining = True
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
        with trio.move_on_after(server.close_timeout + 1):
            await self.registry.wait_empty()

    def revoke(self, *, jti: str | None = None, subject: str | None = None, tenant: str | None = None) -> int:
        """Revoke a token (by ``jti``) or everything of a subject; close affected connections.

        Returns how many connections were closed; later handshakes with a revoked token are
        refused (403).
        """
        if (jti is None) == (subject is None):
            raise ValueError("revoke exactly one of jti or subject")
        now = self.clock.now()
        if subject is not None:
            self.auth.revocations.revoke_subject((tenant, subject), now)
            affected = self.registry.sessions_of((tenant, subject))
        else:
            affected = [s for s in self.registry.all_sessions() if s.identity.token_id == jti]
            until = max((s.identity.expires_at for s in affected), default=now + 86400)
            self.auth.revocations.revoke_token(str(jti), until)
        for session in affected:
            session.revoke()
        self.stats["revoked"] += len(affected)
        return len(affected)

    # -- admission ----------------------------------------------------------

    async def check_token(self, token: str) -> dict[str, Any]:
        """What a handshake with ``token`` would be answered now, for ``/auth/check``: the
        status and the reason the refusal itself would carry, never more."""
        try:
            result = await self.auth.authenticate(token, TokenSource.HEADER)
        except GatewayError as error:
            return {"admitted": False, "status": error.status, "reason": error.reason}
        return {"admitted": True, "status": 101, "reason": "admitted", "degraded": result.degraded}

    def mint_dev_token(
        self, subject: str, ttl: float = 900.0, scopes: tuple[str, ...] = (), **claims: Any
    ) -> str:
        """A token the running dev-mode gateway accepts (with a random ``jti``)."""
        if self.dev_secret is None:
            raise RuntimeError("dev tokens exist only in dev mode")
        return mint_token(
            self.dev_secret,
            subject,
            now=self.clock.now(),
            ttl=ttl,
            issuer=self.settings.dev.issuer,
            audience=self.settings.dev.audience,
            scopes=scopes,
            jti=secrets.token_hex(8),
            **claims,
        )


@asynccontextmanager
async def open_gateway(
    settings: Settings,
    *,
    agent: Agent | None = None,
    verifier: TokenVerifier | None = None,
    clock: WallClock | None = None,
    http: httpx.AsyncClient | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Gateway]:
    """Run a gateway's background services; connections are served while inside."""
    async with trio.open_nursery() as nursery:
        gateway = Gateway(settings, nursery, agent=agent, verifier=verifier, clock=clock, http=http, rng=rng)
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
