"""Detached sessions kept beyond this node, so a client may resume on any node (Redis).

:class:`StoredSessions` does the session side of :mod:`wsgate.cluster.sessions`:

- as a session detaches, it is written to the store, and what it logs while
  detached is shipped after it, in order, by one task per detached session
  (a shipper: it sends what the log holds beyond what it sent, so nothing is
  skipped, however many messages come between two wakes);
- a resume of a session this node does not hold claims it in the store and
  takes it on: its log, its numbering, and, while runs of it still run on the
  node where it detached, a follower that relays their messages (numbered
  there) until they end, or ends them with ``node_lost`` once that node is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..cluster.sessions import Claim, Entry, Saved, SessionStore
from ..config import ResumeSettings
from ..errors import CloseCode
from .core import SessionCore
from .effects import State
from .host import SessionHost
from .log import MessageLog, resume_hash
from .messages import AgentEvent, encode_message

log = logging.getLogger("wsgate.session")

NODE_LOST = {"code": "node_lost", "message": "the node running this run is gone"}


class _Shipper:
    __slots__ = ("finished", "stopped", "wake")

    def __init__(self) -> None:
        self.wake = trio.Event()
        self.finished: list[str] = []
        self.stopped = False


class StoredSessions:
    def __init__(
        self,
        store: SessionStore,
        nursery: trio.Nursery,
        wall_now: Callable[[], float],
        settings: ResumeSettings,
    ) -> None:
        self.store = store
        self._max_events = settings.max_events
        self._max_bytes = settings.max_bytes
        self._nursery = nursery
        self._wall_now = wall_now
        self._window = settings.window
        self._shippers: dict[str, _Shipper] = {}
        self._known: set[str] = set()  # sessions this node wrote or claimed in the store
        self._unsaved = 0  # detached sessions not written yet
        self._all_saved = trio.Event()
        self._all_saved.set()

    @property
    def node_id(self) -> str:
        return self.store.node_id

    # -- a session detached here -----------------------------------------------------

    async def flushed(self) -> None:
        await self._all_saved.wait()

    def detached(self, host: SessionHost) -> None:
        if self._unsaved == 0:
            self._all_saved = trio.Event()
        self._unsaved += 1
        shipper = self._shippers[host.id] = _Shipper()
        self._nursery.start_soon(self._ship, host, shipper, name="wsgate.session.ship")

    def logged(self, host: SessionHost) -> None:
        shipper = self._shippers.get(host.id)
        if shipper is not None:
            shipper.wake.set()

    def run_done(self, host: SessionHost, run_id: str) -> None:
        shipper = self._shippers.get(host.id)
        if shipper is not None:
            shipper.finished.append(run_id)
            shipper.wake.set()

    def saved(self, host: SessionHost) -> bool:
        """Whether the session is in the store (written as it detached, or claimed)."""
        return host.id in self._known

    def stop(self, host: SessionHost) -> None:
        """The session is served here again, or has ended: one last shipment, then no more."""
        shipper = self._shippers.pop(host.id, None)
        if shipper is not None:
            shipper.stopped = True
            shipper.wake.set()

    def ended(self, host: SessionHost) -> None:
        self.stop(host)
        if host.id in self._known and not host.given_away:
            self._nursery.start_soon(self._quietly, self.store.ended, host.id)
        self._known.discard(host.id)

    async def _ship(self, host: SessionHost, shipper: _Shipper) -> None:
        core, store = host.core, self.store
        try:
            sent = await self._save(host)
        finally:
            self._unsaved -= 1
            if self._unsaved == 0:
                self._all_saved.set()
        while sent is not None:
            last = shipper.stopped  # stopped: one more shipment of what is pending, then no more
            if not last:
                await shipper.wake.wait()
                shipper.wake = trio.Event()
            frames = core.log.after(sent)
            if frames is None:  # more was logged meanwhile than the log keeps: write it anew
                sent = await self._save(host)
                continue
            finished, shipper.finished = shipper.finished, []
            if frames or finished:
                try:
                    answer = await store.append(host.id, sent + 1, frames, finished)
                except Exception as exc:
                    log.warning("session %s not shipped: %s", host.id, exc, extra={"event": "session.store"})
                    return
                sent += len(frames)
                if answer == "moved":
                    host.give_away()  # resumed on another node: its runs here go on for it
                elif answer != "owner":
                    host.cancel_runs()  # taken over as lost, or ended: no one follows them
                    host.give_away()
            if last:
                return

    async def _save(self, host: SessionHost) -> int | None:
        core = host.core
        frames = core.log.frames()
        saved = Saved(
            host.id,
            core.identity.user_key,
            core.resume_key.digest,
            self._wall_now() + self._window,
            core.seq,
            core.last_run,
            frames,
            core.running(),
        )
        try:
            await self.store.save(saved)
        except Exception as exc:
            log.warning("session %s not stored: %s", host.id, exc, extra={"event": "session.store"})
            return None
        self._known.add(host.id)
        return saved.seq

    async def _quietly(self, call: Callable[[str], Awaitable[None]], session_id: str) -> None:
        try:
            await call(session_id)
        except Exception as exc:
            log.warning("session %s: %s", session_id, exc, extra={"event": "session.store"})

    async def still_ours(self, host: SessionHost) -> bool:
        try:
            owner = await self.store.owner(host.id)
        except Exception:
            return True  # the store is away: the window holds as if there were none
        return owner in (None, self.node_id)

    # -- a session resumed here that this node does not hold ----------------------------

    async def claim(self, core: SessionCore, token: str, new_token: str, last_seq: int) -> Claim:
        """Claim the stored session ``core`` is (its id, with the resuming user's identity) from
        its resume ``token``, which becomes ``new_token``: atomic, so good once on every node."""
        user, now = core.identity.user_key, self._wall_now()
        return await self.store.claim(
            core.id, user, resume_hash(token), resume_hash(new_token), last_seq, now
        )

    async def take(
        self,
        core: SessionCore,
        token: str,
        new_token: str,
        last_seq: int,
        make_host: Callable[[SessionCore], SessionHost],
    ) -> tuple[SessionHost | None, str | None]:
        """Claim the stored session ``core`` is to become (its id) and take it on: the host,
        or why not (``unknown``, ``expired``, ``gap``)."""
        store = self.store
        claim = await self.claim(core, token, new_token, last_seq)
        if claim.reason is not None:
            return None, claim.reason
        self._known.add(core.id)
        entries = await store.log(core.id)
        frames = [entry.frame for entry in entries if entry.frame is not None]
        last = max((entry.seq for entry in entries), default=last_seq)
        core.log = MessageLog.of(frames, last, max_events=self._max_events, max_bytes=self._max_bytes)
        core.last_run = claim.last_run
        host = make_host(core)
        if claim.runner is not None and claim.runner != self.node_id and not (entries and entries[-1].done):
            host.follow()
            after = entries[-1].id if entries else f"{last}-0"
            self._nursery.start_soon(self._follow, host, claim.runner, after, name="wsgate.session.follow")
        return host, None

    async def _follow(self, host: SessionHost, runner: str, after: str) -> None:
        """Relay what the runner node logs of the session's runs until they end, or end them
        as lost once that node is gone."""
        store, core = self.store, host.core
        while core.state is not State.CLOSED:
            try:
                entries = await store.follow(host.id, after)
                if not entries and not await store.alive(runner):
                    lost = await store.lost(host.id, runner)
                    entries = await store.log(host.id, after)
                    if not self._relay(host, entries):
                        return
                    await host.followed()
                    for run_id, message_id in lost or ():
                        data = {"status": "error", "error": NODE_LOST}
                        await host.deliver(
                            encode_message(AgentEvent("agent_completed", run_id, message_id, data))
                        )
                    return
            except Exception as exc:  # the store is away: keep trying while the session lives
                log.warning("session %s: following: %s", host.id, exc, extra={"event": "session.store"})
                await trio.sleep(1)
                continue
            if entries:
                after = entries[-1].id
            if not self._relay(host, entries):
                return
            if entries and entries[-1].done:
                await host.followed()
                return

    def _relay(self, host: SessionHost, entries: list[Entry]) -> bool:
        core = host.core
        for entry in entries:
            if entry.frame is None or entry.seq <= core.seq:
                continue
            if entry.seq != core.seq + 1:  # the log was trimmed past what was relayed: never a hole
                host.close(core.end(CloseCode.GOING_AWAY, "the runs elsewhere sent more than the log keeps"))
                return False
            host.relay(entry.frame)
        return True
