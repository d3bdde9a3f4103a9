"""Server cost per handshake and per message, wsgate against bare trio-websocket, in one process.

The socket benchmarks share two cores between client and server and drift
with the machine; this one takes the kernel and the client library out.
Both servers run in this process over ``trio.testing.memory_stream_pair``,
driven by canned client bytes (an upgrade request, masked frames), and the
process CPU time is compared with rounds interleaved, so a slow spell of
the machine hits both sides alike. The client's share (copying canned
bytes) is the same for both and included in both.

- handshake: upgrade request -> ``session.ready`` -> close frame -> EOF;
- message: 50 pipelined ``{"type":"ping"}`` frames at a time, until all are
  answered (wsgate answers ``pong`` through its protocol; bare echoes).
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing
import trio_websocket

from wsgate.auth.tokens import mint_token
from wsgate.server import Gateway, open_gateway
from wsgate.testing import TEST_AUDIENCE, TEST_ISSUER, TEST_SECRET, settings_for_tests

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
READY = b"session.ready"
BATCH = 50


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


CLOSE = _masked(8, struct.pack("!H", 1000))
PING = _masked(1, b'{"type":"ping"}')


def upgrade_request(token: str) -> bytes:
    """An upgrade request with ``token`` as a bearer header, as canned bytes."""
    return (
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def read_until(stream: trio.abc.Stream, needle: bytes) -> bytes:
    """Read until ``needle`` has arrived; what came after it."""
    buffer = b""
    while needle not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("the server closed before answering")
        buffer += data
    return buffer[buffer.index(needle) + len(needle) :]


async def _until_eof(stream: trio.abc.Stream) -> None:
    while await stream.receive_some(65536):
        pass


async def handshakes_over(handler: Handler, count: int, upgrade: bytes) -> None:
    for _ in range(count):
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler, server)
            await client.send_all(upgrade)
            await read_until(client, READY)
            await client.send_all(CLOSE)
            await _until_eof(client)


async def messages_over(
    handler: Handler, batches: int, upgrade: bytes, reply: bytes, batch: int = BATCH
) -> float:
    """Process CPU seconds for ``batches`` x ``batch`` pipelined pings, all answered."""
    pings = PING * batch
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, server)
        await client.send_all(upgrade)
        leftover = await read_until(client, READY)
        start = time.process_time()
        for _ in range(batches):
            await client.send_all(pings)
            answered = leftover.count(reply)
            leftover = b""
            while answered < batch:
                answered += (await client.receive_some(65536)).count(reply)
        spent = time.process_time() - start
        await client.send_all(CLOSE)
        await _until_eof(client)
    return spent


async def bare_server(stream: trio.abc.Stream) -> None:
    """What ``trio_websocket.serve_websocket`` does per connection, with the bare echo app."""
    async with stream, trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        ws = await request.accept()
        try:
            await ws.send_message('{"type":"session.ready"}')
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def bench_gateway() -> AsyncIterator[tuple[Gateway, bytes]]:
    """A gateway with its rate limits out of the way, and an upgrade request it admits."""
    settings = settings_for_tests(
        **{
            "server.handshake_rate": 1e9,
            "server.handshake_burst": 10**9,
            "server.max_pending_handshakes_per_address": 10**6,
            "server.message_rate": 1e9,
            "server.message_burst": 10**9,
            "log.level": "warning",
        }
    )
    async with open_gateway(settings) as gateway:
        token = mint_token(
            TEST_SECRET,
            "bench",
            now=gateway.clock.now(),
            ttl=3600,
            issuer=TEST_ISSUER,
            audience=TEST_AUDIENCE,
        )
        yield gateway, upgrade_request(token)


async def measure(handshakes: int, rounds: int) -> dict[str, dict[str, float]]:
    async with bench_gateway() as (gateway, upgrade):
        sides: dict[str, tuple[Handler, bytes]] = {
            "wsgate": (gateway.connections.handle_stream, b'"pong"'),
            "bare trio-websocket": (bare_server, b'"ping"'),
        }
        per_handshake: dict[str, list[float]] = {name: [] for name in sides}
        per_message: dict[str, list[float]] = {name: [] for name in sides}
        for handler, _ in sides.values():
            await handshakes_over(handler, 50, upgrade)  # warm up
        for _ in range(rounds):
            for name, (handler, reply) in sides.items():
                start = time.process_time()
                await handshakes_over(handler, handshakes, upgrade)
                per_handshake[name].append((time.process_time() - start) / handshakes * 1e6)
                batches = handshakes // 10
                spent = await messages_over(handler, batches, upgrade, reply)
                per_message[name].append(spent / (batches * BATCH) * 1e6)
    return {
        "inproc_cpu_us_per_handshake": {n: statistics.median(v) for n, v in per_handshake.items()},
        "inproc_cpu_us_per_message": {n: statistics.median(v) for n, v in per_message.items()},
    }


def measure_inprocess(quick: bool) -> dict[str, dict[str, float]]:
    """Median process CPU microseconds per handshake and per message, for each side."""
    handshakes, rounds = (300, 3) if quick else (1000, 5)
    print(f"  in-process: {rounds} interleaved rounds of {handshakes} handshakes each", flush=True)
    result: dict[str, dict[str, float]] = trio.run(measure, handshakes, rounds)
    return result
