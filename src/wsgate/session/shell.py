"""A session on its connection: the Trio shell that feeds :class:`SessionCore` and acts.

One nursery per connection. Its body is the reader; beside it run the writer
(what is queued goes out in batches; the core numbered each message as it was
queued) and the watchdog (asleep until the core's next timer). Refreshes, pings
and re-checks are short tasks in the same nursery; runs are the session's
:class:`~wsgate.session.host.SessionHost`'s, which outlives the connection. The
shell decides nothing: events go to the core, the shell carries out its answer.

When the core decides the close, :meth:`Session._stop` ends the tasks, the one
way: with nothing but the reader, writer and watchdog left, the reader's scope
is cancelled, the writer stops once the queue is written and the watchdog is
woken; with a refresh, ping or re-check in flight, the nursery is cancelled.
Then what is queued is flushed within ``close_timeout`` (unless the close says
not to, or the socket is gone) and the WebSocket is closed with the core's code.
After ``session.resume``, the connection serves the resumed session instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..auth.tokens import Identity
from ..config import ServerSettings
from ..errors import CloseCode, GatewayError
from ..handshake import Admission
from ..protocol import SessionResume
from ..wsconn import send_texts
from . import effects
from .core import SessionCore
from .effects import RECHECK, START_PING, CancelRun, Close, Effect, Refresh, Resume, Send, StartRun
from .host import Resumption, SessionHost
from .outbound import OutboundQueue

log = logging.getLogger("wsgate.session")

WRITE_BATCH_MESSAGES = 64  # at most this many queued messages per write
WRITE_BATCH_BYTES = 256 * 1024  # and no more bytes than this, unless one message is larger


class SessionServices(Protocol):
    """What a session uses of the gateway: its clock and its one auth path."""

    def wall_now(self) -> float: ...

    def trio_time(self, wall: float) -> float: ...

    async def refresh(self, token: str) -> Admission: ...

    async def recheck(self, session: Session) -> None: ...

    def resume_token(self) -> str | None: ...

    async def resume(self, session: Session, message: SessionResume) -> Resumption: ...


class Session:
    """Serves one authenticated WebSocket until it closes."""

    # Slots, not a __dict__: an idle connection's footprint is mostly objects like this one.
    __slots__ = (
        "_closed",
        "_helpers",
        "_nursery",
        "_outbound",
        "_reading",
        "_refresh_lock",
        "_services",
        "_settings",
        "_stopping",
        "_wake",
        "_writable",
        "admission",
        "host",
        "ws",
    )

    def __init__(
        self,
        host: SessionHost,
        ws: WebSocketConnection,
        admission: Admission,
        settings: ServerSettings,
        services: SessionServices,
    ) -> None:
        #: The session this connection serves (another one's, once resumed).
        self.host = host
        host.attached = self
        self.ws = ws
        #: What admitted this connection: a session it resumes takes this identity on.
        self.admission = admission
        self._closed: Close | None = None  # this connection's close, once decided
        self._settings = settings
        self._services = services
        self._outbound = OutboundQueue(settings.send_queue_messages, settings.send_queue_bytes)
        self._nursery: trio.Nursery | None = None
        self._reading = trio.CancelScope()  # the reader's; cancelled to stop it
        self._wake: trio.CancelScope | None = None  # the watchdog's sleep, moved as timers change
        self._stopping = trio.Event()  # set to end the watchdog without a Cancelled
        self._refresh_lock: trio.StrictFIFOLock | None = None  # made on the first refresh
        self._helpers = 0  # refreshes, pings and re-checks in flight
        self._writable = True  # False once the socket is gone or a write got stuck

    # -- what the gateway reads and calls ------------------------------------------

    @property
    def core(self) -> SessionCore:  # the session's, whichever this connection serves
        return self.host.core

    @property
    def id(self) -> str:
        return self.host.core.id

    @property
    def identity(self) -> Identity:
        return self.core.identity

    @property
    def degraded(self) -> bool:
        return self.core.degraded

    @property
    def token(self) -> str | None:
        """The current token, kept only where the auth service may re-check it."""
        return self.core.token

    @property
    def close_code(self) -> CloseCode | None:
        return None if self._closed is None else self._closed.code

    @property
    def close_reason(self) -> str:
        return "" if self._closed is None else self._closed.reason

    def revoke(self) -> None:
        """Close this session because its token or subject was revoked (4403)."""
        self.act(self.core.close(effects.REVOKED))

    def moved(self) -> None:
        """The session is served by a newer connection: this one closes (4409)."""
        self.act(self.core.close(effects.MOVED))

    def restored(self) -> None:
        """The auth service holds the token active again: no longer degraded."""
        text = self.core.restored()
        if text is not None:
            self._offer(text)

    def offer(self, text: str) -> bool:
        """Queue a server push (an encoded message) without waiting. When full, it is dropped,
        the client is told how many were dropped once it catches up, and a consumer that stays
        full beyond ``slow_consumer_timeout`` is closed (1008)."""
        return self.core.offer() and self._offer(text)

    def drain(self, reconnect_after: float) -> None:
        """Stop taking new runs; close with 1001 once the running ones have finished."""
        for effect in self.core.drain(reconnect_after):
            if isinstance(effect, Send):
                self._offer(effect.text)
            elif isinstance(effect, Close):
                self.act(effect)

    def cancel_runs(self) -> None:
        """Cancel every run (each still ends with its terminal event)."""
        self.host.cancel_runs()

    async def run(self) -> None:
        """Serve until closed. Never raises except Cancelled; a bug closes with 1011."""
        try:
            if self._closed is None:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._writer, name="wsgate.session.writer")
                    self._outbound.put_raw([self.core.ready(self._services.resume_token())])
                    nursery.start_soon(self._watchdog, name="wsgate.session.watchdog")
                    await self._reader()  # the nursery's own body: one task fewer per connection
        except Exception:
            log.exception("session failed", extra={"session": self.id, "event": "session.error"})
            self.act(self.core.close(effects.FAILED))
        await self._finish()

    # -- acting on the core's effects ----------------------------------------------

    def act(self, closing: Close | None) -> None:
        """The core decided this connection's close: the session detaches or ends with it."""
        if closing is None or self._closed is not None:
            return
        self._closed = closing
        host = self.host
        if host.attached is self:
            if closing.detach:
                host.detach()
            else:
                host.end(closing)
        if self._nursery is not None:
            self._stop()

    def _stop(self) -> None:
        """The core has decided the close: end the session's tasks (the one way)."""
        assert self._nursery is not None
        if self._helpers:
            self._nursery.cancel_scope.cancel()
        else:  # each told to stop, none cancelled mid-wait: the cheap and common way out
            self._reading.cancel()
            self._outbound.stop_taking()
            self._stopping.set()

    async def _do(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            await self.queue(effect.text)
        elif isinstance(effect, StartRun):
            self.host.start_run(effect.run_id, effect.message)
        elif isinstance(effect, CancelRun):
            self.host.cancel_run(effect.run_id)
        elif isinstance(effect, Refresh):
            self._spawn(self._refresh, effect.token, name="wsgate.session.refresh")
        elif isinstance(effect, Resume):
            await self._resume(effect.message)
        elif isinstance(effect, Close):
            self.act(effect)
        elif effect is START_PING:
            self._spawn(self._heartbeat, name="wsgate.session.heartbeat")
        elif effect is RECHECK:
            self._spawn(self._services.recheck, self, name="wsgate.session.recheck")

    async def _resume(self, message: SessionResume) -> None:
        """``session.resume``: serve the session it names from now on, or say why not."""
        found = await self._services.resume(self, message)
        # Nothing awaited since the resumed host took this connection on: its replay goes first.
        answer = self.core.resumed(found.token, found.reason)
        self._outbound.put_raw([answer, *found.replay])
        self._rearm()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any, name: str) -> None:
        assert self._nursery is not None
        self._helpers += 1
        self._nursery.start_soon(self._helper, fn, args, name=name)

    async def _helper(self, fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self._helpers -= 1

    def _rearm(self) -> None:
        """The core's next timer may have moved (a refresh, a pong): move the watchdog's sleep."""
        if self._wake is not None:
            self._wake.deadline = self.core.next_wake(self._services.trio_time)

    # -- the outbound queue ----------------------------------------------------------

    def _put(self, text: str) -> bool:
        """Queue ``text`` if there is room, numbered as it goes in."""
        outbound = self._outbound
        if not outbound.has_room:
            return False
        if not self.host.hold(text):
            outbound.put_nowait(self.core.number(text))
        return True

    def relay(self, frame: str) -> None:
        """A message numbered on another node, for this connection as it is."""
        self._outbound.put_raw([frame])

    async def queue(self, text: str) -> bool:
        """Queue one message; waits only while the queue is full (the only checkpoint), and a
        consumer that keeps it full for ``slow_consumer_timeout`` is closed (1008). False when
        it was not queued: the connection is closing."""
        if self._put(text):
            return True
        with trio.move_on_after(self._settings.slow_consumer_timeout):
            while self._closed is None:
                if self._put(text):
                    return True
                await self._outbound.wait_not_full()
            return False
        self.act(self.core.close(effects.SLOW_CONSUMER))
        return False

    def _offer(self, text: str) -> bool:
        if self._put(text):
            return True
        if self.core.push_dropped() and self._nursery is not None:
            self._nursery.start_soon(self._watch_overflow)
        return False

    async def _watch_overflow(self) -> None:
        with trio.move_on_after(self._settings.slow_consumer_timeout) as waited:
            await self._outbound.wait_not_full()
        if waited.cancelled_caught:
            self.act(self.core.close(effects.SLOW_CONSUMER))
        else:
            await self._do(self.core.caught_up())

    # -- tasks -------------------------------------------------------------------------

    async def _writer(self) -> None:
        # What is queued by the time the writer runs goes out in one write: under load
        # (an agent's burst of events, a pipelining client) that is one system call
        # and one shielded scope for many messages instead of one each.
        while texts := await self._outbound.take(WRITE_BATCH_MESSAGES, WRITE_BATCH_BYTES):
            if not await self._write(texts):
                return

    async def _write(self, frames: list[str]) -> bool:
        # A message taken from the queue is written whole even while the session is
        # being cancelled (a frame cut in half would corrupt the stream), within a bound.
        # The deadline is given at construction: set on an entered scope, it costs a second
        # registration with the run loop, on every write.
        bound = trio.current_time() + self._settings.slow_consumer_timeout
        with trio.CancelScope(shield=True, deadline=bound) as scope:
            try:
                await send_texts(self.ws, frames)
            except ConnectionClosed as closed:
                self._socket_gone(closed)
                return False
        if scope.cancelled_caught:
            self._writable = False
            self.act(self.core.close(effects.WRITE_STUCK))
            return False
        return True

    def _socket_gone(self, closed: ConnectionClosed) -> None:
        self._writable = False
        dropped = closed.reason is not None and closed.reason.code == CloseCode.ABNORMAL_CLOSURE
        self.act(self.core.close(effects.DROPPED if dropped else effects.CLIENT_CLOSED))

    async def _reader(self) -> None:
        idle = self._settings.idle_timeout
        with self._reading:
            while self._closed is None:
                if idle:
                    self._reading.deadline = trio.current_time() + idle
                try:
                    raw = await self.ws.get_message()
                except ConnectionClosed as closed:
                    self._socket_gone(closed)
                    return
                if idle:
                    self._reading.deadline = math.inf  # idle is waiting for a message, not handling one
                effect = self.core.receive(raw, trio.current_time())
                if effect is not None:
                    await self._do(effect)
                del raw, effect  # they may carry a token: not kept while waiting for the next message
        if self._reading.cancelled_caught and self._closed is None:
            self.act(self.core.close(effects.IDLE))

    async def _watchdog(self) -> None:
        """Asleep until the core's next timer (moved by refreshes and pongs), then acts on it."""
        services = self._services
        while self._closed is None:
            self._wake = trio.CancelScope(deadline=self.core.next_wake(services.trio_time))
            with self._wake:
                await self._stopping.wait()
            if self._closed is None:
                for effect in self.core.timer(trio.current_time(), services.wall_now()):
                    await self._do(effect)

    async def _heartbeat(self) -> None:
        """One ping; no pong within ``heartbeat_timeout`` ends the session (1001)."""
        with trio.move_on_after(self._settings.heartbeat_timeout) as waited:
            try:
                await self.ws.ping()
            except ConnectionClosed as closed:
                self._socket_gone(closed)
                return
        if waited.cancelled_caught:
            self._writable = False  # nothing more can usefully be written
            self.act(self.core.close(effects.PING_TIMEOUT))
            return
        self.core.pong(trio.current_time())
        self._rearm()

    async def _refresh(self, token: str) -> None:
        """In-band refresh: one at a time, in arrival order, by the gateway's one auth path."""
        if self._refresh_lock is None:
            self._refresh_lock = trio.StrictFIFOLock()
        async with self._refresh_lock:
            try:
                admission = await self._services.refresh(token)
            except GatewayError as exc:
                effect = self.core.refresh_failed(exc.reason)
            else:
                effect = self.core.refreshed(admission, self._services.wall_now())
                self._rearm()
            if effect is not None:
                await self._do(effect)

    async def _finish(self) -> None:
        """Flush what is queued, then close the socket with the core's code."""
        closing = self._closed or Close(CloseCode.NORMAL, "")
        with trio.move_on_after(self._settings.close_timeout) as cleanup:
            cleanup.shield = True
            self._outbound.close()
            if closing.flush and self._writable:
                while texts := self._outbound.take_nowait(WRITE_BATCH_MESSAGES, WRITE_BATCH_BYTES):
                    if not await self._write(texts):
                        break
            await self.ws.aclose(int(closing.code), closing.reason[:120] or None)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "session closed",
                extra={
                    "event": "session.closed",
                    "session": self.id,
                    "subject": self.identity.subject_hash,
                    "code": int(closing.code),
                    "reason": closing.reason,
                },
            )
