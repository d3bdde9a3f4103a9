"""permessage-deflate (RFC 7692): negotiated with a real client, bounded on the way in (a
deflate bomb is 1009), small on the way out, and never mixing a secret with other text."""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path

import pytest
import websockets
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, RsvBits

from conftest import recv, start_server, stop
from wsgate.wsconn import Deflate, _Deflate

pytestmark = pytest.mark.slow


def test_negotiated_with_a_real_client_and_a_deflate_bomb_is_1009(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"WSGATE_AGENT__STEP_DELAY": "0"})
    try:
        token = server.token("--sub", "alice")

        async def main() -> None:
            auth = {"Authorization": f"Bearer {token}"}
            ws = await websockets.connect(server.url, additional_headers=auth)
            other = await websockets.connect(server.url, additional_headers=auth)
            assert ws.response is not None
            extensions = ws.response.headers["Sec-WebSocket-Extensions"]
            assert extensions.startswith("permessage-deflate") and "server_max_window_bits=12" in extensions
            assert (await recv(ws))["type"] == "session.ready"
            await recv(other)
            # 10 MB of one letter: a few KiB on the wire, far over server.max_message_bytes inflated.
            await ws.send(json.dumps({"type": "user_message", "text": "a" * 10_000_000}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            await other.send(json.dumps({"type": "ping", "id": "still"}))  # no one else is touched
            assert (await recv(other))["id"] == "still"
            await other.close()

        asyncio.run(main())
    finally:
        stop(server)


def test_off_by_a_setting(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"WSGATE_SERVER__DEFLATE": "false"})
    try:
        token = server.token("--sub", "alice")

        async def main() -> None:
            ws = await websockets.connect(server.url, additional_headers={"Authorization": f"Bearer {token}"})
            assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
            await ws.close()

        asyncio.run(main())
    finally:
        stop(server)


def compressed(extension: _Deflate, text: str) -> bytes:
    proto = FrameProtocol(client=False, extensions=[])
    _, data = extension.frame_outbound(proto, Opcode.TEXT, RsvBits(False, False, False), text.encode(), True)
    return data


def alone(text: str, bits: int = 12) -> bytes:
    """``text`` compressed in a context of its own."""
    deflate = Deflate(window_bits=bits)
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, deflate.mem_level)
    return (compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_a_message_with_a_secret_is_compressed_alone_even_with_context_takeover() -> None:
    extension = _Deflate(Deflate(window_bits=12, context_takeover=True), max_bytes=65536)
    extension.accept("permessage-deflate")
    chosen = '{"type":"agent_delta","text":"resume_token guess: abc"}'
    ready = '{"type":"session.ready","session_id":"s-1","resume_token":"abcdefghijklmnop"}'
    compressed(extension, chosen)
    assert compressed(extension, ready) == alone(ready)  # nothing of the client's text before it
    assert compressed(extension, chosen) == alone(chosen)  # nor of the secret after it
    # Other messages do share the context when context takeover is on (that is its point).
    compressed(extension, chosen)
    assert compressed(extension, chosen) != alone(chosen)


def test_decompression_stops_at_the_message_limit() -> None:
    extension = _Deflate(Deflate(), max_bytes=1000)
    extension.accept("permessage-deflate")
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = bomb.compress(b"a" * 5_000_000) + bomb.flush(zlib.Z_SYNC_FLUSH)
    proto = FrameProtocol(client=False, extensions=[])
    extension.frame_inbound_header(proto, Opcode.TEXT, RsvBits(True, False, False), len(payload))
    assert extension.frame_inbound_payload_data(proto, payload) == CloseReason.MESSAGE_TOO_BIG
    assert extension._decompressor is not None and len(extension._decompressor.unconsumed_tail) > 0
