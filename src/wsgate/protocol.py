"""The ``wsgate.v1`` wire protocol: parsing client messages, naming server ones.

Parsing is pure and total: any text yields a message object or a
:class:`ProtocolError` naming the problem, never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

PROTOCOL_VERSION = "wsgate.v1"

AGENT_EVENTS = frozenset(
    {"agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"}
)
MAX_ID_LENGTH = 128


class ProtocolError(Exception):
    """A client message we cannot accept; ``code`` and ``reason`` go back in an ``error``."""

    def __init__(self, reason: str, code: str = "bad_message") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@attrs.frozen
class Auth:
    token: str = attrs.field(repr=False)


@attrs.frozen
class AuthRefresh:
    token: str = attrs.field(repr=False)


@attrs.frozen
class Ping:
    id: str | None = None


@attrs.frozen
class UserMessage:
    text: str
    id: str | None = None


@attrs.frozen
class RunCancel:
    run_id: str


ClientMessage = Auth | AuthRefresh | Ping | UserMessage | RunCancel


def _depth_ok(text: str, value: Any, limit: int) -> bool:
    # Each level of nesting takes an opening bracket: text with fewer than `limit` of
    # them cannot be too deep, and most messages are shallow, so skip the walk.
    if text.count("{") + text.count("[") < limit:
        return True
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _field(obj: dict[str, Any], name: str, *, optional: bool = False, limit: int = 0) -> Any:
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"field '{name}' is required")
    if not isinstance(value, str):
        raise ProtocolError(f"field '{name}' must be a string")
    if limit and len(value) > limit:
        raise ProtocolError(f"field '{name}' is too long")
    return value


def parse_client_message(text: str | bytes, *, max_depth: int = 16) -> ClientMessage:
    """Parse one client frame, or raise :class:`ProtocolError`."""
    if isinstance(text, bytes):
        raise ProtocolError("binary frames are not part of wsgate.v1; send JSON text")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except ValueError:
        raise ProtocolError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    if not _depth_ok(text, obj, max_depth):
        raise ProtocolError("JSON nested too deeply")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("field 'type' is required and must be a string")
    if kind == "user_message":
        return UserMessage(text=_field(obj, "text"), id=_field(obj, "id", optional=True, limit=MAX_ID_LENGTH))
    if kind == "ping":
        return Ping(id=_field(obj, "id", optional=True, limit=MAX_ID_LENGTH))
    if kind == "run.cancel":
        return RunCancel(run_id=_field(obj, "run_id", limit=MAX_ID_LENGTH))
    if kind == "auth.refresh":
        return AuthRefresh(token=_field(obj, "token"))
    if kind == "auth":
        return Auth(token=_field(obj, "token"))
    raise ProtocolError(f"unknown message type '{kind[:MAX_ID_LENGTH]}'", code="unknown_type")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # made once, not per message


def encode(message: dict[str, Any]) -> str:
    """Serialize one server message (compact JSON)."""
    return _ENCODER.encode(message)


PONG = encode({"type": "pong", "id": None})  # the answer to a ping without an id, encoded once


def encode_pong(ping_id: str | None) -> str:
    return PONG if ping_id is None else encode({"type": "pong", "id": ping_id})
