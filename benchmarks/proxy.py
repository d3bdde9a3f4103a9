"""A TCP proxy on 127.0.0.1 in front of a server: it counts the bytes the server sends,
and can drop every connection at once, as a network does (no close frame, no FIN)."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0  # where the proxy listens, once started
        self.down = 0  # bytes the server has sent through it
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if count:
                        self.down += len(data)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(copy(reader, up_writer, False), copy(up_reader, writer, True))

    def cut(self) -> None:
        """Drop every connection through the proxy at once (RST both ways)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
