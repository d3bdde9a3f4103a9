"""Pre-auth holding: what a client may hold before it has authenticated is capped.

A handshake counts against its address from the moment its TCP connection is
accepted, and holds one of ``server.max_pending_handshakes_per_address`` (and of
``server.max_pending_handshakes`` in all) until it is admitted or refused.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jwt
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events as ev

from conftest import start_server, stop
from wsgate.testing import GatewayHarness, open_harness, settings_for_tests

SECRET = "preauth-tests-hs256-secret-0123456789"
PARTIAL_HEAD = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # and then nothing more


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


async def open_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def golden_path(source: str, port: int, token: str) -> str:
    """A well-behaved client from ``source``: upgrade, session.ready, one agent run."""
    stream = await open_from(source, port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    extra = [(b"authorization", f"Bearer {token}".encode())]
    await stream.send_all(ws.send(ev.Request(host="127.0.0.1", target="/ws", extra_headers=extra)))
    seen: list[str] = []
    async with stream:
        while not seen or seen[-1] != "agent_completed":
            data = await stream.receive_some(65536)
            if not data:
                return "closed after " + ",".join(seen)
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, ev.RejectConnection):
                    return f"refused {event.status_code}"
                if isinstance(event, ev.AcceptConnection):
                    seen.append("upgraded")
                if isinstance(event, ev.TextMessage):
                    seen.append(json.loads(event.data)["type"])
                    if seen[-1] == "session.ready":
                        message = json.dumps({"type": "user_message", "text": "hi"})
                        await stream.send_all(ws.send(ev.TextMessage(data=message)))
        await stream.send_all(ws.send(ev.CloseConnection(code=1000)))
    return "ok"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read resident memory")
def test_a_flood_of_unfinished_handshakes_is_answered_beyond_the_cap(tmp_path: Path) -> None:
    """400 unfinished handshakes from one address: all but the 32 it may hold are answered
    at once (429), a client from another address is admitted before, during and after,
    and the server's memory comes back to where it was."""
    config = tmp_path / "wsgate.toml"
    config.write_text(f'[auth]\nhmac_secret = "{SECRET}"\n[agent]\nstep_delay = 0.01\n')
    server = start_server(tmp_path, "--config", str(config), env={"WSGATE_LOG__LEVEL": "warning"})
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    results: dict[str, object] = {}

    async def flood() -> None:
        for _ in range(20):  # warm up: the server's steady state before the flood
            assert await golden_path("127.0.0.2", port, token) == "ok"
        results["rss_before"] = rss_kib(server.proc.pid)
        answered: list[int] = []
        held: list[trio.SocketStream] = []
        started = trio.current_time()

        async def unfinished() -> None:
            stream = await open_from("127.0.0.1", port)
            await stream.send_all(PARTIAL_HEAD)
            with trio.move_on_after(3):
                head = await stream.receive_some(65536)
                answered.append(int(head.split(b" ", 2)[1]) if head else 0)
                await stream.aclose()
                return
            held.append(stream)

        async with trio.open_nursery() as nursery:
            for _ in range(400):
                nursery.start_soon(unfinished)
            with trio.fail_after(10):
                results["during"] = [await golden_path("127.0.0.2", port, token) for _ in range(3)]
        results["answered"], results["held"] = answered, len(held)
        results["answer_seconds"] = trio.current_time() - started
        for stream in held:
            await stream.aclose()
        with trio.fail_after(10):
            results["after"] = await golden_path("127.0.0.2", port, token)
        for _ in range(20):
            await golden_path("127.0.0.2", port, token)
        results["rss_after"] = rss_kib(server.proc.pid)

    try:
        trio.run(flood)
    finally:
        stop(server)
    answered = results["answered"]
    assert isinstance(answered, list)
    assert results["held"] == 32
    assert len(answered) == 400 - 32 and set(answered) == {429}
    assert results["during"] == ["ok"] * 3 and results["after"] == "ok"
    before, after = results["rss_before"], results["rss_after"]
    assert isinstance(before, int) and isinstance(after, int)
    assert after <= before * 1.10, (before, after)


async def hold_unfinished(h: GatewayHarness) -> trio.abc.Stream:
    stream = h.open_stream()
    await stream.send_all(PARTIAL_HEAD)
    return stream


async def refusal(stream: trio.abc.Stream) -> bytes:
    await stream.send_all(PARTIAL_HEAD)
    answer = b""
    while chunk := await stream.receive_some():
        answer += chunk
    return answer


async def test_unfinished_handshakes_are_capped_per_address(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.max_pending_handshakes_per_address": 3})
    async with open_harness(settings) as h:
        held = [await hold_unfinished(h) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.gateway.connections.pending) == 3
        start = trio.current_time()
        answer = await refusal(h.open_stream())
        assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert b"\r\nretry-after: 1\r\n" in answer
        assert trio.current_time() - start < 1.5  # answered at once, not at a deadline
        await held[0].aclose()  # one leaves: its place is free again
        await trio.testing.wait_all_tasks_blocked()
        async with h.connect(h.token("alice")) as client:
            assert (await client.receive_json())["type"] == "session.ready"
        assert h.gateway.stats["handshake.429"] == 1
    assert len(h.gateway.connections.pending) == 0


async def test_unfinished_handshakes_are_capped_in_all(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.max_pending_handshakes": 2})
    async with open_harness(settings) as h:
        held = [await hold_unfinished(h) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        answer = await refusal(h.open_stream())
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nretry-after: 1\r\n" in answer
        for stream in held:
            await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.gateway.connections.pending) == 0


async def test_first_message_auth_holds_its_place_until_it_authenticates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(
        **{"auth.first_message": True, "server.max_pending_handshakes_per_address": 1}
    )
    async with open_harness(settings) as h, h.connect() as waiting:  # upgraded, not yet authenticated
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.gateway.connections.pending) == 1
        assert (await refusal(h.open_stream())).startswith(b"HTTP/1.1 429 ")
        await waiting.send_json({"type": "auth", "token": h.token("alice")})
        assert (await waiting.receive_json())["type"] == "session.ready"
        assert len(h.gateway.connections.pending) == 0  # authenticated: no longer pending
        async with h.connect(h.token("bob")) as bob:
            assert (await bob.receive_json())["type"] == "session.ready"


async def test_a_pending_place_is_given_back_when_the_handshake_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(**{"server.max_pending_handshakes_per_address": 1})
    async with open_harness(settings) as h:
        stream = await hold_unfinished(h)
        assert await stream.receive_some() == b""  # dropped at server.handshake_timeout
        assert len(h.gateway.connections.pending) == 0
        assert h.gateway.stats["handshake.timeout"] == 1
        async with h.connect(h.token("alice")) as client:
            assert (await client.receive_json())["type"] == "session.ready"
