"""One connection after the upgrade: a nursery of reader, writer, watchdog and agent runs.

The reader is the nursery's body; the writer sends what is queued; the
watchdog sleeps until the token lifecycle's next deadline or the next ping
and starts a short heartbeat task for each ping; each agent run has a child
scope. The session's tasks live and die together. Whatever ends the connection (the
client leaving, a slow consumer, expiry, a bug) calls :meth:`Session.close`
once with a close code; that cancels the nursery, queued messages are flushed
within ``close_timeout``, and the WebSocket is closed with that code.

When the reader itself ends the session (the client closed, or broke a limit)
and only the writer and the watchdog are left, they are told to stop instead
of being cancelled: each ends on its own at once, and the nursery closes
without a ``Cancelled`` raised through it (the cheaper way out, and the most
common close of all).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .agent import Agent, RunContext
from .config import ServerSettings
from .errors import CloseCode, GatewayError
from .handshake import Admission
from .lifecycle import Action, TokenLifecycle
from .outbound import OutboundQueue
from .protocol import (
    AGENT_EVENTS,
    PROTOCOL_VERSION,
    Auth,
    AuthRefresh,
    ClientMessage,
    Ping,
    ProtocolError,
    RunCancel,
    UserMessage,
    encode,
    encode_pong,
    numbered,
    parse_client_message,
)
from .ratelimit import TokenBucket
from .tokens import Identity
from .wsconn import send_texts

log = logging.getLogger("wsgate.session")

MAX_PROTOCOL_ERRORS = 20
WRITE_BATCH_MESSAGES = 64  # at most this many queued messages per write
WRITE_BATCH_BYTES = 256 * 1024  # and no more bytes than this, unless one message is larger
_WRITER = "wsgate.session.writer"
_WATCHDOG = "wsgate.session.watchdog"


class SessionHooks(Protocol):
    """What a session needs from its gateway (the gateway implements it)."""

    def wall_now(self) -> float: ...

    def trio_time(self, wall: float) -> float: ...

    async def refresh(self, token: str) -> Admission: ...

    async def recheck(self, session: Session) -> None: ...


class Session:
    """Serves one authenticated WebSocket until it closes."""

    # Slots, not a __dict__: an idle connection's footprint is mostly objects like this one.
    __slots__ = (
        "_agent",
        "_client_gone",
        "_draining",
        "_dropped",
        "_hooks",
        "_last_run",
        "_message_rate",
        "_nursery",
        "_outbound",
        "_overflow_watch",
        "_ping_at",
        "_protocol_errors",
        "_reconnect_after",
        "_refresh_limit",
        "_refresh_lock",
        "_refresh_times",
        "_runs",
        "_seq",
        "_settings",
        "_sleeper",
        "_stream_stuck",
        "_token",
        "_wake",
        "close_code",
        "close_reason",
        "degraded",
        "id",
        "identity",
        "lifecycle",
        "stats",
        "ws",
    )

    def __init__(
        self,
        session_id: str,
        ws: WebSocketConnection,
        identity: Identity,
        agent: Agent,
        settings: ServerSettings,
        *,
        hooks: SessionHooks,
        lifecycle: TokenLifecycle,
        degraded: bool = False,
        token: str | None = None,
        refresh_limit: tuple[int, float] = (10, 60.0),
        stats: Counter[str] | None = None,
    ) -> None:
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.id = session_id
        self._token = token
        self._hooks = hooks
        self.lifecycle = lifecycle
        self._wake: trio.CancelScope | None = None  # the watchdog's sleep, moved by refreshes
        self._sleeper = trio.lowlevel.ParkingLot()  # the watchdog, asleep until its next timer
        interval = settings.heartbeat_interval
        # When the watchdog starts the next ping (trio time); None: no heartbeat, or one in flight.
        self._ping_at: float | None = trio.current_time() + interval if interval > 0 else None
        # Made on the first refresh: most connections never refresh, and every one pays.
        self._refresh_lock: trio.StrictFIFOLock | None = None
        self._refresh_limit = refresh_limit
        self._refresh_times: deque[float] | None = None
        self._message_rate = TokenBucket(settings.message_rate, settings.message_burst, trio.current_time())
        self.ws = ws
        self.identity = identity
        self.degraded = degraded
        self._agent = agent
        self._settings = settings
        self._outbound = OutboundQueue(settings.send_queue_messages, settings.send_queue_bytes)
        self._dropped = 0
        self._overflow_watch = False
        self._nursery: trio.Nursery | None = None
        self._seq = 0
        self._last_run = 0
        self._runs: dict[str, trio.CancelScope] = {}
        self._protocol_errors = 0
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self._client_gone = False
        self._stream_stuck = False
        self._draining = False
        self._reconnect_after = 0.0

    # -- public ---------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The current token, kept only where the auth service may re-check it."""
        return self._token

    def close(self, code: CloseCode, reason: str) -> None:
        """End the session with ``code``; the first call wins, later ones are ignored."""
        self._decide(code, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()  # run() cancels at once if it opens later

    def _decide(self, code: CloseCode, reason: str) -> None:
        """Record why the session ends (the first reason wins) without cancelling anything:
        for the reader, which returns right after, and :meth:`_wind_down` does the rest."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    async def send(self, message: dict[str, Any]) -> None:
        """Queue one message; a consumer that stays full too long is closed (1008)."""
        text = encode(message)
        if self._outbound.put_nowait(text):
            await trio.lowlevel.checkpoint()  # a send is always a checkpoint
            return
        await self._put_waiting(text)

    async def _reply(self, text: str) -> None:
        """Queue the reader's answer to a client message. The reader checkpoints on every
        read, so an answer that fits in the queue does not yield a second time."""
        if not self._outbound.put_nowait(text):
            await self._put_waiting(text)

    async def _put_waiting(self, text: str) -> None:
        with trio.move_on_after(self._settings.slow_consumer_timeout) as waited:
            await self._outbound.put(text)
        if waited.cancelled_caught:
            self._close_slow_consumer()

    def _close_slow_consumer(self) -> None:
        """Its queue stayed full for ``slow_consumer_timeout``: 1008."""
        self.stats["send.slow_consumer_closed"] += 1
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer")

    def offer(self, message: dict[str, Any]) -> bool:
        """Queue without waiting (server push). When full, the message is dropped, the
        client is told how many were dropped once it catches up, and a consumer that
        stays full beyond ``slow_consumer_timeout`` is closed (1008)."""
        if self.close_code is not None:
            return False
        if self._outbound.put_nowait(encode(message)):
            return True
        self._dropped += 1
        self.stats["send.dropped"] += 1
        if not self._overflow_watch and self._nursery is not None:
            self._overflow_watch = True
            self._nursery.start_soon(self._watch_overflow)
        return False

    async def _watch_overflow(self) -> None:
        with trio.move_on_after(self._settings.slow_consumer_timeout) as waited:
            await self._outbound.wait_not_full()
        if waited.cancelled_caught:
            self._close_slow_consumer()
            return
        dropped, self._dropped, self._overflow_watch = self._dropped, 0, False
        await self.send(
            {
                "type": "error",
                "code": "events_dropped",
                "message": f"{dropped} events dropped",
                "dropped": dropped,
            }
        )

    async def run(self) -> None:
        """Serve until closed. Never raises except Cancelled; a bug closes with 1011."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.close_code is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer, name=_WRITER)
                await self.send(self._ready_message())
                nursery.start_soon(self._watchdog, nursery, name=_WATCHDOG)
                # The reader is the nursery's own body: one task fewer per connection.
                await self._reader(nursery)
                self._wind_down(nursery)
        except Exception:
            log.exception("session failed", extra={"session": self.id, "event": "session.error"})
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        await self._finish()

    def _wind_down(self, nursery: trio.Nursery) -> None:
        """The reader has returned, having decided the close. If only the writer and the
        watchdog are left, each is told to stop (the writer once it has written what is
        queued) and ends without a ``Cancelled``; if anything else runs, all is cancelled."""
        if all(task.name in (_WRITER, _WATCHDOG) for task in nursery.child_tasks):
            self._outbound.stop_taking()
            self._sleeper.unpark_all()  # woken, not cancelled: no Cancelled raised
        else:
            nursery.cancel_scope.cancel()

    # -- tasks ----------------------------------------------------------------

    def _ready_message(self) -> dict[str, Any]:
        identity = self.identity
        return {
            "type": "session.ready",
            "session_id": self.id,
            "subject": identity.subject,
            "tenant": identity.tenant,
            "scopes": sorted(identity.scopes),
            "expires_at": identity.expires_at,
            "degraded": self.degraded,
            "anonymous": identity.anonymous,
            "protocol": PROTOCOL_VERSION,
        }

    async def _writer(self) -> None:
        # What is queued by the time the writer runs goes out in one write: under load
        # (an agent's burst of events, a pipelining client) that is one system call
        # and one shielded scope for many messages instead of one each.
        while texts := await self._outbound.take(WRITE_BATCH_MESSAGES, WRITE_BATCH_BYTES):
            if not await self._write(texts):
                return

    async def _write(self, texts: list[str]) -> bool:
        frames = []
        for text in texts:
            self._seq += 1
            frames.append(numbered(text, self._seq))
        # A message taken from the queue is written whole even while the session is
        # being cancelled (a frame cut in half would corrupt the stream), within a bound.
        # The deadline is given at construction: set on an entered scope, it costs a second
        # registration with the run loop, on every write.
        bound = trio.current_time() + self._settings.slow_consumer_timeout
        with trio.CancelScope(shield=True, deadline=bound) as scope:
            try:
                await send_texts(self.ws, frames)
            except ConnectionClosed as closed:
                self._client_left(closed)
                return False
        if scope.cancelled_caught:
            self._stream_stuck = True
            self.close(CloseCode.POLICY_VIOLATION, "slow consumer")
            return False
        return True

    async def _heartbeat(self) -> None:
        """One ping, started by the watchdog every ``heartbeat_interval`` after the last
        pong; no pong within ``heartbeat_timeout`` ends the session. A short task per
        ping, not one asleep through every interval: idle connections hold one task fewer."""
        with trio.move_on_after(self._settings.heartbeat_timeout) as waited:
            try:
                await self.ws.ping()
            except ConnectionClosed as closed:
                self._client_left(closed)
                return
        if waited.cancelled_caught:
            self._stream_stuck = True  # nothing more can usefully be written
            self.close(CloseCode.GOING_AWAY, "ping timeout")
            return
        self._ping_at = trio.current_time() + self._settings.heartbeat_interval
        self._move_wake()

    async def _reader(self, nursery: trio.Nursery) -> None:
        idle = self._settings.idle_timeout
        while True:
            try:
                if idle:
                    with trio.move_on_after(idle) as waited:
                        raw = await self.ws.get_message()
                    if waited.cancelled_caught:
                        self._decide(CloseCode.NORMAL, "idle timeout")
                        return
                else:
                    raw = await self.ws.get_message()
            except ConnectionClosed as closed:
                self._client_left(closed, cancel=False)  # the reader returns: _wind_down does the rest
                return
            if not self._message_rate.take(trio.current_time()):
                self._decide(CloseCode.RATE_LIMITED, "message rate exceeded")
                return
            if not await self._handle(raw, nursery):
                return
            del raw  # it may carry a token: not kept while waiting for the next message

    async def _handle(self, raw: str | bytes, nursery: trio.Nursery) -> bool:
        """Parse and act on one client message; False when it ends the session."""
        try:
            message = parse_client_message(raw, max_depth=self._settings.max_json_depth)
        except ProtocolError as exc:
            self._protocol_errors += 1
            if self._protocol_errors > MAX_PROTOCOL_ERRORS:
                self._decide(CloseCode.MALFORMED_MESSAGE, "too many malformed messages")
                return False
            await self.send_error(exc.code, exc.reason)
            return True
        await self._dispatch(message, nursery)
        return True

    async def _dispatch(self, message: ClientMessage, nursery: trio.Nursery) -> None:
        if isinstance(message, Ping):
            await self._reply(encode_pong(message.id))
        elif isinstance(message, UserMessage):
            await self._start_run(message, nursery)
        elif isinstance(message, RunCancel):
            scope = self._runs.get(message.run_id)
            if scope is None:
                await self.send_error("unknown_run", f"no active run '{message.run_id}'")
            else:
                scope.cancel()
        elif isinstance(message, AuthRefresh):
            if self._refresh_rate_exceeded():
                self.close(CloseCode.RATE_LIMITED, "too many token refreshes")
                return
            nursery.start_soon(self._refresh, message.token, name="wsgate.session.refresh")
        elif isinstance(message, Auth):
            await self.send_error("already_authenticated", "this connection is already authenticated")

    def _refresh_rate_exceeded(self) -> bool:
        limit, window = self._refresh_limit
        now = trio.current_time()
        if self._refresh_times is None:
            self._refresh_times = deque()
        while self._refresh_times and self._refresh_times[0] <= now - window:
            self._refresh_times.popleft()
        self._refresh_times.append(now)
        return len(self._refresh_times) > limit

    async def _refresh(self, token: str) -> None:
        """In-band refresh: one at a time, in arrival order, by the gateway's one auth path."""
        if self._refresh_lock is None:
            self._refresh_lock = trio.StrictFIFOLock()
        async with self._refresh_lock:
            try:
                result = await self._hooks.refresh(token)
            except GatewayError as exc:
                # The old token still holds until it expires.
                await self.send_error("refresh_rejected", exc.reason)
                return
            if result.identity.user_key != self.identity.user_key:
                self.stats["refresh.other_subject"] += 1
                self.close(CloseCode.FORBIDDEN, "refresh with another subject")
                return
            if not self.lifecycle.accepts_refresh(self._hooks.wall_now()):
                self.close(CloseCode.UNAUTHORIZED, "token expired before the refresh was decided")
                return
            self.identity = result.identity
            self.degraded = result.degraded
            self._token = result.token
            self.stats["refresh.ok"] += 1
            self.lifecycle.on_refresh(
                result.identity.expires_at, result.identity.issued_at, self._hooks.wall_now()
            )
            self._move_wake()
            await self.send(
                {
                    "type": "auth.refreshed",
                    "expires_at": result.identity.expires_at,
                    "degraded": result.degraded,
                }
            )

    def _next_wake(self) -> float:
        """The watchdog's next deadline: the token lifecycle's, or the next ping if sooner."""
        wake = self._hooks.trio_time(self.lifecycle.next_deadline())
        return wake if self._ping_at is None else min(wake, self._ping_at)

    def _move_wake(self) -> None:
        if self._wake is not None:
            self._wake.deadline = self._next_wake()

    async def _watchdog(self, nursery: trio.Nursery) -> None:
        """The session's timer: sleeps until the token lifecycle's next deadline (moved by
        refreshes) or the next heartbeat, whichever is first, then acts on it."""
        while self.close_code is None:
            self._wake = trio.CancelScope(deadline=self._next_wake())
            with self._wake:
                await self._sleeper.park()
            if self.close_code is not None:
                return  # woken by _wind_down
            if self._ping_at is not None and trio.current_time() >= self._ping_at:
                self._ping_at = None  # the ping task sets the next one once answered
                nursery.start_soon(self._heartbeat, name="wsgate.session.heartbeat")
            for action in self.lifecycle.due(self._hooks.wall_now()):
                if action is Action.EXPIRE:
                    self.close(CloseCode.UNAUTHORIZED, "token expired")
                    return
                if action is Action.WARN:
                    expires_at = self.lifecycle.expires_at
                    await self.send(
                        {
                            "type": "auth.expiring",
                            "expires_at": expires_at,
                            "expires_in": max(0.0, round(expires_at - self._hooks.wall_now(), 3)),
                        }
                    )
                elif action is Action.REVALIDATE and self._token is not None:
                    nursery.start_soon(self._hooks.recheck, self, name="wsgate.session.recheck")

    def revoke(self) -> None:
        """Close this session because its token or subject was revoked."""
        self.close(CloseCode.FORBIDDEN, "token revoked")

    async def send_error(self, code: str, reason: str) -> None:
        await self.send({"type": "error", "code": code, "message": reason})

    def drain(self, reconnect_after: float) -> None:
        """Stop taking new runs; close with 1001 once the running ones have finished."""
        if self._draining or self.close_code is not None:
            return
        self._draining = True
        self._reconnect_after = reconnect_after
        self.offer({"type": "session.draining", "reconnect_after": round(reconnect_after, 1)})
        if not self._runs:
            self._close_drained()

    def cancel_runs(self) -> None:
        """Cancel every run (each still ends with its terminal event)."""
        for scope in self._runs.values():
            scope.cancel()

    def _close_drained(self) -> None:
        self.close(CloseCode.GOING_AWAY, f"server draining; reconnect after {self._reconnect_after:.1f} s")

    async def _start_run(self, message: UserMessage, nursery: trio.Nursery) -> None:
        if self._draining:
            await self.send_error("draining", "the server is draining; reconnect to start new runs")
            return
        if len(self._runs) >= self._settings.max_runs_per_session:
            await self.send_error("too_many_runs", "too many runs in progress on this connection")
            return
        self._last_run += 1
        run_id = f"r{self._last_run}"
        scope = trio.CancelScope()
        self._runs[run_id] = scope
        nursery.start_soon(self._run_agent, run_id, message, scope, name="wsgate.session.run")

    async def _run_agent(self, run_id: str, message: UserMessage, scope: trio.CancelScope) -> None:
        completed = False
        tag = {"message_id": message.id} if message.id is not None else {}

        async def emit(event: str, /, **fields: Any) -> None:
            nonlocal completed
            if event not in AGENT_EVENTS:
                raise ValueError(f"not an agent event: {event!r}")
            if completed:
                raise RuntimeError("the run has already completed")
            completed = event == "agent_completed"
            self.stats["agent_events"] += 1
            await self.send({"type": event, "run_id": run_id, **tag, **fields})

        ctx = RunContext(run_id=run_id, session_id=self.id, identity=self.identity)
        status = "ok"
        try:
            with scope:
                await self._agent.run(ctx, message.text, emit)
            if scope.cancelled_caught:
                status = "cancelled"
        except Exception:
            # The agent is the application's code: its failure ends its run, not the connection.
            log.exception("agent run failed", extra={"session": self.id, "run_id": run_id})
            status = "error"
        finally:
            del self._runs[run_id]
        self.stats[f"run.{status}"] += 1
        if not completed:
            await self.send({"type": "agent_completed", "run_id": run_id, **tag, "status": status})
        if self._draining and not self._runs:
            self._close_drained()

    def _client_left(self, closed: ConnectionClosed, *, cancel: bool = True) -> None:
        """The client closed (1000), or its connection dropped without a close frame (1006,
        nothing sent): nothing more to flush either way."""
        self._client_gone = True
        dropped = closed.reason is not None and closed.reason.code == CloseCode.ABNORMAL_CLOSURE
        code, reason = (
            (CloseCode.ABNORMAL_CLOSURE, "connection dropped (no close frame)")
            if dropped
            else (CloseCode.NORMAL, "client closed")
        )
        if cancel:
            self.close(code, reason)
        else:
            self._decide(code, reason)

    async def _finish(self) -> None:
        """Flush what is queued, then close the socket with the recorded code."""
        code = self.close_code or CloseCode.NORMAL
        with trio.move_on_after(self._settings.close_timeout) as cleanup:
            cleanup.shield = True
            self._outbound.close()
            if not (self._client_gone or self._stream_stuck) and code != CloseCode.INTERNAL_ERROR:
                while texts := self._outbound.take_nowait(WRITE_BATCH_MESSAGES, WRITE_BATCH_BYTES):
                    if not await self._write(texts):
                        break
            self._token = None
            await self.ws.aclose(int(code), self.close_reason[:120] or None)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "session closed",
                extra={
                    "event": "session.closed",
                    "session": self.id,
                    "subject": self.identity.subject_hash,
                    "code": int(code),
                    "reason": self.close_reason,
                },
            )
