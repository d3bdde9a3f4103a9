"""What an agent service streams, read and translated: pure functions, no I/O.

A response is ``text/event-stream`` (SSE) or ``application/x-ndjson`` (one JSON
object a line). Each event has a type (the SSE ``event:`` field, else the
object's ``type``) and JSON fields. In the ``wsgate`` vocabulary the types are
wsgate's own agent events (and ``agent_delta``); in ``ag-ui`` they are AG-UI's,
mapped onto them. Anything else is dropped (and counted) unless it is listed in
``agent.passthrough_events``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

import attrs

from ..protocol import AGENT_EVENTS, loads_strict
from ..session.messages import RESERVED_FIELDS

SSE = "text/event-stream"
NDJSON = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


@attrs.frozen
class UpstreamFailure(Exception):
    """Why a run through the agent service failed: its ``error`` in ``agent_completed``."""

    code: str  # upstream_unavailable, upstream_rejected, upstream_timeout, upstream_protocol
    message: str
    status: int | None = None

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.status is not None:
            error["status"] = self.status
        return error


def protocol_error(message: str) -> UpstreamFailure:
    return UpstreamFailure("upstream_protocol", message)


def stream_kind(content_type: str) -> str | None:
    """``sse`` or ``ndjson`` for a response's Content-Type; None for anything else."""
    media = content_type.partition(";")[0].strip().lower()
    if media == SSE:
        return "sse"
    if media in NDJSON:
        return "ndjson"
    return None


def decode(kind: str | None, data: str) -> tuple[str, dict[str, Any]]:
    """One event's type and fields, from its SSE event name (if any) and JSON text."""
    try:
        fields = loads_strict(data)
    except (ValueError, RecursionError):
        raise protocol_error("an event is not valid JSON") from None
    if not isinstance(fields, dict):
        raise protocol_error("an event is not a JSON object")
    named = fields.pop("type", None)
    kind = kind if kind and kind != "message" else named
    if not isinstance(kind, str) or not kind:
        raise protocol_error("an event has no type")
    return kind, fields


def _own(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields an agent may set: the gateway's own (run_id, seq...) are its to set."""
    return {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}


def _ag_ui(kind: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    if kind == "RUN_STARTED":
        return "agent_started", {}
    if kind == "TEXT_MESSAGE_CONTENT":
        return "agent_delta", {"text": fields.get("delta", "")}
    if kind in ("REASONING_MESSAGE_CONTENT", "THINKING_TEXT_MESSAGE_CONTENT"):
        return "agent_thinking", {"text": fields.get("delta", "")}
    if kind == "TOOL_CALL_START":
        call = fields.get("toolCallId")
        return "tool_executing", {"tool": fields.get("toolCallName"), "tool_call_id": call}
    if kind == "TOOL_CALL_RESULT":
        return "tool_completed", {"tool_call_id": fields.get("toolCallId"), "result": fields.get("content")}
    if kind == "RUN_FINISHED":
        result = fields.get("result")
        return "agent_completed", {"status": "ok", **({"output": result} if result is not None else {})}
    if kind == "RUN_ERROR":
        message = fields.get("message")
        text = message if isinstance(message, str) else "the agent failed"
        error = {"code": "agent_error", "message": text}
        return "agent_completed", {"status": "error", "error": error}
    return None


def translate(
    kind: str, fields: dict[str, Any], vocabulary: str, passthrough: Collection[str]
) -> tuple[str, dict[str, Any]] | None:
    """The wsgate event for an upstream one, or None: dropped."""
    if kind in passthrough:
        return kind, _own(fields)
    if vocabulary == "ag-ui":
        return _ag_ui(kind, fields)
    if kind not in AGENT_EVENTS:
        return None
    fields = _own(fields)
    if kind == "agent_completed" and fields.get("status") not in ("ok", "error", "cancelled"):
        fields["status"] = "ok" if "status" not in fields else "error"
    return kind, fields


async def bounded_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[str]:
    """The lines of an NDJSON body, none longer than ``limit`` bytes (else a protocol error)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if len(line) > limit:
                raise protocol_error(f"an event is larger than agent.max_event_bytes ({limit})")
            yield _text(line)
        if len(buffer) > limit:
            raise protocol_error(f"an event is larger than agent.max_event_bytes ({limit})")
    if buffer.strip():
        yield _text(buffer)


_EVENT_ENDS = ("\n\n", "\r\n\r\n", "\r\r")


async def bounded_text(chunks: AsyncIterator[str], limit: int) -> AsyncIterator[str]:
    """An SSE body's text, refused once one event (the text since the last blank line)
    passes ``limit`` characters: a backend that never ends an event cannot grow memory."""
    pending = 0
    tail = ""
    async for chunk in chunks:
        seen = tail + chunk
        # Where the last event of what has arrived ends (a blank line, in any line ending).
        end = max(seen.rfind(sep) + len(sep) if sep in seen else -1 for sep in _EVENT_ENDS)
        pending = len(seen) - end if end >= 0 else pending + len(chunk)
        if pending > limit:
            raise protocol_error(f"an event is larger than agent.max_event_bytes ({limit})")
        tail = chunk[-3:]
        yield chunk


def _text(line: bytes) -> str:
    try:
        return line.decode().strip()
    except UnicodeDecodeError:
        raise protocol_error("an event is not UTF-8") from None
