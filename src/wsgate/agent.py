"""The agent interface and the built-in agents.

An agent is any object with ``async def run(ctx, message, emit)``. It calls
``emit(event_type, **fields)`` for each of its events; the session adds
``run_id`` and ``seq`` and delivers them in order. A run is cancelled through
its cancel scope; the agent needs no cancellation code of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .auth.tokens import Identity


class Emit(Protocol):
    async def __call__(self, event: str, /, **fields: Any) -> None: ...


@attrs.frozen
class RunContext:
    """What an agent knows about the run it serves."""

    run_id: str
    session_id: str
    identity: Identity


class Agent(Protocol):
    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None: ...


def word_stats(text: str) -> dict[str, Any]:
    """The demo agent's tool: a small, real, deterministic computation."""
    words = text.split()
    return {
        "words": len(words),
        "characters": len(text),
        "longest_word": max(words, key=len) if words else "",
        "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


@attrs.frozen
class DemoAgent:
    """Emits the five agent events around one real tool call; deterministic."""

    step_delay: float = 0.05

    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None:
        await emit("agent_started", input=message)
        await trio.sleep(self.step_delay)
        await emit("agent_thinking", text="Counting the words in your message.")
        await trio.sleep(self.step_delay)
        args = {"text": message}
        await emit("tool_executing", tool="word_stats", args=args)
        result = word_stats(message)
        await trio.sleep(self.step_delay)
        await emit("tool_completed", tool="word_stats", result=result)
        reply = (
            f"{ctx.identity.subject}, your message has {result['words']} words "
            f"and {result['characters']} characters."
        )
        await emit("agent_completed", status="ok", output=reply)


@attrs.frozen
class NoopAgent:
    """The five events with no work between them: for benchmarks."""

    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None:
        await emit("agent_started")
        await emit("agent_thinking")
        await emit("tool_executing", tool="noop")
        await emit("tool_completed", tool="noop")
        await emit("agent_completed", status="ok")


class RawApp(Protocol):
    """An app that speaks over the admitted WebSocket itself, with no wsgate.v1 session."""

    async def __call__(self, ws: WebSocketConnection, /) -> None: ...


async def echo(ws: WebSocketConnection) -> None:
    """The raw echo app (``--app echo``): every message back as it came, nothing else.

    For protocol-conformance runs and load tests; no wsgate.v1 messages are sent.
    """
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.send_message(await ws.get_message())


def builtin_agent(name: str, step_delay: float) -> Agent:
    if name == "noop":
        return NoopAgent()
    return DemoAgent(step_delay=step_delay)
