"""What a session core tells its shell to do (effects), its states, and its rules' limits."""

from __future__ import annotations

import enum

import attrs

from ..config import Settings
from ..errors import CloseCode
from ..protocol import AGENT_EVENTS, UserMessage


class State(enum.Enum):
    OPEN = "open"
    DRAINING = "draining"  # no new runs; closes (1001) once the last run has ended
    CLOSED = "closed"  # the close is decided; runs still running are being cancelled


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
class Close:
    """The session ends with ``code``. ``flush``: what is queued is still written first."""

    code: CloseCode
    reason: str
    flush: bool = True


class _Signal(enum.Enum):
    START_PING = "start ping"  # send one ping; answer with pong() or ping_timeout()
    RECHECK = "recheck"  # ask the auth service about the session's token again


START_PING = _Signal.START_PING
RECHECK = _Signal.RECHECK

Effect = Send | StartRun | CancelRun | Refresh | Close | _Signal
