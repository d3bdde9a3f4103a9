"""A thin wrapper over a connection's byte stream, for the handshake.

- It notices the peer leaving (:attr:`GuardedStream.gone`): during admission
  nobody reads the WebSocket but trio-websocket's reader task does, and when
  it sees the stream end the handshake (and any auth-service call made for
  it) is cancelled, through the scope given to :meth:`GuardedStream.watch`.
- It counts the request head's bytes and lines before any parser sees them
  (:attr:`GuardedStream.oversized`), so too large or too many headers are
  answered 431 instead of being buffered.

Both are plain flags plus one cancel scope to cancel, not events and tasks
waiting on them: every connection pays for this object while it lives.

- It lets go of the request head once the handshake is over
  (:meth:`GuardedStream.forget_head`). trio-websocket's reader keeps the last
  chunk it read in a local variable until the next one arrives, and for an
  idle connection that is the head, token and all, for the connection's life.
  The head is handed out as ``bytearray`` chunks (the parsers copy what they
  are given), which are emptied in place.
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
    __slots__ = (
        "_head_chunks",
        "_head_done",
        "_head_lines",
        "_head_seen",
        "_max_bytes",
        "_max_lines",
        "_stream",
        "_tail",
        "_watcher",
        "gone",
        "oversized",
    )

    def __init__(
        self, stream: trio.abc.Stream, *, max_head_bytes: int = 16384, max_head_lines: int = 100
    ) -> None:
        self._stream = stream
        self.gone = False
        self.oversized = False
        self._watcher: trio.CancelScope | None = None
        self._head_seen = 0
        self._head_lines = 0
        self._head_done = False
        self._head_chunks: list[bytearray] = []
        self._tail = b""
        self._max_bytes = max_head_bytes
        self._max_lines = max_head_lines

    def watch(self, scope: trio.CancelScope | None) -> None:
        """Cancel ``scope`` as soon as the peer is gone or its head is too large (None: stop)."""
        self._watcher = scope
        if scope is not None and (self.gone or self.oversized):
            scope.cancel()

    def _trouble(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def _set_gone(self) -> None:
        self.gone = True
        self._trouble()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._set_gone()
            raise
        if not data:
            self._set_gone()
        elif not self._head_done:
            chunk = self._check_head(bytearray(data))
            self._head_chunks.append(chunk)
            return chunk
        return data

    def forget_head(self) -> None:
        """Empty the chunks of the request head handed out so far (see the module's
        docstring); the parsers took copies long before."""
        for chunk in self._head_chunks:
            chunk.clear()
        self._head_chunks.clear()

    def _check_head(self, data: bytearray) -> bytearray:
        window = self._tail + data
        end = window.find(END_OF_HEAD)
        head_part = data if end < 0 else window[len(self._tail) : end + len(END_OF_HEAD)]
        self._head_seen += len(head_part)
        self._head_lines += (self._tail[-1:] + head_part).count(b"\r\n")
        self._tail = window[-3:]
        if end >= 0:
            self._head_done = True
        if self._head_seen > self._max_bytes or self._head_lines > self._max_lines + 2:
            self.oversized = True
            self._trouble()
            return bytearray()  # the parser sees the stream end; the handshake answers 431
        return data

    async def aclose(self) -> None:
        self._set_gone()
        await self._stream.aclose()

    async def reply_raw(self, data: bytes) -> None:
        """Write bytes below the WebSocket layer (the 431 refusal)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(data)


def peer_address(stream: trio.abc.Stream) -> str:
    """The client's IP address, for per-address limits ("local" for in-memory streams).

    Read from the transport: trio-websocket's ``remote`` only knows trio's own socket
    streams, and the handshake sees the connection through :class:`GuardedStream`.
    """
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            return str(stream.socket.getpeername()[0])
        except OSError:
            return "unknown"  # already gone; the handshake will end on its own
    return "local"
