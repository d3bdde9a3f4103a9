"""The ``wsgate.v1`` wire protocol: parsing client messages, naming server ones.

Parsing is pure and total: any text yields a message object or a
:class:`ProtocolError` naming the problem, never another exception.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

PROTOCOL_VERSION = "wsgate.v1"

#: What an agent may emit: the five steps of a run, and ``agent_delta``, a chunk of streamed text.
AGENT_EVENTS = frozenset(
    {"agent_started", "agent_thinking", "agent_delta", "tool_executing", "tool_completed", "agent_completed"}
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


@attrs.frozen
class SessionResume:
    """Pick up a detached session where the client left it: every message after ``last_seq``."""

    session_id: str
    resume_token: str = attrs.field(repr=False)
    last_seq: int


ClientMessage = Auth | AuthRefresh | Ping | UserMessage | RunCancel | SessionResume


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


def has_utf8(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8: JSON's ``\\ud800`` escapes make strings
    that cannot, and such text can be neither sent, logged nor hashed as it is."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity (RFC 8259 has none)


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError("number out of range")  # 1e400 would come back as Infinity
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads_strict(text: str) -> Any:
    """Parse JSON as RFC 8259 has it, into values that encode back as valid UTF-8 JSON.

    Raises ValueError for anything else: ``NaN`` and ``Infinity`` literals, numbers
    beyond a float's range, and ``\\uD800``-style escapes of unpaired surrogates (text
    that has no UTF-8 form). RecursionError for nesting beyond the interpreter's limit.
    """
    value = _DECODER.decode(text)
    # Text decoded from a WebSocket frame or an HTTP body holds no surrogates itself:
    # only an escape can make one, so without a backslash-u there is nothing to check.
    if "\\u" in text and not has_utf8(_ENCODER.encode(value)):
        raise ValueError("a string holds an unpaired surrogate (\\uD800-\\uDFFF)")
    return value


def parse_client_message(text: str | bytes, *, max_depth: int = 16) -> ClientMessage:
    """Parse one client frame, or raise :class:`ProtocolError`."""
    if isinstance(text, bytes):
        raise ProtocolError("binary frames are not part of wsgate.v1; send JSON text")
    try:
        obj = loads_strict(text)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except ValueError as exc:
        reason = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else f"not valid JSON: {exc}"
        raise ProtocolError(reason) from None
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
    if kind == "session.resume":
        last_seq = obj.get("last_seq")
        if type(last_seq) is not int or not 0 <= last_seq < 2**53:
            raise ProtocolError("field 'last_seq' must be a whole number, 0 or more")
        return SessionResume(
            _field(obj, "session_id", limit=MAX_ID_LENGTH), _field(obj, "resume_token", limit=128), last_seq
        )
    raise ProtocolError(f"unknown message type '{kind[:MAX_ID_LENGTH]}'", code="unknown_type")


# Made once, not per message. NaN and Infinity are refused (ValueError): they are not JSON.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(message: dict[str, Any]) -> str:
    """Serialize one server message as compact JSON that is valid UTF-8, whatever it holds.

    The one place server messages become text. A string with no UTF-8 form (an unpaired
    surrogate, from an operator's push or an agent) is sent escaped (``\\ud800``), so the
    WebSocket layer can always encode what it is given. Raises ValueError for NaN or
    Infinity and TypeError for values JSON has no form for.
    """
    text = _ENCODER.encode(message)
    return text if has_utf8(text) else _ASCII_ENCODER.encode(message)


def numbered(text: str, seq: int) -> str:
    """An encoded server message (a JSON object, from :func:`encode`) with its ``seq``: the
    one place a message gets its number, as it is written (so nothing is encoded twice)."""
    return f'{text[:-1]},"seq":{seq}}}'
