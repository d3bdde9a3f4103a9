"""A thin wrapper over a connection's byte stream, for the handshake.

- It notices the peer leaving (:attr:`GuardedStream.gone`): during admission
  nobody reads the WebSocket but trio-websocket's reader task does, and when
  it sees the stream end the handshake (and any auth-service call made for
  it) is cancelled.
- It counts the request head's bytes and lines before any parser sees them
  (:attr:`GuardedStream.oversized`), so too large or too many headers are
  answered 431 instead of being buffered.
"""

from __future__ import annotations

import contextlib

import trio

END_OF_HEAD = b"\r\n\r\n"

RESPONSE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 32\r\n"
    b"connection: close\r\n\r\n"
    b"request header fields too large\n"
)


class GuardedStream(trio.abc.Stream):
    def __init__(
        self, stream: trio.abc.Stream, *, max_head_bytes: int = 16384, max_head_lines: int = 100
    ) -> None:
        self._stream = stream
        self.gone = trio.Event()
        self.oversized = trio.Event()
        self._head_seen = 0
        self._head_lines = 0
        self._head_done = False
        self._tail = b""
        self._max_bytes = max_head_bytes
        self._max_lines = max_head_lines

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone.set()
            raise
        if not data:
            self.gone.set()
        elif not self._head_done:
            return self._check_head(bytes(data))
        return data

    def _check_head(self, data: bytes) -> bytes:
        window = self._tail + data
        end = window.find(END_OF_HEAD)
        head_part = data if end < 0 else window[len(self._tail) : end + len(END_OF_HEAD)]
        self._head_seen += len(head_part)
        self._head_lines += (self._tail[-1:] + head_part).count(b"\r\n")
        self._tail = window[-3:]
        if end >= 0:
            self._head_done = True
        if self._head_seen > self._max_bytes or self._head_lines > self._max_lines + 2:
            self.oversized.set()
            return b""  # the parser sees the stream end; the handshake answers 431
        return data

    async def aclose(self) -> None:
        self.gone.set()
        await self._stream.aclose()

    async def reply_raw(self, data: bytes) -> None:
        """Write bytes below the WebSocket layer (the 431 refusal)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(data)
