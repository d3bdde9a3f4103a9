"""A WebSocket: trio-websocket over our subclass of wsproto's connection.

wsproto reports a frame it cannot accept (invalid UTF-8, a protocol error) as
a ``CloseConnection`` carrying the right code (1007, 1002) but leaves the
connection open, so trio-websocket drops the TCP connection without a close
frame and the client never learns why. Marking the connection as closed by
the remote side makes trio-websocket answer with that code first, as RFC 6455
asks. It also refuses a frame whose header declares more than the message
size limit (1009 at once, not after waiting for a body that may never come),
caps the fragments of one message (1009 beyond the cap), does
not answer a ping that crossed our close frame (trio-websocket would try, and
wsproto raise), lets go of the opening handshake's state once the upgrade
is done, empties each message event once trio-websocket has handled it (a
message may carry a token), and lets several queued messages go out in one
write (:func:`send_texts`).

The private parts of trio-websocket and wsproto used here, and why (this is the
only module that touches them; ``tests/test_wsconn.py`` fails when one moves):

- ``WebSocketConnection._reader_task`` and ``_get_request``: starting a server
  connection over our wsproto subclass (the public ``wrap_server_stream`` makes
  its own ``WSConnection``); ``_open_handshake`` likewise for the client.
- ``WebSocketConnection._send``: several messages in one write.
- ``Connection._state``: marking a connection closed by the peer.
- ``WSConnection.handshake``: dropped once the upgrade is done.
- ``Connection._proto._frame_decoder.extensions``: where the declared-size limit
  (a public ``wsproto.extensions.Extension``) is put, since it is not negotiated.
- ``PerMessageDeflate``'s ``_compressor``, ``_decompressor``, ``_inbound_*`` and
  ``_parse_params``: its decompression bounded by the message size, its compressor
  made with a small window, and a secret-bearing message given a context of its own.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, Pong, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import RemoteProtocolError

from .streams import raw_response

log = logging.getLogger("wsgate.server")


@dataclass(frozen=True)
class _Batch(Event):
    """Several text messages to be framed together and written at once."""

    messages: tuple[str, ...]


@dataclass(frozen=True)
class _PlainResponse(Event):
    """An HTTP response written as it is (to a request that is not a WebSocket upgrade)."""

    data: bytes


def _not_an_upgrade(detail: str) -> _PlainResponse:
    reason = (
        "this is a WebSocket endpoint: connect with a WebSocket client"
        f" (the request is not a WebSocket upgrade: {detail})"
    )
    return _PlainResponse(raw_response(400, reason))


def _with_reason_phrase(data: bytes) -> bytes:
    """``HTTP/1.1 401 \\r\\n`` (wsproto writes no reason phrase) as ``HTTP/1.1 401 Unauthorized``."""
    line_end = data.find(b"\r\n")
    line = data[:line_end]
    if line_end < 0 or not line.startswith(b"HTTP/1.1 ") or not line.endswith(b" "):
        return data
    try:
        phrase = HTTPStatus(int(line[9:12])).phrase
    except ValueError:
        return data
    return line + phrase.encode() + data[line_end:]


class _DeclaredSizeLimit(Extension):
    """Refuses a frame as soon as its header declares a payload over ``limit`` bytes.

    Not an extension a peer negotiates: wsproto's hook for frame headers is where a
    declared length can be seen before the payload arrives. It holds no state, so one
    object per limit serves every connection (:func:`_size_limit`).
    """

    name = "wsgate-declared-size-limit"

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if payload_length > self._limit:
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)


_SIZE_LIMITS: dict[int, _DeclaredSizeLimit] = {}


def _size_limit(limit: int) -> _DeclaredSizeLimit:
    extension = _SIZE_LIMITS.get(limit)
    if extension is None:
        extension = _SIZE_LIMITS[limit] = _DeclaredSizeLimit(limit)
    return extension


@dataclass(frozen=True)
class Deflate:
    """permessage-deflate as the server agrees to it (RFC 7692): the window of its own
    compressor, and whether it keeps it from one message to the next."""

    window_bits: int = 12
    context_takeover: bool = False

    @property
    def mem_level(self) -> int:
        """zlib's memLevel for this window: its hash tables sized to the window, not to 128 KiB."""
        return max(1, min(9, self.window_bits - 7))


#: Server messages that carry a secret (a resume token): never compressed in a context that
#: holds another message, so nothing chosen by a client can be used to guess them (CRIME).
_SECRET_MESSAGES = (b'{"type":"session.ready"', b'{"type":"session.resumed"')


class _Deflate(PerMessageDeflate):
    """wsproto's permessage-deflate, bounded: a message is decompressed no further than
    ``max_bytes`` (a deflate bomb is 1009, and never expanded in memory), the client is
    asked not to keep its context (so no decompressor outlives a message here), and the
    server's compressor has a small window and hash (``Deflate``)."""

    def __init__(self, settings: Deflate, max_bytes: int) -> None:
        super().__init__(
            client_no_context_takeover=True,
            server_no_context_takeover=not settings.context_takeover,
            server_max_window_bits=settings.window_bits,
        )
        self._settings = settings
        self._max_bytes = max_bytes
        self._inflated = 0  # bytes of the message being received, decompressed so far

    def accept(self, offer: str) -> bool | str | None:
        """Agree to the client's offer with this server's window (or the smaller one it asks
        for), and ask it to keep no context."""
        client_bits, asked = self._parse_params(offer)
        bits = self._settings.window_bits if asked is None else min(asked, self._settings.window_bits)
        if bits < 9:
            return None  # zlib has no raw deflate with an 8-bit window: decline the offer
        self.server_max_window_bits = bits
        parameters = ["client_no_context_takeover"]
        if self.server_no_context_takeover:
            parameters.append("server_no_context_takeover")
        parameters.append(f"server_max_window_bits={bits}")
        if client_bits is not None:
            self.client_max_window_bits = client_bits
            parameters.append(f"client_max_window_bits={client_bits}")
        self._enabled = True
        return "; ".join(parameters)

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._decompressor is not None
        budget = self._max_bytes - self._inflated
        try:
            out = self._decompressor.decompress(data, budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self._max_bytes or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not fin or not self._inbound_is_compressible or not self._inbound_compressed:
            if fin:
                self._inbound_compressed = None
                self._inflated = 0
            return None
        tail = self._inflate(b"\x00\x00\xff\xff")
        self._decompressor = None  # client_no_context_takeover: nothing kept between messages
        self._inbound_compressed = None
        self._inflated = 0
        return tail

    def frame_outbound(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        if not self._compressible_opcode(opcode):
            return (rsv, data)
        secret = opcode is Opcode.TEXT and bytes(data[:25]).startswith(_SECRET_MESSAGES)
        if secret:
            self._compressor = None  # a context of its own, dropped after it
        if self._compressor is None:
            settings = self._settings
            self._compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.server_max_window_bits, settings.mem_level
            )
        rsv, out = super().frame_outbound(proto, opcode, rsv, data, fin)
        if secret and fin:
            self._compressor = None
        return rsv, out


class _AnsweringWSConnection(WSConnection):
    def __init__(
        self,
        connection_type: ConnectionType,
        max_fragments: int,
        max_frame_bytes: int,
        deflate: Deflate | None = None,
    ) -> None:
        super().__init__(connection_type)
        self._max_fragments = max_fragments
        self._max_frame_bytes = max_frame_bytes
        self._deflate = deflate
        self._fragments = 0
        self._upgraded = False

    def send(self, event: Event) -> bytes:
        if isinstance(event, Pong) and self.state is not ConnectionState.OPEN:
            # A ping that crossed our close frame: trio-websocket answers every ping, but
            # nothing may follow a close (wsproto raises). The close answers it.
            return b""
        if isinstance(event, _Batch):
            return b"".join(
                super(_AnsweringWSConnection, self).send(TextMessage(data=m)) for m in event.messages
            )
        if isinstance(event, _PlainResponse):
            return event.data
        if isinstance(event, AcceptConnection) and self._deflate is not None:
            # trio-websocket accepts with no extension: permessage-deflate is offered here,
            # and wsproto agrees to it only if the client asked for it.
            extensions = [*event.extensions, _Deflate(self._deflate, self._max_frame_bytes)]
            event = AcceptConnection(event.subprotocol, extensions, event.extra_headers)
        data = super().send(event)
        if not self.client and not self._upgraded:
            if self.connection is not None:
                self._drop_handshake()  # a server's upgrade is sent; its one event, the Request, is out
            else:
                data = _with_reason_phrase(data)
        return data

    def receive_data(self, data: bytes | None) -> None:
        try:
            super().receive_data(data)
        except RemoteProtocolError as error:
            if self.client or self._upgraded:
                raise
            # Not a WebSocket upgrade (a browser or curl asking for the page): say so.
            log.info(
                "handshake refused: not a WebSocket upgrade",
                extra={"event": "handshake.refused", "status": 400, "reason": str(error)},
            )
            error.event_hint = _not_an_upgrade(str(error))
            raise

    def _drop_handshake(self) -> None:
        """Let go of the opening handshake once it is over (see :meth:`_events`), and
        bound the frames the connection will parse from now on."""
        self._upgraded = True
        connection = self.connection
        del self.handshake
        if connection is not None:
            connection._proto._frame_decoder.extensions.append(_size_limit(self._max_frame_bytes))

    def _events(self) -> Generator[Event, None, None]:
        """``WSConnection.events``, letting go of the opening handshake once it is over.

        wsproto keeps its H11Handshake (an h11 connection and its buffers, a few KiB)
        for the life of the connection but never uses it again once ``connection`` is
        set: only ``state``, ``send`` and ``receive_data`` look at it, and only before.
        It is dropped once its last events are out: for a server, when it sends the
        upgrade; for a client, after the AcceptConnection event.
        """
        if not self._upgraded:
            yield from self.handshake.events()
            if self.connection is not None:
                self._drop_handshake()
        if self.connection is not None:
            yield from self.connection.events()

    def events(self) -> Generator[Event, None, None]:
        for event in self._events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                message = cast(TextMessage | BytesMessage, event)
                # Bound the pieces of one message, not only its size: each piece costs an
                # object of its own while trio-websocket assembles the message.
                self._fragments = 0 if message.message_finished else self._fragments + 1
                if self._fragments <= self._max_fragments:
                    yield message
                    # Handled by now (its data is in trio-websocket's message or its parts).
                    # trio-websocket's reader keeps the event in a local until the next
                    # frame: for an idle connection, its whole life. It may carry a token.
                    object.__setattr__(message, "data", "" if kind is TextMessage else b"")
                    continue
                event, kind = CloseConnection(code=1009, reason="too many fragments"), CloseConnection
            if kind is CloseConnection:
                connection = self.connection
                if connection is not None and connection.state is ConnectionState.OPEN:
                    connection._state = ConnectionState.REMOTE_CLOSING
                close = cast(CloseConnection, event)
                if close.code == CloseReason.MESSAGE_TOO_BIG and close.reason == "error in extension":
                    event = CloseConnection(code=close.code, reason="message too big")
                yield event
                return
            yield event


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
    max_fragments: int = 1024,
    deflate: Deflate | None = None,
) -> WebSocketRequest:
    """Like ``trio_websocket.wrap_server_stream``, answering unparsable frames with their code,
    and agreeing to permessage-deflate (``deflate``) when the client offers it."""
    connection = WebSocketConnection(
        stream,
        _AnsweringWSConnection(ConnectionType.SERVER, max_fragments, max_message_size, deflate),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    nursery.start_soon(connection._reader_task, name="trio_websocket.reader")
    request: WebSocketRequest = await connection._get_request()
    return request


async def send_texts(ws: WebSocketConnection, messages: Sequence[str]) -> None:
    """Send text messages in order, framed together and written with one ``send_all``
    (one system call where one per message would be made), raising ConnectionClosed
    as ``send_message`` does. Needs a connection made by :func:`wrap_server_stream`.

    ``_send`` is trio-websocket's one path for writing an event: it takes the stream
    lock and turns a broken stream into ``ConnectionClosed``.
    """
    if len(messages) == 1:
        await ws.send_message(messages[0])
        return
    if ws.closed is not None:
        raise ConnectionClosed(ws.closed)
    await ws._send(_Batch(tuple(messages)))


async def wrap_client_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    subprotocols: list[str],
    extra_headers: list[tuple[bytes, bytes]],
    max_message_size: int,
) -> WebSocketConnection:
    """Like ``trio_websocket.wrap_client_stream``, over the same wsproto subclass: the test
    harness's client must not raise either when the gateway's ping crosses its close."""
    connection = WebSocketConnection(
        stream,
        _AnsweringWSConnection(
            ConnectionType.CLIENT, max_fragments=1 << 20, max_frame_bytes=max_message_size
        ),
        host=host,
        path=resource,
        client_subprotocols=subprotocols,
        client_extra_headers=extra_headers,
        max_message_size=max_message_size,
    )
    nursery.start_soon(connection._reader_task, name="trio_websocket.reader")
    await connection._open_handshake.wait()
    return connection
