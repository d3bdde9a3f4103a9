"""A Trio client for wsgate: runs, pushes, in-band refresh, reconnect and resume, done right.

::

    async with wsgate.client.connect("ws://127.0.0.1:8765/ws", token=get_token) as client:
        async for event in client.run("hi"):
            print(event.type, event.fields)

``token`` is a string, or a callable (sync or async) returning one: it is called
on every connect and whenever the server says ``auth.expiring`` (the answer is
sent as ``auth.refresh``). When the connection drops, the client reconnects
with full-jitter backoff and resumes the session (``session.resume`` with the
last ``seq`` it holds), so a run in flight goes on where it was, every event
once: duplicates are dropped by ``seq``. What each close code means:

- 1001 (drain): reconnect after the server's ``reconnect_after``;
- 4401 (expired): a new token first, then reconnect;
- 1013, 4429, 503: back off; 1006 and the rest: reconnect with backoff;
- 4403 and 1008 (forbidden, policy), 4409 (the session moved to another
  connection), 1000: stop; :class:`ClientClosed` says why.

The reader never waits for the application: events are queued for
:meth:`Client.run` and :meth:`Client.events` without bound.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import itertools
import json
import math
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from .errors import leaves

__all__ = ["Client", "ClientClosed", "Event", "RunInterrupted", "State", "connect"]

Token = str | Callable[[], str] | Callable[[], Awaitable[str]]
Opener = Callable[[str, str], AbstractAsyncContextManager[WebSocketConnection]]

#: Close codes after which reconnecting cannot help.
FINAL = {1000: "closed", 1008: "policy violation", 4403: "forbidden", 4409: "session moved"}
#: Errors that refuse a user_message before it starts a run.
REFUSALS = {"too_many_runs", "draining", "runs_elsewhere", "bad_message"}


class State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class Event:
    """One server message: its ``type``, ``seq``, ``run_id`` (agent events) and every field."""

    type: str
    seq: int | None
    run_id: str | None
    fields: dict[str, Any]

    @classmethod
    def of(cls, message: dict[str, Any]) -> Event:
        return cls(str(message.get("type")), message.get("seq"), message.get("run_id"), message)


class ClientClosed(Exception):
    """The client stopped: the server closed for good (``code``), or it was closed."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if code else reason)
        self.code = code
        self.reason = reason


class RunInterrupted(Exception):
    """A run whose session could not be resumed (or that the server refused: ``error``)."""


def _problem(exc: BaseException) -> BaseException:
    """What ended a connection, out of the groups Trio wraps it in; re-raised unless it is
    one the client answers by reconnecting or stopping."""
    found = exc
    while isinstance(found, BaseExceptionGroup):
        inner = [e for e in found.exceptions if not isinstance(e, trio.Cancelled)]
        if len(inner) != 1:
            raise exc
        found = inner[0]
    if isinstance(found, ConnectionClosed | ConnectionRejected | OSError | json.JSONDecodeError):
        return found
    raise exc


def _open_tcp(url: str, token: str) -> AbstractAsyncContextManager[WebSocketConnection]:
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    return open_websocket_url(url, extra_headers=headers, max_message_size=16 * 1024 * 1024)


@attrs.define
class _Run:
    send: trio.MemorySendChannel[Event | BaseException]
    started: bool = False


class Client:
    """A session with wsgate that outlives its connections. Make one with :func:`connect`."""

    def __init__(
        self,
        url: str,
        token: Token,
        *,
        opener: Opener,
        on_state: Callable[[State, dict[str, Any]], None] | None,
        backoff_base: float,
        backoff_max: float,
        rng: random.Random,
    ) -> None:
        self.url = url
        self._token = token
        self._opener = opener
        self._on_state = on_state
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._rng = rng
        self.state = State.CONNECTING
        #: The current session's ``session.ready`` / ``session.resumed`` fields.
        self.session: dict[str, Any] = {}
        self.last_seq = 0
        self._ws: WebSocketConnection | None = None
        self._open = trio.Event()
        self._runs: dict[str, _Run] = {}  # by message id
        self._ids = itertools.count(1)
        self._pushes_send, self._pushes = trio.open_memory_channel[Event](math.inf)
        self._reconnect_after: float | None = None
        self._closed: ClientClosed | None = None
        self._nursery: trio.Nursery | None = None  # the client's, for refreshes
        self._started = False  # the first session.ready came

    # -- what the application calls -----------------------------------------------

    async def run(self, text: str) -> AsyncIterator[Event]:
        """Start an agent run and yield its events, the last one ``agent_completed``."""
        message_id = f"c{next(self._ids)}"
        send, receive = trio.open_memory_channel[Event | BaseException](math.inf)
        self._runs[message_id] = _Run(send)
        try:
            await self.send({"type": "user_message", "text": text, "id": message_id})
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.type == "agent_completed":
                        return
        finally:
            self._runs.pop(message_id, None)

    async def cancel(self, run_id: str) -> None:
        await self.send({"type": "run.cancel", "run_id": run_id})

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """Everything that is not a run's: pushes (``event``), errors, ``session.restored``..."""
        return self._pushes

    async def send(self, message: dict[str, Any]) -> None:
        """Send once connected (waiting while reconnecting); :class:`ClientClosed` once stopped."""
        while True:
            if self._closed is not None:
                raise self._closed
            await self._open.wait()
            ws = self._ws
            if ws is None:
                continue
            try:
                await ws.send_message(json.dumps(message))
                return
            except ConnectionClosed:
                await trio.lowlevel.checkpoint()  # the connection is being replaced

    async def refresh(self) -> None:
        """Send ``auth.refresh`` with a token from ``token`` now."""
        await self.send({"type": "auth.refresh", "token": await self._get_token()})

    # -- keeping the session up ----------------------------------------------------------

    async def _get_token(self) -> str:
        token = self._token
        if isinstance(token, str):
            return token
        value = token()
        return await value if inspect.isawaitable(value) else value

    def _set_state(self, state: State, **detail: Any) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, detail)

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect until closed for good."""
        attempt = 0
        while True:
            try:
                async with self._opener(self.url, await self._get_token()) as ws:
                    attempt = 0
                    await self._serve(ws, task_status)
            except BaseException as exc:
                delay = self._after(_problem(exc), attempt)
            finally:
                self._ws = None
                self._open = trio.Event() if self._open.is_set() else self._open
            if self._closed is not None:
                if not self._started:
                    raise self._closed
                self._set_state(State.CLOSED, reason=str(self._closed))
                return
            attempt += 1
            self._set_state(State.RECONNECTING, delay=round(delay, 3))
            await trio.sleep(delay)

    def _after(self, problem: BaseException, attempt: int) -> float:
        """How long to wait before reconnecting after ``problem`` (or stop, for good)."""
        if isinstance(problem, ConnectionRejected):
            status = problem.status_code
            if status in (400, 403, 404) or (status == 401 and isinstance(self._token, str)):
                # Nothing a retry changes (a fixed token the server refuses stays refused).
                self._stop(ClientClosed(status, f"handshake refused with HTTP {status}"))
            return self._backoff(attempt)
        if isinstance(problem, ConnectionClosed):
            code = problem.reason.code if problem.reason is not None else 1006
            reason = (problem.reason.reason if problem.reason is not None else None) or ""
            if code in FINAL or (code == 4401 and isinstance(self._token, str)):
                self._stop(ClientClosed(code, reason or FINAL.get(code, "token expired")))
            return self._after_close(code, reason, attempt)
        return self._backoff(attempt)  # OSError: no connection

    def _after_close(self, code: int, reason: str, attempt: int) -> float:
        if code == 4401:
            return 0.0  # a new token is fetched as the client reconnects
        if code == 1001:
            hint = self._reconnect_after
            match = re.search(r"reconnect after ([\d.]+) s", reason)
            if match:
                hint = float(match.group(1))
            self._reconnect_after = None
            if hint is not None:
                return hint
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: anywhere from 0 to the doubling cap."""
        return self._rng.uniform(0, min(self._backoff_max, self._backoff_base * 2 ** min(attempt, 32)))

    def _stop(self, why: ClientClosed) -> None:
        if self._closed is None:
            self._closed = why
        for run in self._runs.values():
            run.send.send_nowait(why)
        self._pushes_send.close()

    async def _serve(self, ws: WebSocketConnection, task_status: trio.TaskStatus[None]) -> None:
        ready = json.loads(await ws.get_message())
        previous = self.session
        if previous.get("resume_token"):
            message = {
                "type": "session.resume",
                "session_id": previous["session_id"],
                "resume_token": previous["resume_token"],
                "last_seq": self.last_seq,
            }
            await ws.send_message(json.dumps(message))
            answer = json.loads(await ws.get_message())
            if answer.get("recovered"):
                self.session = {**previous, **answer}
            else:
                self._lost(answer.get("reason"))
                fresh = {"session_id": answer["session_id"], "resume_token": answer["resume_token"]}
                self.session = {**ready, **fresh}
            resumed = bool(answer.get("recovered"))
        else:
            self.session, resumed = ready, False
            self.last_seq = 0
        self._ws = ws
        self._open.set()
        if not self._started:
            self._started = True
            task_status.started()
        self._set_state(State.OPEN, resumed=resumed, session_id=self.session.get("session_id"))
        while True:
            self._dispatch(json.loads(await ws.get_message()))

    def _lost(self, reason: str | None) -> None:
        """The session could not be resumed: its runs in flight are gone."""
        for message_id, run in list(self._runs.items()):
            if run.started:
                run.send.send_nowait(RunInterrupted(f"the session was not recovered ({reason})"))
                del self._runs[message_id]
        self.last_seq = 0

    def _dispatch(self, message: dict[str, Any]) -> None:
        seq = message.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return  # seen before this connection: a resume's replay overlaps nothing twice
            self.last_seq = seq
        event = Event.of(message)
        kind = event.type
        if kind == "auth.expiring":
            assert self._nursery is not None
            self._nursery.start_soon(self._refresh_quietly)
        elif kind == "session.draining":
            self._reconnect_after = float(message.get("reconnect_after", 0))
        run = self._runs.get(str(message.get("message_id"))) if "message_id" in message else None
        if run is not None:
            run.started = True
            run.send.send_nowait(event)
            return
        if kind == "error" and message.get("code") in REFUSALS:
            waiting = next((r for r in self._runs.values() if not r.started), None)
            if waiting is not None:
                waiting.started = True
                waiting.send.send_nowait(RunInterrupted(f"{message['code']}: {message.get('message')}"))
                return
        self._pushes_send.send_nowait(event)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(ClientClosed):
            await self.refresh()

    async def aclose(self) -> None:
        self._stop(ClientClosed(1000, "closed by the client"))
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(5):
                await ws.aclose()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: Token,
    on_state: Callable[[State, dict[str, Any]], None] | None = None,
    backoff_base: float = 0.5,
    backoff_max: float = 30.0,
    opener: Opener = _open_tcp,
    rng: random.Random | None = None,
) -> AsyncIterator[Client]:
    """A client connected to ``url`` (its first ``session.ready`` received), reconnecting
    and resuming until the block ends. ``on_state(state, detail)`` is told each change:
    ``open`` (``resumed``, ``session_id``), ``reconnecting`` (``delay`` in seconds) and
    ``closed``. ``opener(url, token)`` opens one WebSocket (tests pass an in-memory one)."""
    client = Client(
        url,
        token,
        opener=opener,
        on_state=on_state,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        rng=rng or random.Random(),
    )
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            await nursery.start(client.maintain)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        inner = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(inner) == 1:
            raise inner[0] from None  # one failure: as itself, not in the nursery's group
        raise
