"""A connection's outbound queue, bounded in messages and in bytes.

Messages are queued encoded and numbered (compact JSON objects, each with
its ``seq``), so nothing is encoded twice.

Every connection has one, idle or not, so it is kept small: a list with a
read position instead of a deque, and the one waiting writer parked in a
``ParkingLot`` (made once) instead of an event made anew each time the queue
runs empty.
"""

from __future__ import annotations

import trio

_COMPACT_AFTER = 64  # read items dropped from the list's front once this many are behind


class OutboundQueue:
    __slots__ = (
        "_bytes",
        "_closed",
        "_head",
        "_items",
        "_max_bytes",
        "_max_messages",
        "_not_full",
        "_stopped",
        "_waiter",
    )

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._items: list[str] = []
        self._head = 0  # items before this index have been taken
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._waiter = trio.lowlevel.ParkingLot()  # the one task waiting in take()
        self._not_full: trio.Event | None = None  # made when the queue fills: most never do
        self._closed = False
        self._stopped = False  # stop_taking() was called

    def __len__(self) -> int:
        return len(self._items) - self._head

    @property
    def full(self) -> bool:
        return len(self) >= self._max_messages or self._bytes >= self._max_bytes

    @property
    def has_room(self) -> bool:
        return not self._closed and not self.full

    def put_raw(self, texts: list[str]) -> None:
        """Queue ``texts`` whatever the bounds (what opens a connection, a resume's replay:
        bounded by the session's log); never blocks."""
        if self._closed or not texts:
            return
        self._items.extend(texts)
        self._bytes += sum(map(len, texts))
        self._waiter.unpark_all()
        if self._not_full is None and self.full:
            self._not_full = trio.Event()

    def put_nowait(self, text: str) -> bool:
        """Queue ``text`` unless the queue is full (or closed); never blocks."""
        if self._closed or self.full:
            return False
        self._items.append(text)
        self._bytes += len(text)
        self._waiter.unpark_all()
        if self._not_full is None and self.full:
            self._not_full = trio.Event()
        return True

    async def put(self, text: str) -> bool:
        """Queue ``text``, waiting while the queue is full; False once closed."""
        while not self.put_nowait(text):
            if self._closed:
                return False
            await self.wait_not_full()
        return True

    async def wait_not_full(self) -> None:
        if self._not_full is not None:
            await self._not_full.wait()

    def take_nowait(self, max_items: int = 1, max_bytes: int = 0) -> list[str]:
        """The oldest queued messages, in order: at least one if any is queued, then more
        while there are fewer than ``max_items`` and they stay within ``max_bytes``."""
        items, head = self._items, self._head
        stop = min(len(items), head + max_items)
        end, size = head, 0
        while end < stop and (end == head or size + len(items[end]) <= max_bytes):
            size += len(items[end])
            end += 1
        taken = items[head:end]
        if end == len(items):
            items.clear()
            self._head = 0
        elif end >= _COMPACT_AFTER and 2 * end >= len(items):
            del items[:end]
            self._head = 0
        else:
            self._head = end
        self._bytes -= size
        if self._not_full is not None and not self.full:
            self._not_full.set()
            self._not_full = None
        return taken

    async def take(self, max_items: int = 1, max_bytes: int = 0) -> list[str]:
        """Like :meth:`take_nowait`, waiting until something is queued (not after
        :meth:`stop_taking`: then an empty list); one waiter at a time."""
        while not (taken := self.take_nowait(max_items, max_bytes)):
            if self._stopped:
                return taken
            if len(self._waiter):
                raise trio.BusyResourceError("another task is already taking from this queue")
            await self._waiter.park()
        return taken

    def stop_taking(self) -> None:
        """From now on :meth:`take` does not wait: once the queue is empty it returns an
        empty list, and a task waiting in it now gets one at once."""
        self._stopped = True
        self._waiter.unpark_all()

    def close(self) -> None:
        """Refuse further messages; what is queued can still be taken."""
        self._closed = True
        if self._not_full is not None:
            self._not_full.set()
            self._not_full = None
