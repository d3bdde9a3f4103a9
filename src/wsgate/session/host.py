"""A session beyond its connection: its runs, and its life while detached.

A :class:`SessionHost` is made with its session and lives as long as the session,
not as long as a connection. Its runs are tasks of the gateway's nursery (the
"detached sessions" of the design), each under its own cancel scope, so that a
connection that drops does not take them down. What a run emits goes to the
connection serving the session (:attr:`SessionHost.attached`), or, while there
is none, straight into the session's log: numbered, as it would have been on
the wire, for the client that resumes.

A detached session waits ``resume.window`` seconds, and never past its token's
expiry; then it ends, and its runs are cancelled.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import attrs
import trio

from ..agent import Agent, RunContext
from ..errors import CloseCode
from ..handshake import Admission
from ..protocol import UserMessage
from .core import SessionCore
from .effects import FAILED, REVOKED, WINDOW_PASSED, Close, Effect, Send, State

log = logging.getLogger("wsgate.session")


@attrs.frozen
class Resumption:
    """What a ``session.resume`` found: the session now served (``host``) and every message
    to replay, or why not (``reason``: ``unknown``, ``expired`` or ``gap``)."""

    host: SessionHost | None
    #: The next resume token: the resumed session's, or the fresh one's.
    token: str | None
    replay: list[str] = attrs.field(factory=list)
    reason: str | None = None


class Session(Protocol):
    """The connection serving a session, as its host sees it (a :class:`~.shell.Session`)."""

    host: SessionHost
    admission: Admission

    async def queue(self, text: str) -> bool: ...

    def act(self, closing: Close | None) -> None: ...

    def moved(self) -> None: ...

    def relay(self, frame: str) -> None: ...


class HostServices(Protocol):
    """What a session's host tells the gateway, and asks of it."""

    def wall_now(self) -> float: ...

    def trio_time(self, wall: float) -> float: ...

    def detached(self, host: SessionHost) -> None: ...

    def logged(self, host: SessionHost) -> None: ...

    def ended(self, host: SessionHost, *, expired: bool) -> None: ...

    def run_done(self, host: SessionHost, run_id: str) -> None: ...

    async def still_ours(self, host: SessionHost) -> bool: ...


class SessionHost:
    """One session's runs, whichever connection serves it, and its detached life."""

    __slots__ = (
        "_agent",
        "_expiry",
        "_nursery",
        "_scopes",
        "_services",
        "attached",
        "core",
        "given_away",
        "held",
    )

    def __init__(
        self, core: SessionCore, agent: Agent, nursery: trio.Nursery, services: HostServices
    ) -> None:
        self.core = core
        self._agent = agent
        self._nursery = nursery
        self._services = services
        #: The connection serving the session; None while detached (or ended).
        self.attached: Session | None = None
        self._scopes: dict[str, trio.CancelScope] = {}  # each run's
        self._expiry: trio.CancelScope | None = None  # the detached session's wait
        #: Resumed on another node while runs of it still run here: they go on for it.
        self.given_away = False
        #: What the session sends while it follows runs elsewhere, numbered once they end.
        self.held: list[str] = []

    @property
    def id(self) -> str:
        return self.core.id

    # -- runs ---------------------------------------------------------------------

    def start_run(self, run_id: str, message: UserMessage) -> None:
        scope = self._scopes[run_id] = trio.CancelScope()
        self._nursery.start_soon(self._run_agent, run_id, message, scope, name="wsgate.session.run")

    def cancel_run(self, run_id: str) -> None:
        self._scopes[run_id].cancel()

    def cancel_runs(self) -> None:
        """Cancel every run (each still ends with its terminal event)."""
        for scope in self._scopes.values():
            scope.cancel()

    def hold(self, text: str) -> bool:
        """While runs of the session run on another node, keep ``text`` to number after theirs."""
        if self.core.following:
            self.held.append(text)
        return self.core.following

    async def deliver(self, text: str) -> None:
        """Queue ``text`` on the connection serving the session; while detached, log it."""
        if self.hold(text):
            return
        while (shell := self.attached) is not None:
            if await shell.queue(text) or self.attached is shell:
                return
            # Not queued: the connection closed meanwhile; the session is detached or ended.
        if self.core.state is State.DETACHED:
            self.core.number(text)
            self._services.logged(self)

    async def _act(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                await self.deliver(effect.text)
            elif isinstance(effect, Close) and self.attached is not None:
                self.attached.act(effect)  # the drained session's 1001, after its last run

    async def _run_agent(self, run_id: str, message: UserMessage, scope: trio.CancelScope) -> None:
        core = self.core

        async def emit(event: str, /, **data: Any) -> None:
            text = core.run_event(run_id, event, data)  # raises for what the agent may not send
            try:
                await self.deliver(text)
            except Exception as exc:
                raise _GatewayBug from exc
            await trio.lowlevel.checkpoint()  # emit is a checkpoint, like any send in Trio

        ctx = RunContext(run_id, core.id, core.identity, message.id, core.degraded, core.token_for_agent)
        status = "ok"
        try:
            try:
                with scope:
                    await self._agent.run(ctx, message.text, emit)
                if scope.cancelled_caught:
                    status = "cancelled"
            except Exception as exc:
                if isinstance(exc, _GatewayBug) and exc.__cause__ is not None:
                    raise exc.__cause__ from None  # ours, not the agent's
                # The agent is the application's code: its failure ends its run, not the session.
                log.exception("agent run failed", extra={"session": core.id, "run_id": run_id})
                status = "error"
            finally:
                del self._scopes[run_id]
            await self._act(core.run_ended(run_id, status))
            self._services.run_done(self, run_id)
            if self.given_away and not self._scopes:
                self._services.ended(self, expired=False)
        except Exception:
            # A bug of ours: this session ends (1011), nothing else does.
            log.exception("session failed", extra={"session": core.id, "event": "session.error"})
            self.fail()

    def fail(self) -> None:
        """A bug in the gateway: the session ends with 1011, on its connection if any."""
        self.close(self.core.close(FAILED))

    def close(self, closing: Close | None) -> None:
        """The core decided ``closing``: on the connection serving the session, if any."""
        if self.attached is not None:
            self.attached.act(closing)
        else:
            self.end(closing)

    # -- the session's life ---------------------------------------------------------

    def detach(self) -> None:
        """The connection serving the session closed without ending it: wait to be resumed."""
        self.attached = None
        self._services.detached(self)
        self._expiry = scope = trio.CancelScope()
        self._nursery.start_soon(self._wait_for_resume, scope, name="wsgate.session.detached")

    async def _wait_for_resume(self, scope: trio.CancelScope) -> None:
        core, services = self.core, self._services
        expires = services.trio_time(core.lifecycle.deadline)
        scope.deadline = min(trio.current_time() + core.resume_window, expires)
        with scope:
            await trio.sleep_forever()
        ours = self._expiry is scope and await services.still_ours(self)
        if self._expiry is not scope:
            return  # resumed, or ended otherwise (before or while the owner was asked)
        if not ours:
            self.give_away()
            return
        if trio.current_time() >= expires:
            self.end(core.end(CloseCode.UNAUTHORIZED, "token expired while detached"), expired=True)
        else:
            self.end(core.close(WINDOW_PASSED), expired=True)

    def attach(self, shell: Session) -> None:
        """``shell``'s connection serves the session from now on (a resume), with the
        identity that admitted it."""
        self._stop_waiting()
        old, self.attached = self.attached, shell
        shell.host = self
        if old is not None:
            old.moved()  # at most one connection serves a session: the older one closes (4409)
        self.core.resume(shell.admission, trio.current_time(), self._services.wall_now())

    def end(self, closing: Close | None, *, expired: bool = False) -> None:
        """The session has ended (``closing``, if it was this call's to end): runs cancelled.
        ``expired``: it waited for its client in vain."""
        if closing is None:
            return
        self._stop_waiting()
        self.attached = None
        self.cancel_runs()
        self._services.ended(self, expired=expired)

    def _stop_waiting(self) -> None:
        scope, self._expiry = self._expiry, None
        if scope is not None:
            scope.cancel()

    def give_away(self) -> None:
        """Another node serves the session now: the runs still running here go on for it, and
        the session is forgotten here once they have ended."""
        self._stop_waiting()
        self.given_away = True
        if not self._scopes:
            self._services.ended(self, expired=False)

    # -- following runs that run on another node ---------------------------------------

    def follow(self) -> None:
        """Runs of this session still run on another node: until they end, their messages
        (numbered there) come through :meth:`relay`, and this node's are held."""
        self.core.following = True

    def relay(self, frame: str) -> None:
        """One message of the runs elsewhere, numbered: logged, and queued as it is."""
        self.core.log.append(frame)
        if self.attached is not None:
            self.attached.relay(frame)

    async def followed(self) -> None:
        """The runs elsewhere have ended: what was held goes out, numbered after them."""
        self.core.following = False
        held, self.held = self.held, []
        for text in held:
            await self.deliver(text)

    def revoke(self) -> None:
        """The session's token or subject was revoked: it ends (4403), on its connection if any."""
        self.close(self.core.close(REVOKED))


class _GatewayBug(Exception):
    """Raised through the agent's code by a failure of the gateway's own in ``emit``."""
