"""Serving one connection: the upgrade request, admission, first-message auth, the session.

``ConnectionServer.handle_stream`` serves one connection over any Trio stream, so
the same code runs behind the TCP listener and over in-memory streams in tests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import math
from collections import Counter
from functools import partial
from typing import Protocol
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from .apps import RawApp
from .auth.authenticator import Authenticator
from .auth.sources import extract_credentials
from .auth.tokens import TokenSource
from .cluster.broker import Broker
from .config import Settings
from .errors import BadRequest, CloseCode, Forbidden, GatewayError, NotFound, TooManyRequests, Unavailable
from .handshake import Admission, Pending, reject_headers
from .metrics import Metrics
from .protocol import Auth, ProtocolError, numbered, parse_client_message
from .ratelimit import PendingHandshake, PendingHandshakes, RateLimiter
from .registry import Lease, LeaseHolder, Registry, UserKey
from .session.messages import Error, encode_message
from .session.sessions import Sessions
from .streams import GuardedStream, peer_address, raw_response, refuse_raw
from .wsconn import Deflate, wrap_server_stream


class Admitting(Protocol):
    """What serving a connection asks of the gateway (``Gateway`` is one)."""

    settings: Settings
    stats: Counter[str]
    metrics: Metrics
    registry: Registry
    auth: Authenticator
    draining: bool

    sessions: Sessions
    broker: Broker


log = logging.getLogger("wsgate.server")


@attrs.frozen
class _Opened:
    """An upgraded connection; admission and lease are None until first-message auth."""

    ws: WebSocketConnection
    admission: Admission | None
    lease: Lease | None


class ConnectionServer:
    """The per-connection half of the gateway."""

    def __init__(self, gateway: Admitting, *, raw_app: RawApp | None = None) -> None:
        """``raw_app``: serve each admitted connection with it instead of a session."""
        self._gateway = gateway
        self._raw_app = raw_app
        server = gateway.settings.server
        self._handshakes = RateLimiter(server.handshake_rate, server.handshake_burst)
        self._deflate = (
            Deflate(server.deflate_window_bits, server.deflate_context_takeover) if server.deflate else None
        )
        self.pending = PendingHandshakes(
            per_address=server.max_pending_handshakes_per_address, total=server.max_pending_handshakes
        )

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over ``stream``, from the HTTP upgrade to the close.

        Never raises (except Cancelled): whatever goes wrong ends this connection only.
        """
        try:
            async with stream, trio.open_nursery() as nursery:
                try:
                    await self._serve_connection(nursery, stream)
                finally:  # trio-websocket's reader, whatever became of the connection
                    nursery.cancel_scope.cancel()
        except Exception:
            self._gateway.stats["connection.bug"] += 1
            log.exception("connection failed", extra={"event": "connection.error"})

    async def _serve_connection(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        # The lease taken for this connection is entered into this holder the moment it
        # is taken: however the connection ends, from here on, it is given back.
        with LeaseHolder() as leases:
            admitted = await self._handshake(nursery, stream, leases)
            if admitted is None:
                return
            ws, admission, lease = admitted
            self._gateway.stats["handshake.admitted"] += 1
            if self._raw_app is not None:
                await self._raw_app(ws)  # an app that speaks over the socket itself
                return
            session = self._gateway.sessions.new(ws, admission)
            lease.attach(session)
            if log.isEnabledFor(logging.INFO):  # the subject's hash is not free: only when logged
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
                if session.close_code is not None:
                    self._gateway.stats[f"close.{int(session.close_code)}"] += 1

    async def _handshake(
        self, nursery: trio.Nursery, stream: trio.abc.Stream, leases: LeaseHolder
    ) -> tuple[WebSocketConnection, Admission, Lease] | None:
        """Upgrade and admit (at the upgrade or by first message); None if that did not happen.

        The handshake counts against its address from the moment the connection is
        accepted, and holds one of the address's pending places until it is decided.
        A function of its own so that what only the handshake needs (the request, its
        scopes) is freed when it returns instead of living as long as the connection.
        """
        peer = peer_address(stream)
        try:
            place = self._pending_place(peer)
        except GatewayError as error:
            await self._refuse_accepted(stream, error)
            return None
        with place:
            return await self._upgrade_and_admit(nursery, stream, peer, leases)

    def _pending_place(self, peer: str) -> PendingHandshake:
        """A place for one more handshake from ``peer``, or the :class:`GatewayError` to
        answer with (its rate, or the pending caps)."""
        if not self._handshakes.allow(peer, trio.current_time()):
            raise TooManyRequests(
                "too many handshakes from this address", retry_after=self._handshakes.retry_after(peer)
            )
        return self.pending.hold(peer)

    async def _refuse_accepted(self, stream: trio.abc.Stream, error: GatewayError) -> None:
        """Answer a connection refused before its request was read, at once."""
        self._gateway.stats[f"handshake.{error.status}"] += 1
        log.info(
            "handshake refused",
            extra={"event": "handshake.refused", "status": error.status, "reason": error.reason},
        )
        retry = max(1, math.ceil(error.retry_after or 1))
        with trio.move_on_after(self._gateway.settings.server.close_timeout):
            await refuse_raw(stream, raw_response(error.status, error.reason, retry_after=retry))

    async def _upgrade_and_admit(
        self, nursery: trio.Nursery, stream: trio.abc.Stream, peer: str, leases: LeaseHolder
    ) -> tuple[WebSocketConnection, Admission, Lease] | None:
        server = self._gateway.settings.server
        guarded = GuardedStream(
            stream, max_head_bytes=server.max_header_bytes, max_head_lines=server.max_headers
        )
        opened: _Opened | None = None
        started = trio.current_time()
        with trio.move_on_after(server.handshake_timeout) as deadline:
            # One scope for the whole handshake: its deadline, and the stream cancels it
            # itself when the peer leaves or sends a head it refuses (no task waits for that).
            guarded.watch(deadline)
            request = await wrap_server_stream(
                nursery,
                guarded,
                message_queue_size=4,
                max_message_size=server.max_message_bytes,
                max_fragments=server.max_fragments,
                deflate=self._deflate,
            )
            opened = await self._open(request, peer, leases)
        guarded.watch(None)
        guarded.forget_head()
        if deadline.cancelled_caught:
            await self._cut_short(guarded)
            return None
        self._gateway.metrics.handshake_seconds.observe(trio.current_time() - started)
        if opened is None:
            return None
        if opened.admission is None or opened.lease is None:
            admitted = await self._first_message(opened.ws, leases)
            if admitted is None:
                return None
            return opened.ws, *admitted
        return opened.ws, opened.admission, opened.lease

    async def _cut_short(self, stream: GuardedStream) -> None:
        """Account for a handshake that ended early: a refused head, the peer gone, or the deadline."""
        if stream.refusal is not None:
            status, response = stream.refusal
            self._gateway.stats[f"handshake.{status}"] += 1
            log.info("handshake refused", extra={"event": "handshake.refused", "status": status})
            await stream.reply_raw(response)
        elif stream.gone:
            self._gateway.stats["handshake.abandoned"] += 1
        else:
            self._gateway.stats["handshake.timeout"] += 1
            log.info("handshake timed out", extra={"event": "handshake.timeout"})

    async def _open(self, request: WebSocketRequest, peer: str, leases: LeaseHolder) -> _Opened | None:
        """Admit and upgrade, or refuse with the HTTP status; None when refused."""
        lease: Lease | None = None
        try:
            admission = await self.admit(request, peer=peer)
            if isinstance(admission, Admission):
                lease = leases.take(self._gateway.registry.lease(admission.identity.user_key))
                await self._claim(lease, admission.identity.user_key)
        except GatewayError as error:
            self._gateway.stats[f"handshake.{error.status}"] += 1
            log.info(
                "handshake refused",
                extra={"event": "handshake.refused", "status": error.status, "reason": error.reason},
            )
            await request.reject(
                error.status, extra_headers=reject_headers(error), body=error.reason.encode() + b"\n"
            )
            return None
        ws = await request.accept(subprotocol=admission.subprotocol)
        # The headers hold the token, and trio-websocket's reader keeps the request event
        # in a local variable until the client's next frame: for an idle connection, its
        # whole life. The upgrade is answered (wsproto read the key from them): let go.
        request.headers.clear()
        if isinstance(admission, Pending):
            return _Opened(ws, None, None)
        return _Opened(ws, admission, lease)

    async def _first_message(
        self, ws: WebSocketConnection, leases: LeaseHolder
    ) -> tuple[Admission, Lease] | None:
        """First-message auth: the only message allowed is ``auth``, within the timeout."""
        auth = self._gateway.settings.auth
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
            message = parse_client_message(raw, max_depth=self._gateway.settings.server.max_json_depth)
        except ProtocolError:
            message = None
        if not isinstance(message, Auth):
            await self._refuse_open(
                ws, CloseCode.UNAUTHORIZED, "the first message must be auth", "first_message.401"
            )
            return None
        try:
            with trio.fail_after(auth.deadline + 1):
                result = await self._gateway.auth.authenticate(message.token, TokenSource.FIRST_MESSAGE)
            admission = self._gateway.sessions.admission(result, ws.subprotocol, message.token)
            lease = leases.take(self._gateway.registry.lease(result.identity.user_key))
            await self._claim(lease, result.identity.user_key)
        except GatewayError as error:
            await self._refuse_open(ws, error.close_code, error.reason, f"first_message.{error.status}")
            return None
        except trio.TooSlowError:
            await self._refuse_open(
                ws, CloseCode.TRY_AGAIN_LATER, "authentication timed out", "first_message.503"
            )
            return None
        return admission, lease

    async def _claim(self, lease: Lease, key: UserKey) -> None:
        """The user's place on every node (with a cluster), given back with the lease."""
        broker = self._gateway.broker
        claim = await broker.claim(key, self._gateway.settings.server.max_connections_per_user)
        if claim is not None:
            lease.on_release(partial(broker.release, key, claim))

    async def _refuse_open(self, ws: WebSocketConnection, code: CloseCode, reason: str, stat: str) -> None:
        self._gateway.stats[stat] += 1
        log.info(
            "first-message auth refused",
            extra={"event": "handshake.refused", "code": int(code), "reason": reason},
        )
        with trio.move_on_after(self._gateway.settings.server.close_timeout) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message(numbered(encode_message(Error("auth_failed", reason)), 1))
            await ws.aclose(int(code), reason)

    async def admit(self, request: WebSocketRequest, *, peer: str = "local") -> Admission | Pending:
        """Decide on one upgrade request from the client at address ``peer``, or raise the
        :class:`GatewayError` to answer with."""
        if self._gateway.draining:
            raise Unavailable(
                "server is draining", retry_after=self._gateway.settings.server.drain_reconnect_jitter or 1
            )
        if urlsplit(request.path).path != self._gateway.settings.server.path:
            raise NotFound("no WebSocket endpoint at this path")
        auth = self._gateway.settings.auth
        origin = _check_request_headers(request.headers)
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
        if credentials.token is None and auth.first_message:
            return Pending(credentials.subprotocol)
        result = await self._gateway.auth.authenticate(credentials.token, credentials.source)
        return self._gateway.sessions.admission(result, credentials.subprotocol, credentials.token)


def _check_request_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What RFC 6455 section 4.2.1 asks of an opening handshake that wsproto does not check;
    returns the ``Origin``, if any. Raises :class:`BadRequest`."""
    origins = [v for k, v in headers if k.lower() == b"origin"]
    if len(origins) > 1:
        raise BadRequest("more than one Origin header")
    keys = [v for k, v in headers if k.lower() == b"sec-websocket-key"]
    try:
        key_ok = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except binascii.Error:
        key_ok = False
    if not key_ok:
        raise BadRequest("Sec-WebSocket-Key must be one base64-encoded 16-byte value")
    return origins[0].decode("latin-1") if origins else None
