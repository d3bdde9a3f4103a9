"""Detached sessions kept in Redis, so that a client may resume on any node.

A session is written to Redis when it detaches (never while a connection
serves it: that costs nothing on the hot path), and what its runs send while
detached is appended as it is logged. Two keys per session, both expiring
twice ``resume.window`` after the last write:

- ``wsgate:session:<id>``, a hash: the user, the resume token's digest, the
  node that owns the session and the node whose runs are still running
  (``runner``, with their ids), the last ``seq``, and when the window ends;
- ``wsgate:session:<id>:log``, a stream of the numbered messages, entry
  ``<seq>-0`` for message ``seq``, trimmed to ``resume.max_events``; an entry
  ``<seq>-1`` with ``done`` marks the end of the runner's last run.

A resume on any node claims the session atomically (a Lua script checks user,
token, window and that the log reaches back to ``last_seq``, then rotates the
token and takes ownership), so the token is good once, cluster-wide. While the
runner's runs go on, the new owner follows the stream; when the runner node is
gone (its ``wsgate:node:<id>`` key expired, ``cluster.lease_ttl``), the owner
takes its runs over as lost and ends each with ``agent_completed`` ``status:
"error"``, ``error.code: "node_lost"``.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import attrs

from ..config import Settings
from ..registry import UserKey
from .broker import BrokerUnavailable
from .redis import RedisBroker, node_key

SAVE = """
local runner = redis.call('HGET', KEYS[1], 'runner')
local elsewhere = runner and runner ~= '' and runner ~= ARGV[4]
if not elsewhere then
  redis.call('DEL', KEYS[2])
  local n = #ARGV - 9
  local first = tonumber(ARGV[7]) - n + 1
  for i = 1, n do redis.call('XADD', KEYS[2], (first + i - 1) .. '-0', 'f', ARGV[9 + i]) end
  if n > 0 then redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[9]) end
  if ARGV[6] == '[]' then redis.call('HSET', KEYS[1], 'runner', '', 'runs', '[]')
  else redis.call('HSET', KEYS[1], 'runner', ARGV[4], 'runs', ARGV[6]) end
  redis.call('HSET', KEYS[1], 'seq', ARGV[7])
end
redis.call('HSET', KEYS[1], 'user', ARGV[2], 'token', ARGV[3], 'owner', ARGV[4], 'until', ARGV[5],
  'last_run', ARGV[8], 'ended', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
local rec = redis.call('HMGET', KEYS[1], 'runner', 'owner', 'ended', 'runs')
if rec[3] == '1' then return 'ended' end
if rec[1] ~= ARGV[2] and rec[2] ~= ARGV[2] then return 'lost' end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local first = tonumber(ARGV[5])
for i = 6, #ARGV do
  local at = first + i - 6
  if at > seq then
    redis.call('XADD', KEYS[2], at .. '-0', 'f', ARGV[i])
    seq = at
  end
end
redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[3])
redis.call('HSET', KEYS[1], 'seq', seq)
local finished = cjson.decode(ARGV[4])
if #finished > 0 then
  local gone = {}
  for _, r in ipairs(finished) do gone[r] = true end
  local left = {}
  for _, run in ipairs(cjson.decode(rec[4])) do
    if not gone[run[1]] then table.insert(left, run) end
  end
  if #left == 0 then
    redis.call('HSET', KEYS[1], 'runner', '', 'runs', '[]')
    redis.call('XADD', KEYS[2], redis.call('HGET', KEYS[1], 'seq') .. '-1', 'done', '1')
  else
    redis.call('HSET', KEYS[1], 'runs', cjson.encode(left))
  end
end
if rec[2] == ARGV[2] then return 'owner' end
return 'moved'
"""

CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local rec = redis.call('HMGET', KEYS[1],
  'user', 'token', 'ended', 'until', 'seq', 'runner', 'runs', 'last_run')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then return {'unknown'} end
if rec[3] == '1' or tonumber(ARGV[5]) > tonumber(rec[4]) then return {'expired'} end
local seq = tonumber(rec[5])
local first = seq + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then
  local at = string.find(head[1][1], '-', 1, true)
  first = tonumber(string.sub(head[1][1], 1, at - 1))
  if string.sub(head[1][1], at + 1) == '1' then first = first + 1 end
end
local last = tonumber(ARGV[6])
if last > seq or last < first - 1 then return {'gap'} end
redis.call('HSET', KEYS[1], 'token', ARGV[3], 'owner', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return {'ok', rec[6], rec[7], rec[8]}
"""

ENDED = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('HSET', KEYS[1], 'ended', '1') end
return 1
"""

LOST = """
local rec = redis.call('HMGET', KEYS[1], 'runner', 'runs')
if rec[1] ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'runner', '', 'runs', '[]')
return rec[2]
"""


def record_key(session_id: str) -> str:
    return f"wsgate:session:{session_id}"


def log_key(session_id: str) -> str:
    return f"wsgate:session:{session_id}:log"


@attrs.frozen
class Saved:
    """What a node writes of a session as it detaches."""

    session_id: str
    user: UserKey
    digest: bytes  # of the current resume token
    until: float  # when the window ends (epoch seconds)
    seq: int
    last_run: int
    frames: list[str]  # the log: the last len(frames) messages, up to seq
    runs: list[tuple[str, str | None]]  # (run_id, message_id) still running here


@attrs.frozen
class Claim:
    """A resume's claim: ``reason`` (``unknown``, ``expired``, ``gap``) or the session taken,
    with the node still running some of its runs (``runner``, and which) and its run count."""

    reason: str | None
    runner: str | None = None
    runs: list[tuple[str, str | None]] = attrs.field(factory=list)
    last_run: int = 0


@attrs.frozen
class Entry:
    """One message of a stored log (``frame``), or the end of the runner's last run (``done``)."""

    id: str
    frame: str | None
    done: bool = False

    @property
    def seq(self) -> int:
        return int(self.id.partition("-")[0])


class SessionStore(Protocol):
    """Where detached sessions are kept for every node: :class:`RedisSessions`, or
    :class:`wsgate.testing.MemorySessions` in tests under ``MockClock``."""

    @property
    def node_id(self) -> str: ...

    async def save(self, saved: Saved) -> None: ...

    async def append(self, session_id: str, first: int, frames: list[str], finished: list[str]) -> str: ...

    async def claim(
        self, session_id: str, user: UserKey, digest: bytes, new_digest: bytes, last_seq: int, now: float
    ) -> Claim: ...

    async def log(self, session_id: str, after: str = "-") -> list[Entry]: ...

    async def follow(self, session_id: str, after: str) -> list[Entry]: ...

    async def alive(self, node_id: str) -> bool: ...

    async def lost(self, session_id: str, runner: str) -> list[tuple[str, str | None]] | None: ...

    async def owner(self, session_id: str) -> str | None: ...

    async def ended(self, session_id: str) -> None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[Entry]:
    entries = []
    for entry in raw or ():
        fields = {_text(k): _text(v) for k, v in entry.field_values.items()}
        entries.append(Entry(_text(entry.identifier), fields.get("f"), "done" in fields))
    return entries


class RedisSessions:
    """Detached sessions in Redis, through the broker's connection, deadlines and breaker."""

    def __init__(self, broker: RedisBroker, *, window: float, max_events: int, call_timeout: float) -> None:
        self._broker = broker
        self._ttl_ms = max(1000, int(window * 2000))
        self._max_events = max_events
        self._block_ms = max(1, int(call_timeout * 500))  # a blocking read ends well within a call

    @classmethod
    def of(cls, broker: RedisBroker, settings: Settings) -> RedisSessions | None:
        """The store of a gateway with ``settings`` (None when resuming is off)."""
        resume = settings.resume
        if resume.window <= 0:
            return None
        return cls(
            broker,
            window=resume.window,
            max_events=resume.max_events,
            call_timeout=settings.cluster.call_timeout,
        )

    @property
    def node_id(self) -> str:
        return self._broker.node_id

    async def save(self, saved: Saved) -> None:
        """Write the session as it detaches (this node its owner, and its runs' runner)."""
        args = [
            self._ttl_ms,
            json.dumps(list(saved.user)),
            saved.digest.hex(),
            self.node_id,
            repr(saved.until),
            json.dumps([list(run) for run in saved.runs]),
            saved.seq,
            saved.last_run,
            self._max_events,
            *saved.frames,
        ]
        await self._eval(SAVE, saved.session_id, args)

    async def append(self, session_id: str, first: int, frames: list[str], finished: list[str]) -> str:
        """Messages ``first``, ``first + 1``, ... (those not stored yet) of a session this node
        owns or runs runs of, and the runs that ended: ``owner``, or ``moved`` (resumed elsewhere;
        the runs go on), else ``lost``, ``ended`` or ``gone``: the runs are no one's any more."""
        args = [self._ttl_ms, self.node_id, self._max_events, json.dumps(finished), first, *frames]
        return _text(await self._eval(APPEND, session_id, args))

    async def claim(
        self, session_id: str, user: UserKey, digest: bytes, new_digest: bytes, last_seq: int, now: float
    ) -> Claim:
        args = [
            json.dumps(list(user)),
            digest.hex(),
            new_digest.hex(),
            self.node_id,
            repr(now),
            last_seq,
            self._ttl_ms,
        ]
        answer = [_text(part) for part in await self._eval(CLAIM, session_id, args)]
        if answer[0] != "ok":
            return Claim(answer[0])
        runs = [(str(run[0]), run[1]) for run in json.loads(answer[2])]
        return Claim(None, answer[1] or None, runs, int(answer[3] or 0))

    async def log(self, session_id: str, after: str = "-") -> list[Entry]:
        """The stored log, or what follows entry ``after``."""
        start = after if after == "-" else f"({after}"
        return _entries(await self._broker.call("xrange", log_key(session_id), start, "+"))

    async def follow(self, session_id: str, after: str) -> list[Entry]:
        """What follows entry ``after``, waiting a moment for it (an empty list: nothing yet)."""
        found = await self._broker.call("xread", {log_key(session_id): after}, block=self._block_ms)
        return [entry for entries in (found or {}).values() for entry in _entries(entries)]

    async def alive(self, node_id: str) -> bool:
        return bool(await self._broker.call("exists", [node_key(node_id)]))

    async def lost(self, session_id: str, runner: str) -> list[tuple[str, str | None]] | None:
        """Take the runs of a node that is gone over as lost (None: someone already did)."""
        runs = await self._broker.call("eval", LOST, keys=[record_key(session_id)], args=[runner])
        return None if runs is None else [(str(r[0]), r[1]) for r in json.loads(_text(runs))]

    async def owner(self, session_id: str) -> str | None:
        owner = await self._broker.call("hget", record_key(session_id), "owner")
        return None if owner is None else _text(owner)

    async def ended(self, session_id: str) -> None:
        """The session ended here: a later resume anywhere is ``expired``."""
        await self._broker.call("eval", ENDED, keys=[record_key(session_id)], args=[self.node_id])

    async def _eval(self, script: str, session_id: str, args: list[Any]) -> Any:
        return await self._broker.call(
            "eval", script, keys=[record_key(session_id), log_key(session_id)], args=args
        )


__all__ = ["BrokerUnavailable", "Claim", "Entry", "RedisSessions", "Saved", "SessionStore"]
