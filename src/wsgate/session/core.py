"""A session's rules as a plain object, in the manner of h11: events in, effects out.

:class:`SessionCore` holds what a session is (its identity, token lifecycle,
runs and message numbering) and decides everything that happens to it. It
does no I/O and reads no clock: each event is a method call given the current
time, and each returns the effects for the Trio shell
(:class:`wsgate.session.Session`) to carry out: text to queue, a run to start
or cancel, a refresh to verify, a ping to send, a re-check to make, or the
session's close.

A connection ends one way: :meth:`SessionCore.end` records the first
:class:`Close`; after that the core takes no event of that connection. Whether
what is queued is still flushed is part of the close (``flush``). A close that
is not final (``detach``) leaves the session detached: its runs go on, and what
they send is numbered and logged for the client that resumes it. A final close,
or one while detached, ends the session.

Every message but ``session.ready`` and ``session.resumed`` is numbered (``seq``,
per session, across its connections) as it is queued, and kept in its log. The
core never holds the socket, so the same object outlives its connections.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ..auth.tokens import Identity
from ..errors import CloseCode
from ..handshake import Admission
from ..protocol import (
    Auth,
    AuthRefresh,
    Ping,
    ProtocolError,
    RunCancel,
    SessionResume,
    UserMessage,
    numbered,
    parse_client_message,
)
from ..ratelimit import SlidingWindow, TokenBucket
from .effects import (
    RECHECK,
    SLOW_CONSUMER,
    START_PING,
    CancelRun,
    Close,
    Effect,
    Refresh,
    Resume,
    Rules,
    Send,
    StartRun,
    State,
)
from .lifecycle import Action, TokenLifecycle
from .log import MessageLog, ResumeKey
from .messages import (
    RESERVED_FIELDS,
    AgentEvent,
    AuthExpiring,
    AuthRefreshed,
    Draining,
    Error,
    Ready,
    Restored,
    Resumed,
    encode_message,
    encode_pong,
)


class _Run:
    __slots__ = ("completed", "message_id")

    def __init__(self, message_id: str | None) -> None:
        self.message_id = message_id
        self.completed = False


class SessionCore:
    """The state and rules of one session. Times: ``now`` is the monotonic clock the rate
    limits and the heartbeat use, ``wall`` epoch seconds like the token's ``exp``."""

    __slots__ = (
        "_dropped",
        "_fresh",
        "_message_rate",
        "_ping_at",
        "_protocol_errors",
        "_reconnect_after",
        "_refreshes",
        "_rules",
        "_runs",
        "closing",
        "degraded",
        "following",
        "id",
        "identity",
        "last_run",
        "lifecycle",
        "log",
        "resume_key",
        "resume_window",
        "state",
        "stats",
        "token",
    )

    def __init__(
        self,
        session_id: str,
        admission: Admission,
        lifecycle: TokenLifecycle,
        rules: Rules,
        *,
        now: float,
        stats: Counter[str] | None = None,
    ) -> None:
        self.id = session_id
        self.identity: Identity = admission.identity
        self.degraded = admission.degraded
        #: The current token, kept only where the auth service may re-check it.
        self.token = admission.token
        self.lifecycle = lifecycle
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.state = State.OPEN
        self.closing: Close | None = None
        self._rules = rules
        self._message_rate = TokenBucket(rules.message_rate, rules.message_burst, now)
        # When the next ping is due; None: no heartbeat, or a ping in flight.
        self._ping_at: float | None = now + rules.heartbeat_interval if rules.heartbeat_interval > 0 else None
        self._refreshes: SlidingWindow | None = None  # made on the first refresh: most never do
        self._protocol_errors = 0
        self._dropped = 0
        self._reconnect_after = 0.0
        self._runs: dict[str, _Run] = {}
        self.last_run = 0
        #: The last messages numbered, to replay on resume.
        self.log = MessageLog(rules.log_events if rules.resume_window > 0 else 0, rules.log_bytes)
        self.resume_window = rules.resume_window
        self.resume_key = ResumeKey()
        self._fresh = True  # nothing numbered nor received yet: session.resume may come
        #: Runs of this session still run on another node (it was resumed here).
        self.following = False

    # -- ending ------------------------------------------------------------------

    def end(self, code: CloseCode, reason: str, *, flush: bool = True, detach: bool = False) -> Close | None:
        """The one way a connection ends: the first close decided wins; None after that.
        ``detach``: the session outlives the connection (where resuming is on). A final close
        of a detached session ends it (the returned close has no connection to go to)."""
        detach = detach and self._rules.resume_window > 0
        if self.state is State.CLOSED or (detach and self.state is State.DETACHED):
            return None
        if self.state is State.DETACHED:
            self.state = State.CLOSED
            return Close(code, reason, flush=False, detach=False)
        if self.closing is not None:
            return None
        self.state = State.DETACHED if detach else State.CLOSED
        self.closing = Close(code, reason, flush, detach)
        self.token = None  # nothing re-checks a closing session, nor a detached one
        return self.closing

    def close(self, close: Close) -> Close | None:
        """End the connection one of the ways of :mod:`.effects` (``DROPPED``, ``IDLE``, ...)."""
        if close is SLOW_CONSUMER and self.closing is None:
            self.stats["send.slow_consumer_closed"] += 1
        return self.end(close.code, close.reason, flush=close.flush, detach=close.detach)

    # -- messages ----------------------------------------------------------------

    def ready(self, resume_token: str | None) -> str:
        """``session.ready`` (not numbered), giving the client the token to resume with."""
        token = self._new_resume_token(resume_token)
        return encode_message(Ready.of(self.id, self.identity, self.degraded, token))

    def _new_resume_token(self, token: str | None) -> str | None:
        return self.resume_key.issue(token) if self._rules.resume_window > 0 else None

    def number(self, text: str) -> str:
        """Give a message its ``seq`` as it is queued, and keep it for a resume: the one place
        messages are numbered, so a gap never appears on the wire nor in the log."""
        self._fresh = False
        frame = numbered(text, self.log.last + 1)
        self.log.append(frame)
        return frame

    @property
    def seq(self) -> int:
        """The number of the last message numbered."""
        return self.log.last

    # -- resuming -----------------------------------------------------------------------

    def resume(self, admission: Admission, now: float, wall: float) -> None:
        """The session is served by a new connection, admitted with ``admission`` (the same
        user's). Its runs go on; limits and the token lifecycle continue from the new token."""
        if self.state is State.CLOSED:
            raise ValueError("the session has ended")
        identity = admission.identity
        self.state = State.OPEN
        self.closing = None
        self.identity = identity
        self.degraded = admission.degraded
        self.token = admission.token
        self.lifecycle.on_refresh(identity.expires_at, identity.issued_at, wall)
        self._ping_at = now + self._rules.heartbeat_interval if self._rules.heartbeat_interval > 0 else None
        self._protocol_errors = 0
        self._dropped = 0

    def running(self) -> list[tuple[str, str | None]]:
        """The runs in flight: (run_id, message_id)."""
        return [(run_id, run.message_id) for run_id, run in self._runs.items()]

    def resumed(self, resume_token: str | None, reason: str | None = None) -> str:
        """``session.resumed`` (not numbered): recovered unless ``reason``; with a new token."""
        token = self._new_resume_token(resume_token)
        return encode_message(Resumed(self.id, reason is None, token, reason))

    # -- client messages ---------------------------------------------------------

    def receive(self, raw: str | bytes, now: float) -> Effect | None:
        """One client frame. At most one effect; a close ends the reading."""
        if self.closing is not None:
            return None
        fresh, self._fresh = self._fresh, False
        if not self._message_rate.take(now):
            return self.end(CloseCode.RATE_LIMITED, "message rate exceeded")
        try:
            message = parse_client_message(raw, max_depth=self._rules.max_json_depth)
        except ProtocolError as exc:
            self._protocol_errors += 1
            if self._protocol_errors > self._rules.max_protocol_errors:
                return self.end(CloseCode.MALFORMED_MESSAGE, "too many malformed messages")
            return self._error(exc.code, exc.reason)
        if isinstance(message, Ping):
            return Send(encode_pong(message.id))
        if isinstance(message, UserMessage):
            return self._start_run(message)
        if isinstance(message, RunCancel):
            if message.run_id not in self._runs:
                return self._error("unknown_run", f"no active run '{message.run_id}'")
            return CancelRun(message.run_id)
        if isinstance(message, AuthRefresh):
            if self._refreshes is None:
                self._refreshes = SlidingWindow(self._rules.refresh_limit, self._rules.refresh_window)
            if not self._refreshes.take(now):
                return self.end(CloseCode.RATE_LIMITED, "too many token refreshes")
            return Refresh(message.token)
        if isinstance(message, SessionResume):
            if not fresh:
                return self._error(
                    "resume_not_first", "session.resume must be the connection's first message"
                )
            return Resume(message)
        assert isinstance(message, Auth)
        return self._error("already_authenticated", "this connection is already authenticated")

    def _error(self, code: str, reason: str) -> Send:
        return Send(encode_message(Error(code, reason)))

    def _start_run(self, message: UserMessage) -> Effect:
        if self.state is State.DRAINING:
            return self._error("draining", "the server is draining; reconnect to start new runs")
        if self.following:
            return self._error("runs_elsewhere", "this session's runs on another node have not ended yet")
        if len(self._runs) >= self._rules.max_runs:
            return self._error("too_many_runs", "too many runs in progress on this connection")
        self.last_run += 1
        run_id = f"r{self.last_run}"
        self._runs[run_id] = _Run(message.id)
        return StartRun(run_id, message)

    # -- refreshes ---------------------------------------------------------------

    def refreshed(self, admission: Admission, wall: float) -> Effect | None:
        """A refresh verified and admitted at ``wall``: accepted, or the session ends."""
        if self.closing is not None:
            return None
        identity = admission.identity
        if identity.user_key != self.identity.user_key:
            self.stats["refresh.other_subject"] += 1
            return self.end(CloseCode.FORBIDDEN, "refresh with another subject")
        if not self.lifecycle.accepts_refresh(wall):
            return self.end(CloseCode.UNAUTHORIZED, "token expired before the refresh was decided")
        self.identity = identity
        self.degraded = admission.degraded
        self.token = admission.token
        self.stats["refresh.ok"] += 1
        self.lifecycle.on_refresh(identity.expires_at, identity.issued_at, wall)
        return Send(encode_message(AuthRefreshed(identity.expires_at, admission.degraded)))

    def refresh_failed(self, reason: str) -> Effect | None:
        """The refresh was refused: the old token still holds until it expires."""
        if self.closing is not None:
            return None
        return self._error("refresh_rejected", reason)

    # -- timers ------------------------------------------------------------------

    def next_wake(self, to_now: Callable[[float], float]) -> float:
        """When :meth:`timer` is next due, on the ``now`` clock (``to_now`` converts wall)."""
        wake = to_now(self.lifecycle.next_deadline())
        return wake if self._ping_at is None else min(wake, self._ping_at)

    def timer(self, now: float, wall: float) -> list[Effect]:
        """The session's timer fired: what is due (a ping, the token's warning, expiry, a re-check)."""
        if self.closing is not None:
            return []
        effects: list[Effect] = []
        if self._ping_at is not None and now >= self._ping_at:
            self._ping_at = None  # pong() sets the next one
            effects.append(START_PING)
        for action in self.lifecycle.due(wall):
            if action is Action.EXPIRE:
                closing = self.end(CloseCode.UNAUTHORIZED, "token expired")
                return [closing] if closing is not None else []
            if action is Action.WARN:
                expires_at = self.lifecycle.expires_at
                warning = AuthExpiring(expires_at, max(0.0, round(expires_at - wall, 3)))
                effects.append(Send(encode_message(warning)))
            elif action is Action.REVALIDATE and self.token is not None:
                effects.append(RECHECK)
        return effects

    def pong(self, now: float) -> None:
        """The ping was answered: the next is due one interval from now."""
        if self.closing is None:
            self._ping_at = now + self._rules.heartbeat_interval

    # -- runs --------------------------------------------------------------------

    @property
    def token_for_agent(self) -> str | None:
        """The client's token, for its agent only where ``agent.forward_client_token`` is set."""
        return self.token if self._rules.share_token else None

    def run_event(self, run_id: str, event: str, data: dict[str, Any]) -> str:
        """An event the agent emits: its text to queue. Raises for an event the agent may
        not send (its run's error, not the session's)."""
        run = self._runs[run_id]
        if event not in self._rules.agent_events:
            raise ValueError(f"not an agent event: {event!r}")
        if run.completed:
            raise RuntimeError("the run has already completed")
        reserved = RESERVED_FIELDS.intersection(data)
        if reserved:
            raise ValueError(f"fields the gateway sets: {', '.join(sorted(reserved))}")
        run.completed = event == "agent_completed"
        self.stats["agent_events"] += 1
        return encode_message(AgentEvent(event, run_id, run.message_id, data))

    def run_ended(self, run_id: str, status: str) -> list[Effect]:
        """A run ended (``ok``, ``cancelled`` or ``error``): its terminal event unless the
        agent sent one, and the drained session's close after its last run."""
        run = self._runs.pop(run_id)
        self.stats[f"run.{status}"] += 1
        effects: list[Effect] = []
        if self.state is State.CLOSED:
            return effects  # nothing more is sent once the session has ended
        if not run.completed:
            completed = AgentEvent("agent_completed", run_id, run.message_id, {"status": status})
            effects.append(Send(encode_message(completed)))
        if self.state is State.DRAINING and not self._runs:
            effects.append(self._drained())
        return effects

    # -- draining ----------------------------------------------------------------

    def drain(self, reconnect_after: float) -> list[Effect]:
        """Stop taking runs; the session closes (1001) once the running ones have ended."""
        if self.state is not State.OPEN:
            return []
        self.state = State.DRAINING
        self._reconnect_after = reconnect_after
        effects: list[Effect] = [Send(encode_message(Draining(round(reconnect_after, 1))))]
        if not self._runs:
            effects.append(self._drained())
        return effects

    def _drained(self) -> Close:
        closing = self.end(
            CloseCode.GOING_AWAY,
            f"server draining; reconnect after {self._reconnect_after:.1f} s",
            detach=True,
        )
        assert closing is not None
        return closing

    # -- server pushes -------------------------------------------------------------

    def offer(self) -> bool:
        """Whether a server push (encoded once for all its connections) may be queued: not
        once the connection is closing."""
        return self.closing is None

    def push_dropped(self) -> bool:
        """A push found the queue full and was dropped. True for the first of a run of
        drops: watch whether the client catches up within ``slow_consumer_timeout``."""
        self._dropped += 1
        self.stats["send.dropped"] += 1
        return self._dropped == 1

    def caught_up(self) -> Send:
        """The queue has room again: tell the client how many pushes it missed."""
        dropped, self._dropped = self._dropped, 0
        return Send(encode_message(Error("events_dropped", f"{dropped} events dropped", dropped)))

    def restored(self) -> str | None:
        """The auth service answers again and holds the token active: no longer degraded."""
        if self.closing is not None or not self.degraded:
            return None
        self.degraded = False
        self.stats["recheck.restored"] += 1
        return encode_message(Restored())
