"""The agent interface and the built-in agents.

An agent is any object with ``async def run(ctx, message, emit)``. It calls
``emit(event_type, **fields)`` for each of its events; the session adds
``run_id`` and ``seq`` and delivers them in order. A run is cancelled through
its cancel scope; the agent needs no cancellation code of its own.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import attrs
import trio

from .auth.tokens import Identity


class Emit(Protocol):
    async def __call__(self, event: str, /, **fields: Any) -> None: ...


@attrs.frozen
class RunContext:
    """What an agent knows about the run it serves."""

    run_id: str
    session_id: str
    identity: Identity
    #: The ``id`` of the ``user_message`` that started the run, if it had one.
    message_id: str | None = None
    #: Admitted while the auth service could not be asked (the ``tolerant`` policy).
    degraded: bool = False
    #: The client's own token: only with ``agent.forward_client_token`` (never logged).
    client_token: str | None = attrs.field(default=None, repr=False)


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
