"""What the server sends: one class per ``wsgate.v1`` server message, encoded in one place.

Each message is a frozen value; :func:`encode_message` turns it into the compact
JSON text that is queued, and :func:`wsgate.protocol.numbered` adds the
connection's ``seq`` as the text is written. ``docs/protocol.md`` lists every
field.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ..auth.tokens import Identity
from ..protocol import PROTOCOL_VERSION, encode


class ServerMessage:
    """Base of every server message: its ``type`` and its fields, in order."""

    __slots__ = ()
    TYPE: ClassVar[str]

    @property
    def kind(self) -> str:
        return self.TYPE

    def fields(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)  # type: ignore[arg-type]


def encode_message(message: ServerMessage) -> str:
    """The one place a server message becomes text (numbered later, as it is written)."""
    return encode({"type": message.kind, **message.fields()})


@attrs.frozen
class Ready(ServerMessage):
    TYPE: ClassVar[str] = "session.ready"
    session_id: str
    subject: str | None
    tenant: str | None
    scopes: list[str]
    expires_at: float
    degraded: bool
    anonymous: bool
    protocol: str = PROTOCOL_VERSION
    #: Present the session with ``session.resume`` after a dropped connection (None: resuming is off).
    resume_token: str | None = None

    @classmethod
    def of(cls, session_id: str, identity: Identity, degraded: bool, resume_token: str | None) -> Ready:
        return cls(
            session_id,
            identity.subject,
            identity.tenant,
            sorted(identity.scopes),
            identity.expires_at,
            degraded,
            identity.anonymous,
            resume_token=resume_token,
        )


@attrs.frozen
class Resumed(ServerMessage):
    """The answer to ``session.resume``: the session picked up (every message after
    ``last_seq`` follows), or not (``reason``) and the connection goes on with its fresh one."""

    TYPE: ClassVar[str] = "session.resumed"
    session_id: str
    recovered: bool
    resume_token: str | None
    reason: str | None = None


@attrs.frozen
class Pong(ServerMessage):
    TYPE: ClassVar[str] = "pong"
    id: str | None


@attrs.frozen
class Error(ServerMessage):
    """A request refused, or something the client should know; the connection stays open."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    #: ``events_dropped`` only: how many server pushes this connection missed.
    dropped: int | None = None

    def fields(self) -> dict[str, Any]:
        found: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.dropped is not None:
            found["dropped"] = self.dropped
        return found


@attrs.frozen
class AuthRefreshed(ServerMessage):
    TYPE: ClassVar[str] = "auth.refreshed"
    expires_at: float
    degraded: bool


@attrs.frozen
class AuthExpiring(ServerMessage):
    TYPE: ClassVar[str] = "auth.expiring"
    expires_at: float
    expires_in: float


@attrs.frozen
class Draining(ServerMessage):
    TYPE: ClassVar[str] = "session.draining"
    reconnect_after: float


@attrs.frozen
class Restored(ServerMessage):
    TYPE: ClassVar[str] = "session.restored"
    degraded: bool = False


@attrs.frozen
class Pushed(ServerMessage):
    """An operator's push to every connection of one user (``POST /publish``)."""

    TYPE: ClassVar[str] = "event"
    event: Any


#: Fields of an agent event that are the gateway's, not the agent's.
RESERVED_FIELDS = frozenset({"type", "run_id", "message_id", "seq"})


@attrs.frozen
class AgentEvent(ServerMessage):
    """One event of an agent run: its kind is the message's type, its data the agent's."""

    TYPE: ClassVar[str] = "agent_completed"
    event: str
    run_id: str
    message_id: str | None
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.event

    def fields(self) -> dict[str, Any]:
        tag = {"message_id": self.message_id} if self.message_id is not None else {}
        return {"run_id": self.run_id, **tag, **self.data}


PONG = encode_message(Pong(None))  # the answer to a ping without an id, encoded once


def encode_pong(ping_id: str | None) -> str:
    return PONG if ping_id is None else encode_message(Pong(ping_id))
