"""The server side of a WebSocket: trio-websocket over wsproto, with one fix.

wsproto reports a frame it cannot accept (invalid UTF-8, a protocol error) as
a ``CloseConnection`` carrying the right code (1007, 1002) but leaves the
connection open, so trio-websocket drops the TCP connection without a close
frame and the client never learns why. Marking the connection as closed by
the remote side makes trio-websocket answer with that code first, as RFC 6455
asks.
"""

from __future__ import annotations

from collections.abc import Generator

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event


class _AnsweringWSConnection(WSConnection):
    def events(self) -> Generator[Event, None, None]:
        for event in super().events():
            connection = self.connection
            if (
                isinstance(event, CloseConnection)
                and connection is not None
                and connection.state is ConnectionState.OPEN
            ):
                connection._state = ConnectionState.REMOTE_CLOSING
            yield event


async def wrap_server_stream(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, message_queue_size: int, max_message_size: int
) -> WebSocketRequest:
    """Like ``trio_websocket.wrap_server_stream``, answering unparsable frames with their code."""
    connection = WebSocketConnection(
        stream,
        _AnsweringWSConnection(ConnectionType.SERVER),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    nursery.start_soon(connection._reader_task)
    request: WebSocketRequest = await connection._get_request()
    return request
