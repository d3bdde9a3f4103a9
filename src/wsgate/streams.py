"""A thin wrapper over a connection's byte stream that notices the peer leaving.

During admission nobody reads the WebSocket, but trio-websocket's reader task
does; when it sees the stream end, :attr:`GuardedStream.gone` is set and the
handshake (and any auth-service call made for it) is cancelled.
"""

from __future__ import annotations

import trio


class GuardedStream(trio.abc.Stream):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.gone = trio.Event()

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
        return data

    async def aclose(self) -> None:
        self.gone.set()
        await self._stream.aclose()
