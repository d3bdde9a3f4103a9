"""A connection's outbound queue, bounded in messages and in bytes.

Messages are queued already encoded (compact JSON objects); the writer adds
the per-connection ``seq`` as it writes, so nothing is encoded twice.
"""

from __future__ import annotations

from collections import deque

import trio


class OutboundQueue:
    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._items: deque[str] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._not_empty = trio.Event()
        self._not_full = trio.Event()
        self._not_full.set()
        self._closed = False

    @property
    def full(self) -> bool:
        return len(self._items) >= self._max_messages or self._bytes >= self._max_bytes

    def put_nowait(self, text: str) -> bool:
        """Queue ``text`` unless the queue is full (or closed); never blocks."""
        if self._closed or self.full:
            return False
        self._items.append(text)
        self._bytes += len(text)
        self._not_empty.set()
        if self.full:
            self._not_full = trio.Event()
        return True

    async def put(self, text: str) -> bool:
        """Queue ``text``, waiting while the queue is full; False once closed."""
        while not self.put_nowait(text):
            if self._closed:
                return False
            await self._not_full.wait()
        return True

    async def wait_not_full(self) -> None:
        await self._not_full.wait()

    def get_nowait(self) -> str | None:
        if not self._items:
            return None
        text = self._items.popleft()
        self._bytes -= len(text)
        if not self._items:
            self._not_empty = trio.Event()
        if not self.full:
            self._not_full.set()
        return text

    async def get(self) -> str:
        while True:
            text = self.get_nowait()
            if text is not None:
                return text
            await self._not_empty.wait()

    def close(self) -> None:
        """Refuse further messages; what is queued can still be taken."""
        self._closed = True
        self._not_full.set()
