"""The gateway: admission before the upgrade, then one :class:`Session` per connection.

``Gateway.handle_stream`` serves one connection over any Trio stream, so the
same code runs behind the TCP listener and over in-memory streams in tests.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, wrap_server_stream

from .agent import Agent, builtin_agent
from .config import Settings
from .devkey import load_dev_secret
from .errors import GatewayError, NotFound, Unauthorized
from .registry import Lease, Registry
from .session import Session
from .sources import extract_credentials
from .tokens import Identity, TokenVerifier, load_keys, mint_token

log = logging.getLogger("wsgate.server")


@attrs.frozen
class Admission:
    """The outcome of a successful handshake check."""

    identity: Identity
    subprotocol: str | None
    degraded: bool = False


class WallClock:
    """Epoch seconds derived from Trio's clock, so ``MockClock`` drives token expiry too.

    ``start`` is the wall-clock time to report now (default: ``time.time()``).
    """

    def __init__(self, start: float | None = None) -> None:
        self._offset = (time.time() if start is None else start) - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()


def _reject_headers(error: GatewayError) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Cache-Control", b"no-store"),
    ]
    if isinstance(error, Unauthorized):
        headers.append((b"WWW-Authenticate", b'Bearer error="invalid_token"'))
    if error.retry_after is not None:
        headers.append((b"Retry-After", str(max(1, math.ceil(error.retry_after))).encode()))
    return headers


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
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self.clock = clock or WallClock()
        self.dev_secret = load_dev_secret(settings.dev.key_file) if settings.dev_mode else None
        if verifier is None:
            auth = settings.auth
            if settings.dev_mode:
                auth = attrs.evolve(
                    auth,
                    issuer=auth.issuer or settings.dev.issuer,
                    audience=auth.audience or settings.dev.audience,
                )
            verifier = TokenVerifier.from_settings(auth, load_keys(auth, self.dev_secret))
        self.verifier = verifier
        self.agent = agent or builtin_agent(settings.agent.name, settings.agent.step_delay)
        self.registry = Registry(
            per_user=settings.server.max_connections_per_user, total=settings.server.max_connections
        )
        self.stats: Counter[str] = Counter()
        self.addresses: list[tuple[str, int]] = []

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
        lease: Lease | None = None
        session: Session | None = None
        with trio.move_on_after(server.handshake_timeout) as deadline:
            request = await wrap_server_stream(
                nursery, stream, message_queue_size=4, max_message_size=server.max_message_bytes
            )
            try:
                admission = await self.admit(request)
                lease = self.registry.lease(admission.identity.user_key)
            except GatewayError as error:
                self.stats[f"handshake.{error.status}"] += 1
                log.info(
                    "handshake refused",
                    extra={"event": "handshake.refused", "status": error.status, "reason": error.reason},
                )
                await request.reject(
                    error.status, extra_headers=_reject_headers(error), body=error.reason.encode() + b"\n"
                )
                return
            try:
                ws = await request.accept(subprotocol=admission.subprotocol)
            except BaseException:
                lease.release()
                raise
            session = self.new_session(ws, admission)
            lease.attach(session)
        if deadline.cancelled_caught:
            if lease is not None:
                lease.release()
            self.stats["handshake.timeout"] += 1
            log.info("handshake timed out", extra={"event": "handshake.timeout"})
            return
        assert session is not None and lease is not None
        self.stats["handshake.admitted"] += 1
        log.info(
            "session opened",
            extra={
                "event": "session.opened",
                "session": session.id,
                "subject": session.identity.subject_hash,
                "outcome": "degraded" if session.degraded else "normal",
            },
        )
        try:
            await session.run()
        finally:
            lease.release()
            if session.close_code is not None:
                self.stats[f"close.{int(session.close_code)}"] += 1

    def new_session(self, ws: WebSocketConnection, admission: Admission) -> Session:
        return Session(
            f"s-{secrets.token_hex(6)}",
            ws,
            admission.identity,
            self.agent,
            self.settings.server,
            degraded=admission.degraded,
        )

    # -- admission ----------------------------------------------------------

    async def admit(self, request: WebSocketRequest) -> Admission:
        """Decide on one upgrade request, or raise the :class:`GatewayError` to answer with."""
        if urlsplit(request.path).path != self.settings.server.path:
            raise NotFound("no WebSocket endpoint at this path")
        credentials = extract_credentials(
            request.headers,
            request.proposed_subprotocols,
            header=self.settings.auth.header,
            subprotocol=self.settings.auth.subprotocol,
        )
        if credentials.token is None or credentials.source is None:
            raise Unauthorized("token missing")
        identity = self.verifier.verify(credentials.token, self.clock.now(), credentials.source)
        return Admission(identity=identity, subprotocol=credentials.subprotocol)

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
) -> AsyncIterator[Gateway]:
    """Run a gateway's background services; connections are served while inside."""
    async with trio.open_nursery() as nursery:
        gateway = Gateway(settings, nursery, agent=agent, verifier=verifier, clock=clock)
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()


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
