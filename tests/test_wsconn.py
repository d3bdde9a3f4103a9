"""The WebSocket layer under the session: batched writes."""

from __future__ import annotations

import pytest
import trio
import trio.testing
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request, TextMessage
from wsproto.utilities import LocalProtocolError

from wsgate.testing import open_harness, settings_for_tests
from wsgate.wsconn import _AnsweringWSConnection, send_texts, wrap_server_stream


class CountingStream(trio.abc.Stream):
    """Counts the writes that reach the transport."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_send_texts_frames_several_messages_in_one_write() -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    counting = CountingStream(server_end)
    async with trio.open_nursery() as nursery:
        client_ready = trio.Event()
        received: list[str | bytes] = []

        async def client() -> None:
            # trio-websocket types its stream as a socket; any Trio stream works.
            ws = await trio_websocket.wrap_client_stream(nursery, client_end, "localhost", "/ws")  # type: ignore[arg-type]
            client_ready.set()
            for _ in range(4):
                received.append(await ws.get_message())
            await ws.aclose()

        nursery.start_soon(client)
        request = await wrap_server_stream(nursery, counting, message_queue_size=4, max_message_size=2**20)
        ws = await request.accept()
        await client_ready.wait()
        before = counting.writes
        await send_texts(ws, ["one", "two", '{"three":3}'])
        assert counting.writes == before + 1
        await send_texts(ws, ["four"])  # a single message takes the ordinary path
        assert counting.writes == before + 2
    assert received == ["one", "two", '{"three":3}', "four"]


async def test_a_burst_of_pushes_arrives_whole_and_in_order(autojump_clock: trio.testing.MockClock) -> None:
    """More events than one write takes, queued at once: every one arrives, seq without gaps."""
    settings = settings_for_tests(**{"server.send_queue_messages": 500})
    async with open_harness(settings) as h, h.connect(h.token("alice")) as client:
        assert "seq" not in await client.receive_json()  # session.ready is not numbered
        for n in range(300):
            assert h.gateway.publish("alice", {"n": n}) == (1, 1)
        events = [await client.receive_json() for _ in range(300)]
    assert [e["event"]["n"] for e in events] == list(range(300))
    assert [e["seq"] for e in events] == list(range(1, 301))


def _opened_pair(ours: bool = True) -> tuple[WSConnection, WSConnection]:
    """A client-side wsproto connection (ours, or plain wsproto's) and a plain server, open."""
    client = (
        _AnsweringWSConnection(ConnectionType.CLIENT, 16, 1 << 20)
        if ours
        else WSConnection(ConnectionType.CLIENT)
    )
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/ws")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client, server


def test_a_pong_after_our_close_is_not_sent() -> None:
    """trio-websocket answers every ping; one that crossed our close frame is dropped,
    where plain wsproto raises (the gateway logged that as a bug of its own)."""
    plain, _ = _opened_pair(ours=False)
    plain.send(CloseConnection(code=1000))
    with pytest.raises(LocalProtocolError):
        plain.send(Pong(payload=b"late"))
    ours, _ = _opened_pair()
    ours.send(CloseConnection(code=1000))
    assert ours.send(Pong(payload=b"late")) == b""
    ours, theirs = _opened_pair()  # while open, a pong goes out as usual
    theirs.receive_data(ours.send(Pong(payload=b"now")))
    assert isinstance(next(theirs.events()), Pong)


def test_the_opening_handshake_is_let_go_once_over() -> None:
    """wsproto keeps its h11 handshake state for the connection's life; ours drops it (a few
    KiB per idle connection) once its last event is out, and the connection works on."""
    client = _AnsweringWSConnection(ConnectionType.CLIENT, max_fragments=16, max_frame_bytes=1 << 20)
    server = _AnsweringWSConnection(ConnectionType.SERVER, max_fragments=16, max_frame_bytes=1 << 20)
    server.receive_data(client.send(Request(host="x", target="/ws")))
    assert isinstance(next(server.events()), Request)
    assert hasattr(server, "handshake")
    client.receive_data(server.send(AcceptConnection()))
    assert not hasattr(server, "handshake")  # let go as it sent the upgrade
    assert hasattr(client, "handshake")  # AcceptConnection is still to be handed out
    assert [type(e) for e in client.events()] == [AcceptConnection]  # as trio-websocket reads
    assert not hasattr(client, "handshake")
    server.receive_data(client.send(TextMessage(data="later")))
    client.receive_data(server.send(TextMessage(data="back")))
    assert [e.data for e in server.events() if isinstance(e, TextMessage)] == ["later"]
    assert [e.data for e in client.events() if isinstance(e, TextMessage)] == ["back"]
    assert server.state is client.state is ConnectionState.OPEN


def test_the_privates_we_rely_on_are_where_we_use_them() -> None:
    """The privates listed in wsgate/wsconn.py and wsgate/auth/keys.py, as those modules use
    them: an upgrade that moves one fails here, not silently in production."""
    import inspect

    import jwt.api_jws
    from trio_websocket import WebSocketConnection
    from wsproto.connection import Connection
    from wsproto.frame_protocol import FrameDecoder, FrameProtocol

    from wsgate.auth.keys import _JWS, JWT

    for name in ("_reader_task", "_get_request", "_send", "_open_handshake"):
        assert hasattr(WebSocketConnection, name) or name in inspect.getsource(
            WebSocketConnection.__init__
        ), name
    assert "_state" in inspect.getsource(Connection.__init__)
    assert "_proto" in inspect.getsource(Connection.__init__)
    assert "_frame_decoder" in inspect.getsource(FrameProtocol.__init__)
    assert "self.extensions" in inspect.getsource(FrameDecoder.__init__)
    assert "extension.frame_inbound_header" in inspect.getsource(FrameDecoder)
    # auth/keys.py: the PyJWS method _JWS overrides, and PyJWT's own PyJWS it replaces.
    assert "_decode_base64url_segment" in vars(jwt.api_jws.PyJWS)
    assert isinstance(JWT._jws, _JWS)
