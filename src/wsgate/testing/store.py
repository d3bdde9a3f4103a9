"""Detached sessions kept in memory for several gateways in one Trio run: what Redis is to
a cluster (:class:`wsgate.cluster.sessions.RedisSessions`, whose scripts this follows), for
tests of resuming across nodes and processes under ``MockClock``.

::

    shared = SharedSessions()
    async with open_harness(session_store=shared.node("a")) as a, ...:
        ...
    shared.kill("a")  # node a is gone: its key lapses, its runs are lost to the others
"""

from __future__ import annotations

import attrs
import trio

from ..cluster.sessions import Claim, Entry, Saved
from ..registry import UserKey


@attrs.define
class _Record:
    user: UserKey
    digest: str
    owner: str
    until: float
    seq: int
    last_run: int
    runner: str = ""
    runs: list[tuple[str, str | None]] = attrs.Factory(list)
    ended: bool = False
    log: list[Entry] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    def add(self, entry: Entry, max_events: int) -> None:
        self.log.append(entry)
        del self.log[: max(0, len(self.log) - max_events)]
        self.changed.set()
        self.changed = trio.Event()


class SharedSessions:
    """The sessions every node of a test sees (Redis' part), and which nodes are alive."""

    def __init__(self, max_events: int = 1000) -> None:
        self.records: dict[str, _Record] = {}
        self.alive: set[str] = set()
        self.max_events = max_events

    def node(self, node_id: str) -> MemorySessions:
        """The store as node ``node_id`` sees it; the node is alive until :meth:`kill`."""
        self.alive.add(node_id)
        return MemorySessions(self, node_id)

    def kill(self, node_id: str) -> None:
        self.alive.discard(node_id)


class MemorySessions:
    """One node's view of :class:`SharedSessions` (a :class:`~wsgate.cluster.sessions.SessionStore`)."""

    def __init__(self, shared: SharedSessions, node_id: str, *, block: float = 0.5) -> None:
        self._shared = shared
        self._node_id = node_id
        self._block = block

    @property
    def node_id(self) -> str:
        return self._node_id

    async def save(self, saved: Saved) -> None:
        await trio.lowlevel.checkpoint()
        shared, me = self._shared, self._node_id
        record = shared.records.get(saved.session_id)
        elsewhere = record is not None and record.runner not in ("", me)
        if record is None or not elsewhere:
            old = record
            record = shared.records[saved.session_id] = _Record(
                saved.user, saved.digest.hex(), me, saved.until, saved.seq, saved.last_run
            )
            if old is not None:
                record.changed = old.changed
            first = saved.seq - len(saved.frames) + 1
            for i, frame in enumerate(saved.frames):
                record.add(Entry(f"{first + i}-0", frame), shared.max_events)
            record.runner, record.runs = (me, list(saved.runs)) if saved.runs else ("", [])
        else:
            record.digest, record.owner, record.until = saved.digest.hex(), me, saved.until
            record.last_run, record.ended = saved.last_run, False

    async def append(self, session_id: str, first: int, frames: list[str], finished: list[str]) -> str:
        await trio.lowlevel.checkpoint()
        record, me = self._shared.records.get(session_id), self._node_id
        if record is None:
            return "gone"
        if record.ended:
            return "ended"
        if me not in (record.runner, record.owner):
            return "lost"
        for i, frame in enumerate(frames):
            if first + i > record.seq:
                record.seq = first + i
                record.add(Entry(f"{record.seq}-0", frame), self._shared.max_events)
        if finished:
            record.runs = [run for run in record.runs if run[0] not in finished]
            if not record.runs:
                record.runner = ""
                record.add(Entry(f"{record.seq}-1", None, done=True), self._shared.max_events)
        return "owner" if record.owner == me else "moved"

    async def claim(
        self, session_id: str, user: UserKey, digest: bytes, new_digest: bytes, last_seq: int, now: float
    ) -> Claim:
        await trio.lowlevel.checkpoint()
        record = self._shared.records.get(session_id)
        if record is None or record.user != user or record.digest != digest.hex():
            return Claim("unknown")
        if record.ended or now > record.until:
            return Claim("expired")
        frames = [entry for entry in record.log if entry.frame is not None]
        first = frames[0].seq if frames else record.seq + 1
        if not first - 1 <= last_seq <= record.seq:
            return Claim("gap")
        record.digest, record.owner = new_digest.hex(), self._node_id
        return Claim(None, record.runner or None, list(record.runs), record.last_run)

    async def log(self, session_id: str, after: str = "-") -> list[Entry]:
        await trio.lowlevel.checkpoint()
        record = self._shared.records.get(session_id)
        return [] if record is None else _after(record.log, after)

    async def follow(self, session_id: str, after: str) -> list[Entry]:
        record = self._shared.records.get(session_id)
        if record is None:
            await trio.sleep(self._block)
            return []
        found = _after(record.log, after)
        if not found:
            with trio.move_on_after(self._block):
                await record.changed.wait()
            found = _after(record.log, after)
        return found

    async def alive(self, node_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        return node_id in self._shared.alive

    async def lost(self, session_id: str, runner: str) -> list[tuple[str, str | None]] | None:
        await trio.lowlevel.checkpoint()
        record = self._shared.records.get(session_id)
        if record is None or record.runner != runner:
            return None
        runs, record.runner, record.runs = record.runs, "", []
        return runs

    async def owner(self, session_id: str) -> str | None:
        await trio.lowlevel.checkpoint()
        record = self._shared.records.get(session_id)
        return None if record is None else record.owner

    async def ended(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        record = self._shared.records.get(session_id)
        if record is not None and record.owner == self._node_id:
            record.ended = True


def _order(entry_id: str) -> tuple[int, int]:
    seq, _, sub = entry_id.partition("-")
    return int(seq), int(sub or 0)


def _after(log: list[Entry], after: str) -> list[Entry]:
    if after == "-":
        return list(log)
    mark = _order(after)
    return [entry for entry in log if _order(entry.id) > mark]


__all__ = ["MemorySessions", "SharedSessions"]
