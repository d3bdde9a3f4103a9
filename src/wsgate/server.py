"""The gateway: admission before the upgrade, then one :class:`Session` per connection.

``Gateway.handle_stream`` serves one connection over any Trio stream, so the
same code runs behind the TCP listener and over in-memory streams in tests.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from .admin import AdminApp
from .agent import Agent, builtin_agent
from .auth import Authenticator
from .breaker import BreakerConfig, CircuitBreaker
from .breaker_actor import BreakerActor
from .clock import WallClock
from .config import Settings
from .devkey import load_dev_secret
from .errors import CloseCode, Forbidden, GatewayError, NotFound, TooManyRequests, Unavailable
from .handshake import Admission, Pending, reject_headers
from .httpserver import serve_http
from .introspection import IntrospectionClient
from .jwks import KeySetSource
from .lifecycle import LifecycleConfig, TokenLifecycle
from .metrics import Metrics
from .policy import Level, ServiceAnswer
from .protocol import Auth, ProtocolError, encode, parse_client_message
from .ratelimit import RateLimiter
from .registry import Lease, Registry
from .session import Session
from .sources import extract_credentials
from .streams import RESPONSE_431, GuardedStream
from .tokens import TokenSource, TokenVerifier, load_keys, mint_token
from .wsconn import wrap_server_stream

__all__ = ["Admission", "Gateway", "WallClock", "open_gateway", "serve"]

log = logging.getLogger("wsgate.server")


@attrs.frozen
class _Opened:
    """An upgraded connection; admission and lease are None until first-message auth."""

    ws: WebSocketConnection
    admission: Admission | None
    lease: Lease | None


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
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self.clock = clock or WallClock()
        self.dev_secret = load_dev_secret(settings.dev.key_file) if settings.dev_mode else None
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
        self.stats: Counter[str] = Counter()
        self.addresses: list[tuple[str, int]] = []
        self.admin_port: int | None = None
        self.draining = False
        self._rng = random.Random()
        self._handshakes = RateLimiter(settings.server.handshake_rate, settings.server.handshake_burst)
        self.metrics = Metrics(self)
        b = settings.breaker
        self.breaker = BreakerActor(
            CircuitBreaker(
                BreakerConfig(
                    window=b.window,
                    min_calls=b.min_calls,
                    failure_rate=b.failure_rate,
                    slow_call_duration=b.slow_call_duration,
                    slow_call_rate=b.slow_call_rate,
                    open_wait=b.open_wait,
                    half_open_calls=b.half_open_calls,
                    max_concurrent_calls=b.max_concurrent_calls,
                )
            )
        )
        needs_http = bool(auth.introspection_url or auth.jwks_url or auth.discovery)
        self.http = http or (httpx.AsyncClient(timeout=auth.deadline * 2) if needs_http else None)
        self._owns_http = http is None and self.http is not None
        introspection = key_set = None
        if self.http is not None and auth.introspection_url:
            introspection = IntrospectionClient(
                auth,
                self.http,
                self.breaker,
                nursery,
                self.clock.now,
                observe=self.metrics.auth_call_seconds.observe,
            )
        if self.http is not None and (auth.jwks_url or auth.discovery):
            key_set = KeySetSource(auth, self.http, self.verifier.set_dynamic_keys)
        self.auth = Authenticator(
            self.verifier,
            Level(auth.policy),
            self.clock,
            introspection=introspection,
            key_set=key_set,
            anonymous_ttl=auth.anonymous_ttl,
        )

    async def _start(self) -> None:
        await self._nursery.start(self.breaker.run)
        admin = self.settings.admin
        if admin.port is not None:
            app = AdminApp(self, admin.api_key)
            self.admin_port = await self._nursery.start(serve_http, app.handle, admin.host, admin.port)
        if self.auth.key_set is not None:
            await self._nursery.start(self.auth.key_set.run)
        if self.auth.introspection is not None:
            self._nursery.start_soon(self._revalidate_degraded)

    async def _revalidate_degraded(self) -> None:
        """Re-check degraded sessions when the breaker changes state, and every ``open_wait``.

        The re-checks go through the breaker like any call, so while it is open they cost
        nothing, and they are what probes a recovered service when no handshake does.
        """
        transitions = self.breaker.subscribe()
        while True:
            with trio.move_on_after(self.settings.breaker.open_wait):
                await transitions.receive()
            degraded = [s for s in self.registry.all_sessions() if s.degraded]
            if degraded:
                async with trio.open_nursery() as nursery:
                    for session in degraded:
                        nursery.start_soon(self.recheck, session)

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
        listeners = await trio.open_tcp_listeners(server.port, host=server.host)
        self.addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        await trio.serve_listeners(
            self.handle_stream, listeners, handler_nursery=self._nursery, task_status=task_status
        )

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over ``stream``, from the HTTP upgrade to the close.

        Never raises (except Cancelled): whatever goes wrong ends this connection only.
        """
        try:
            async with stream, trio.open_nursery() as nursery:
                await self._serve_connection(nursery, stream)
                nursery.cancel_scope.cancel()
        except Exception:
            self.stats["connection.bug"] += 1
            log.exception("connection failed", extra={"event": "connection.error"})

    async def _serve_connection(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        server = self.settings.server
        guarded = GuardedStream(
            stream, max_head_bytes=server.max_header_bytes, max_head_lines=server.max_headers
        )
        opened: _Opened | None = None
        started = trio.current_time()
        with trio.move_on_after(server.handshake_timeout) as deadline:
            request = await self._read_request(nursery, guarded)
            if request is None:
                return
            opened = await self._open(request, guarded)
        if deadline.cancelled_caught:
            if opened is not None and opened.lease is not None:
                opened.lease.release()
            self.stats["handshake.timeout"] += 1
            log.info("handshake timed out", extra={"event": "handshake.timeout"})
            return
        self.metrics.handshake_seconds.observe(trio.current_time() - started)
        if opened is None:
            return
        admission, lease = opened.admission, opened.lease
        if admission is None or lease is None:
            admitted = await self._first_message(opened.ws)
            if admitted is None:
                return
            admission, lease = admitted
        self.stats["handshake.admitted"] += 1
        if self.settings.agent.name == "echo":
            try:
                await _echo(opened.ws)
            finally:
                lease.release()
            return
        session = self.new_session(opened.ws, admission)
        lease.attach(session)
        log.info(
            "session opened",
            extra={
                "event": "session.opened",
                "session": session.id,
                "subject": session.identity.subject_hash,
                "outcome": "degraded"
                if session.degraded
                else "anonymous"
                if session.identity.anonymous
                else "normal",
            },
        )
        try:
            await session.run()
        finally:
            lease.release()
            if session.close_code is not None:
                self.stats[f"close.{int(session.close_code)}"] += 1

    async def _read_request(self, nursery: trio.Nursery, stream: GuardedStream) -> WebSocketRequest | None:
        """The upgrade request; None (after answering 431, or not at all) if it never comes."""
        request: WebSocketRequest | None = None
        async with trio.open_nursery() as race:

            async def read() -> None:
                nonlocal request
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=4,
                    max_message_size=self.settings.server.max_message_bytes,
                )
                race.cancel_scope.cancel()

            async def watch() -> None:
                await stream.oversized.wait()
                race.cancel_scope.cancel()

            async def gone() -> None:
                await stream.gone.wait()
                race.cancel_scope.cancel()

            race.start_soon(read)
            race.start_soon(watch)
            race.start_soon(gone)
        if request is None:
            outcome = "431" if stream.oversized.is_set() else "abandoned"
            self.stats[f"handshake.{outcome}"] += 1
            if stream.oversized.is_set():
                log.info("handshake refused", extra={"event": "handshake.refused", "status": 431})
                await stream.reply_raw(RESPONSE_431)
        return request

    async def _open(self, request: WebSocketRequest, stream: GuardedStream) -> _Opened | None:
        """Admit and upgrade, or refuse with the HTTP status; None when refused or abandoned."""
        lease: Lease | None = None
        try:
            admission = await self._admit_unless_gone(request, stream)
            if admission is None:
                self.stats["handshake.abandoned"] += 1
                return None
            if isinstance(admission, Admission):
                lease = self.registry.lease(admission.identity.user_key)
        except GatewayError as error:
            self.stats[f"handshake.{error.status}"] += 1
            log.info(
                "handshake refused",
                extra={"event": "handshake.refused", "status": error.status, "reason": error.reason},
            )
            await request.reject(
                error.status, extra_headers=reject_headers(error), body=error.reason.encode() + b"\n"
            )
            return None
        try:
            ws = await request.accept(subprotocol=admission.subprotocol)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if isinstance(admission, Pending):
            return _Opened(ws, None, None)
        return _Opened(ws, admission, lease)

    async def _first_message(self, ws: WebSocketConnection) -> tuple[Admission, Lease] | None:
        """First-message auth: the only message allowed is ``auth``, within the timeout."""
        auth = self.settings.auth
        try:
            with trio.fail_after(auth.first_message_timeout):
                raw = await ws.get_message()
        except trio.TooSlowError:
            await self._refuse_open(
                ws, CloseCode.AUTH_TIMEOUT, "no auth message in time", "first_message.timeout"
            )
            return None
        except ConnectionClosed:
            return None
        try:
            message = parse_client_message(raw, max_depth=self.settings.server.max_json_depth)
        except ProtocolError:
            message = None
        if not isinstance(message, Auth):
            await self._refuse_open(
                ws, CloseCode.UNAUTHORIZED, "the first message must be auth", "first_message.401"
            )
            return None
        try:
            with trio.fail_after(auth.deadline + 1):
                result = await self.auth.authenticate(message.token, TokenSource.FIRST_MESSAGE)
            admission = Admission(
                result.identity, ws.subprotocol, result.degraded, token=self._kept(message.token)
            )
            lease = self.registry.lease(result.identity.user_key)
        except GatewayError as error:
            await self._refuse_open(ws, error.close_code, error.reason, f"first_message.{error.status}")
            return None
        except trio.TooSlowError:
            await self._refuse_open(
                ws, CloseCode.TRY_AGAIN_LATER, "authentication timed out", "first_message.503"
            )
            return None
        return admission, lease

    async def _refuse_open(self, ws: WebSocketConnection, code: CloseCode, reason: str, stat: str) -> None:
        self.stats[stat] += 1
        log.info(
            "first-message auth refused",
            extra={"event": "handshake.refused", "code": int(code), "reason": reason},
        )
        with trio.move_on_after(self.settings.server.close_timeout) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message(
                    encode({"type": "error", "code": "auth_failed", "message": reason, "seq": 1})
                )
            await ws.aclose(int(code), reason)

    def _kept(self, token: str) -> str | None:
        return token if self.auth.introspection is not None else None

    def new_session(self, ws: WebSocketConnection, admission: Admission) -> Session:
        identity = admission.identity
        auth = self.settings.auth
        lifecycle = TokenLifecycle(
            LifecycleConfig(
                refresh_ahead=auth.refresh_ahead,
                grace=auth.expiry_grace,
                revalidate_interval=auth.revalidate_interval if admission.token is not None else None,
            ),
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
        return Admission(result.identity, None, result.degraded, token=self._kept(token))

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

    async def _admit_unless_gone(
        self, request: WebSocketRequest, stream: GuardedStream
    ) -> Admission | Pending | None:
        """Admission, cancelled (returning None) if the client leaves meanwhile."""
        admission: Admission | Pending | None = None
        refusal: GatewayError | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await stream.gone.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                admission = await self.admit(request)
            except GatewayError as exc:  # raised here, not wrapped in the nursery's group
                refusal = exc
            nursery.cancel_scope.cancel()
        if refusal is not None:
            raise refusal
        return admission

    async def admit(self, request: WebSocketRequest) -> Admission | Pending:
        """Decide on one upgrade request, or raise the :class:`GatewayError` to answer with."""
        if self.draining:
            raise Unavailable(
                "server is draining", retry_after=self.settings.server.drain_reconnect_jitter or 1
            )
        peer = _peer(request)
        if not self._handshakes.allow(peer, trio.current_time()):
            raise TooManyRequests(
                "too many handshakes from this address", retry_after=self._handshakes.retry_after(peer)
            )
        if urlsplit(request.path).path != self.settings.server.path:
            raise NotFound("no WebSocket endpoint at this path")
        auth = self.settings.auth
        origin = next((v.decode("latin-1") for k, v in request.headers if k.lower() == b"origin"), None)
        if auth.allowed_origins and origin is not None and origin not in auth.allowed_origins:
            raise Forbidden("origin not allowed")
        credentials = extract_credentials(
            request.headers,
            request.proposed_subprotocols,
            header=auth.header,
            subprotocol=auth.subprotocol,
            cookie=auth.cookie_name if auth.cookie else None,
            target=request.path if auth.query_param else None,
        )
        if credentials.source is TokenSource.COOKIE and origin is None:
            raise Forbidden("a cookie token needs an Origin header")
        if credentials.token is None and self.settings.auth.first_message:
            return Pending(credentials.subprotocol)
        result = await self.auth.authenticate(credentials.token, credentials.source)
        return Admission(
            result.identity,
            credentials.subprotocol,
            result.degraded,
            token=self._kept(credentials.token or ""),
        )

    def mint_dev_token(self, subject: str, ttl: float = 900.0, scopes: tuple[str, ...] = ()) -> str:
        """A token the running dev-mode gateway accepts."""
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
        )


@asynccontextmanager
async def open_gateway(
    settings: Settings,
    *,
    agent: Agent | None = None,
    verifier: TokenVerifier | None = None,
    clock: WallClock | None = None,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[Gateway]:
    """Run a gateway's background services; connections are served while inside."""
    async with trio.open_nursery() as nursery:
        gateway = Gateway(settings, nursery, agent=agent, verifier=verifier, clock=clock, http=http)
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


def _peer(request: WebSocketRequest) -> str:
    remote = request.remote
    return str(getattr(remote, "address", "local"))


async def _echo(ws: WebSocketConnection) -> None:
    """The raw echo app (``--app echo``): every message back as it came, nothing else.

    For protocol-conformance runs and load tests; no wsgate.v1 messages are sent.
    """
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.send_message(await ws.get_message())
