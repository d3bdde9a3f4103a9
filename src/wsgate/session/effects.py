"""What a session core tells its shell to do (effects), its states, and its rules' limits."""

from __future__ import annotations

import enum

import attrs

from ..config import Settings
from ..errors import CloseCode
from ..protocol import AGENT_EVENTS, SessionResume, UserMessage


class State(enum.Enum):
    OPEN = "open"
    DRAINING = "draining"  # no new runs; closes (1001) once the last run has ended
    #: The connection ended without a final close: runs go on, what they send is logged,
    #: and a client may resume the session within ``resume.window``.
    DETACHED = "detached"
    CLOSED = "closed"  # the session has ended; runs still running are being cancelled


@attrs.frozen
class Rules:
    """The limits every session of a gateway shares (made once, from the settings)."""

    heartbeat_interval: float = 20.0
    max_runs: int = 4
    max_json_depth: int = 16
    message_rate: float = 20.0
    message_burst: int = 40
    refresh_limit: int = 10
    refresh_window: float = 60.0
    max_protocol_errors: int = 20
    #: What an agent may emit: wsgate's agent events and ``agent.passthrough_events``.
    agent_events: frozenset[str] = AGENT_EVENTS
    #: Whether a run's agent is given the client's token (``agent.forward_client_token``).
    share_token: bool = False
    #: Seconds a detached session waits to be resumed (``resume.window``); 0: never detached.
    resume_window: float = 0.0
    log_events: int = 1000
    log_bytes: int = 1024 * 1024

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        server, auth = settings.server, settings.auth
        return cls(
            heartbeat_interval=server.heartbeat_interval,
            max_runs=server.max_runs_per_session,
            max_json_depth=server.max_json_depth,
            message_rate=server.message_rate,
            message_burst=server.message_burst,
            refresh_limit=auth.refresh_limit,
            refresh_window=auth.refresh_window,
            agent_events=AGENT_EVENTS | frozenset(settings.agent.passthrough_events),
            share_token=settings.agent.forward_client_token,
            resume_window=settings.resume.window,
            log_events=settings.resume.max_events,
            log_bytes=settings.resume.max_bytes,
        )


# -- effects: what the shell is told to do ---------------------------------------


@attrs.frozen
class Send:
    """Queue this text (an encoded server message), waiting while the queue is full."""

    text: str


@attrs.frozen
class StartRun:
    run_id: str
    message: UserMessage


@attrs.frozen
class CancelRun:
    run_id: str


@attrs.frozen
class Refresh:
    """Verify this token; answer with :meth:`SessionCore.refreshed` or ``refresh_failed``."""

    token: str = attrs.field(repr=False)


@attrs.frozen
class Resume:
    """The connection's first message asks to resume another session."""

    message: SessionResume


@attrs.frozen
class Close:
    """The connection ends with ``code``. ``flush``: what is queued is still written first.
    ``detach``: the session outlives it (detached), else it ends with it."""

    code: CloseCode
    reason: str
    flush: bool = True
    detach: bool = False


# -- the ways a connection ends that are not a client's message --------------------
# ``detach``: the session outlives the connection (where resuming is on); else it ends too.

CLIENT_CLOSED = Close(CloseCode.NORMAL, "client closed", flush=False)
DROPPED = Close(CloseCode.ABNORMAL_CLOSURE, "connection dropped (no close frame)", flush=False, detach=True)
IDLE = Close(CloseCode.NORMAL, "idle timeout")
SLOW_CONSUMER = Close(CloseCode.POLICY_VIOLATION, "slow consumer", detach=True)
#: A write did not finish within ``slow_consumer_timeout``: the stream takes no more writes.
WRITE_STUCK = Close(CloseCode.POLICY_VIOLATION, "slow consumer", flush=False, detach=True)
PING_TIMEOUT = Close(CloseCode.GOING_AWAY, "ping timeout", flush=False, detach=True)
#: The session is resumed on another connection: this one closes.
MOVED = Close(CloseCode.SESSION_MOVED, "session resumed on another connection", flush=False, detach=True)
#: Detached for ``resume.window`` without being resumed: the session ends.
WINDOW_PASSED = Close(CloseCode.GOING_AWAY, "not resumed within resume.window")
REVOKED = Close(CloseCode.FORBIDDEN, "token revoked")
#: A bug in the gateway: 1011, and nothing more is written.
FAILED = Close(CloseCode.INTERNAL_ERROR, "internal error", flush=False)


class _Signal(enum.Enum):
    START_PING = "start ping"  # send one ping; answer with pong() or ping_timeout()
    RECHECK = "recheck"  # ask the auth service about the session's token again


START_PING = _Signal.START_PING
RECHECK = _Signal.RECHECK

Effect = Send | StartRun | CancelRun | Refresh | Resume | Close | _Signal
