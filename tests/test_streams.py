"""The stream under the handshake: whose connection it is."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wsgate.streams import GuardedStream, peer_address


async def test_peer_address_comes_from_the_transport() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        addresses: list[str] = []

        async def serve(stream: trio.SocketStream) -> None:
            addresses.append(peer_address(stream))
            # Wrapped for the handshake, the stream no longer tells trio-websocket its peer.
            assert peer_address(GuardedStream(stream)) == "local"
            await stream.aclose()

        await nursery.start(trio.serve_listeners, serve, listeners)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        assert await client.receive_some() == b""
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert addresses == ["127.0.0.1"]


def test_an_in_memory_stream_is_local() -> None:
    client, _ = trio.testing.memory_stream_pair()
    assert peer_address(client) == "local"


async def test_forget_head_empties_the_head_chunks_handed_out() -> None:
    client, server = trio.testing.memory_stream_pair()
    guarded = GuardedStream(server)
    await client.send_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer secret\r\n")
    first = await guarded.receive_some()
    await client.send_all(b"\r\n\x81\x00")  # the end of the head, then a frame
    second = await guarded.receive_some()
    await client.send_all(b"\x81\x01x")
    after = await guarded.receive_some()
    assert bytes(first) + bytes(second) == b"GET / HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n\x81\x00"
    guarded.forget_head()
    assert (first, second) == (b"", b"")  # emptied in place
    assert after == b"\x81\x01x"  # past the head: handed out as it came, not kept


async def test_after_a_write_cut_short_nothing_more_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A write cancelled midway may have sent part of a frame: a close frame after it would be
    garbage to the peer. Without the refusal, the second write below reaches the peer."""
    _client, server = trio.testing.lockstep_stream_pair()
    guarded = GuardedStream(server)
    with trio.move_on_after(1):
        await guarded.send_all(b"half a frame")  # the peer reads nothing: stuck
    with pytest.raises(trio.BrokenResourceError, match="cut short"):
        await guarded.send_all(b"a close frame")
