"""What serves the runs, from ``agent.app``: a built-in app, or your own agent by reference.

``module:attribute`` is imported the way uvicorn and hypercorn take ``module:app``
(the current directory first on the import path). The attribute is an agent (an
object with ``async def run(ctx, message, emit)``), or a class or zero-argument
factory that returns one. Anything else is refused at start-up with one line
that names the setting.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from typing import Any, Protocol

from trio_websocket import ConnectionClosed, WebSocketConnection

from .agent import Agent, DemoAgent, NoopAgent
from .config import AgentSettings
from .errors import StartupError


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


def is_agent(candidate: object) -> bool:
    return not isinstance(candidate, type) and inspect.iscoroutinefunction(getattr(candidate, "run", None))


def load_agent(reference: str) -> Agent:
    """The agent ``module:attribute`` names, or :class:`StartupError` saying why not."""
    module_name, _, attribute = reference.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: your package, from where you run
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StartupError(f"agent.app: cannot import {module_name!r} ({exc})") from None
    except Exception as exc:  # the module's own code failed as it was imported
        failure = f"{type(exc).__name__}: {exc}"
        raise StartupError(f"agent.app: importing {module_name!r} failed: {failure}") from None
    try:
        found: Any = getattr(module, attribute)
    except AttributeError:
        raise StartupError(f"agent.app: module {module_name!r} has no attribute {attribute!r}") from None
    if not is_agent(found) and callable(found):
        try:
            found = found()
        except Exception as exc:
            raise StartupError(
                f"agent.app: {reference} is not an agent, and calling it with no arguments failed:"
                f" {type(exc).__name__}: {exc}"
            ) from None
    if not is_agent(found):
        raise StartupError(
            f"agent.app: {reference} is not an agent (an object with async def run(ctx, message, emit),"
            " or a class or factory that returns one)"
        )
    agent: Agent = found
    return agent


def resolve(settings: AgentSettings) -> Agent | RawApp:
    """The agent (or raw app) that ``agent.app`` names; the upstream is wired by the gateway."""
    if settings.app == "echo":
        return echo
    if settings.app == "noop":
        return NoopAgent()
    if settings.app == "demo":
        return DemoAgent(step_delay=settings.step_delay)
    return load_agent(settings.app)
