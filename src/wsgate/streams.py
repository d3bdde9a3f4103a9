"""A thin wrapper over a connection's byte stream, for the handshake.

- It notices the peer leaving (:attr:`GuardedStream.gone`): during admission
  nobody reads the WebSocket but trio-websocket's reader task does, and when
  it sees the stream end the handshake (and any auth-service call made for
  it) is cancelled, through the scope given to :meth:`GuardedStream.watch`.
- It counts the request head's bytes and lines before any parser sees them,
  so too large or too many headers are answered 431 instead of being
  buffered, and it refuses (400) a request line that is not HTTP/1.1 and a
  line ended by a bare LF: RFC 6455 needs HTTP/1.1, and a head whose end we
  could not see would have its frames counted as head
  (:attr:`GuardedStream.refusal`).

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
from http import HTTPStatus

import trio

END_OF_HEAD = b"\r\n\r\n"
HTTP_11 = b" HTTP/1.1"


def raw_response(status: int, reason: str, *, retry_after: int | None = None) -> bytes:
    """An HTTP/1.1 refusal written below the WebSocket layer (before or instead of a parser),
    with ``reason`` as its plain-text body."""
    body = reason.encode() + b"\n"
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "cache-control: no-store",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


REFUSE_431 = (431, raw_response(431, "request header fields too large"))
REFUSE_400_VERSION = (400, raw_response(400, "a WebSocket upgrade needs HTTP/1.1"))
REFUSE_400_BARE_LF = (400, raw_response(400, "request lines must end with CRLF"))


class GuardedStream(trio.abc.Stream):
    __slots__ = (
        "_cut_short",
        "_first_line",
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
        "refusal",
    )

    def __init__(
        self, stream: trio.abc.Stream, *, max_head_bytes: int = 16384, max_head_lines: int = 100
    ) -> None:
        self._stream = stream
        self.gone = False
        #: The status and raw answer the request head earned (431, 400) before any parser saw it.
        self.refusal: tuple[int, bytes] | None = None
        self._watcher: trio.CancelScope | None = None
        self._cut_short = False
        self._head_seen = 0
        self._head_lines = 0
        self._head_done = False
        self._head_chunks: list[bytearray] = []
        self._tail = b""
        self._first_line: bytes | None = b""  # the request line so far; None once checked
        self._max_bytes = max_head_bytes
        self._max_lines = max_head_lines

    def watch(self, scope: trio.CancelScope | None) -> None:
        """Cancel ``scope`` as soon as the peer is gone or its head is refused (None: stop)."""
        self._watcher = scope
        if scope is not None and (self.gone or self.refusal is not None):
            scope.cancel()

    def _trouble(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def _set_gone(self) -> None:
        self.gone = True
        self._trouble()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write to the peer. A write that did not finish (cancelled, say, at the bound of
        a stuck consumer) may have sent part of a frame: nothing more may follow it, not
        even a close frame, so every later write is refused and the stream gets closed."""
        if self._cut_short:
            raise trio.BrokenResourceError("an earlier write was cut short")
        try:
            await self._stream.send_all(data)
        except BaseException:
            self._cut_short = True
            raise

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
        crlf = (self._tail[-1:] + head_part).count(b"\r\n")
        self._head_lines += crlf
        self._tail = window[-3:]
        if end >= 0:
            self._head_done = True
        if self._head_seen > self._max_bytes or self._head_lines > self._max_lines + 2:
            return self._refuse(REFUSE_431)
        if head_part.count(b"\n") != crlf:
            return self._refuse(REFUSE_400_BARE_LF)
        if self._first_line is not None:
            self._first_line += head_part
            line_end = self._first_line.find(b"\r\n")
            if line_end >= 0:
                request_line, self._first_line = self._first_line[:line_end], None
                if not request_line.endswith(HTTP_11):
                    return self._refuse(REFUSE_400_VERSION)
        return data

    def _refuse(self, refusal: tuple[int, bytes]) -> bytearray:
        self.refusal = refusal
        self._trouble()
        return bytearray()  # the parser sees the stream end; the handshake writes the refusal

    async def aclose(self) -> None:
        self._set_gone()
        await self._stream.aclose()

    async def reply_raw(self, data: bytes) -> None:
        """Write bytes below the WebSocket layer (a refusal of the head)."""
        await refuse_raw(self._stream, data)


async def refuse_raw(stream: trio.abc.Stream, response: bytes, *, linger: float = 1.0) -> None:
    """Write a raw HTTP refusal, then half-close and read for up to ``linger`` seconds.

    Closing a socket with unread bytes makes the kernel send a reset, which may destroy
    the answer before the client reads it; reading until the client closes its end (or
    ``linger`` is over) lets the answer arrive.
    """
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(response)
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
            with trio.move_on_after(linger):
                while await stream.receive_some(65536):
                    pass


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
