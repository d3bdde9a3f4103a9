"""Users are isolated, limits hold at the boundary, slow and dead clients are dropped, drain."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate import CloseCode
from wsgate.testing import Client, ConnectionRejected, open_harness, settings_for_tests

USERS = [("t1", "alice"), ("t1", "bob"), ("t2", "alice"), (None, "carol")]

operation = st.one_of(
    st.tuples(st.just("connect"), st.integers(0, len(USERS) - 1)),
    st.tuples(st.just("disconnect"), st.integers(0, 50)),
    st.tuples(st.just("publish"), st.integers(0, len(USERS) - 1)),
    st.tuples(st.just("run"), st.integers(0, 50)),
    st.tuples(st.just("wait"), st.integers(0, 3)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, max_size=40))
def test_every_event_reaches_exactly_its_users_connections(ops: list[tuple[str, int]]) -> None:
    async def main() -> None:
        async with open_harness() as h, trio.open_nursery() as nursery:
            clients: list[tuple[int, Client, trio.CancelScope, list[dict[str, Any]]]] = []
            expected: dict[int, list[int]] = {}  # client number -> publish ids it must get
            published = 0

            async def hold(user: int, number: int, task_status: Any) -> None:
                tenant, subject = USERS[user]
                claims: dict[str, Any] = {"tenant": tenant} if tenant else {}
                with trio.CancelScope() as scope:
                    async with h.connect(h.token(subject, **claims)) as client:
                        log: list[dict[str, Any]] = []
                        task_status.started((client, scope, log))
                        while True:
                            log.append(await client.receive_json())

            for op, arg in ops:
                if op == "connect":
                    client, scope, log = await nursery.start(hold, arg, len(clients))
                    clients.append((arg, client, scope, log))
                    expected[len(clients) - 1] = []
                elif op == "disconnect" and clients:
                    await trio.testing.wait_all_tasks_blocked()  # it reads what reached it, then leaves
                    number = arg % len(clients)
                    clients[number][2].cancel()
                elif op == "publish":
                    tenant, subject = USERS[arg]
                    await trio.testing.wait_all_tasks_blocked()
                    h.gateway.publish(subject, {"n": published}, tenant=tenant)
                    for number, (user, _, scope, _) in enumerate(clients):
                        if user == arg and not scope.cancel_called:
                            expected[number].append(published)
                    published += 1
                elif op == "run" and clients:
                    user, client, scope, _ = clients[arg % len(clients)]
                    if not scope.cancel_called:
                        await client.send_json({"type": "user_message", "text": "x"})
                elif op == "wait":
                    await trio.sleep(arg)
            await trio.sleep(5)
            for number, (_, _, _, log) in enumerate(clients):
                got = [m["event"]["n"] for m in log if m["type"] == "event"]
                assert got == expected[number]
                numbered = [m["seq"] for m in log if m["type"] != "session.ready"]
                assert numbered == list(range(1, len(numbered) + 1))
            nursery.cancel_scope.cancel()
            for _, _, scope, _ in clients:
                scope.cancel()
        assert len(h.gateway.registry) == 0
        assert h.gateway.registry.users == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def rejected(h: Any, token: str) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as caught:
        async with h.connect(token):
            pass  # pragma: no cover
    return caught.value


async def test_per_user_limit_at_the_boundary(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)

        async def hold(token: str) -> None:
            async with h.connect(token) as client:
                await client.receive_json()
                ready.release()
                await trio.sleep_forever()

        for _ in range(10):
            nursery.start_soon(hold, h.token("alice", tenant="a"))
            await ready.acquire()
        eleventh = await rejected(h, h.token("alice", tenant="a"))
        assert eleventh.status_code == 429
        assert dict(eleventh.headers).get(b"retry-after") == b"1"
        # Another tenant's alice is another user.
        async with h.connect(h.token("alice", tenant="b")) as other:
            assert (await other.receive_json())["subject"] == "alice"
        nursery.cancel_scope.cancel()


async def test_global_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness(settings_for_tests(**{"server.max_connections": 2})) as h:
        async with h.connect(h.token("a")) as a, h.connect(h.token("b")) as b:
            await a.receive_json()
            await b.receive_json()
            assert (await rejected(h, h.token("c"))).status_code == 429
        async with h.connect(h.token("c")) as c:
            assert (await c.receive_json())["subject"] == "c"


async def test_handshake_rate_per_address(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.handshake_rate": 2, "server.handshake_burst": 3})
    async with open_harness(settings) as h:
        for _ in range(3):
            async with h.connect(h.token()) as client:
                await client.receive_json()
        refused = await rejected(h, h.token())
        assert refused.status_code == 429
        await trio.sleep(0.5)  # one token back at 2 per second
        async with h.connect(h.token()) as client:
            await client.receive_json()


async def test_a_slow_consumer_is_closed_without_delaying_a_fast_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(**{"server.send_queue_messages": 8, "server.slow_consumer_timeout": 2})
    async with (
        open_harness(settings) as h,
        h.connect(h.token("slow"), lockstep=True) as slow,
        h.connect(h.token("fast")) as fast,
    ):
        await slow.receive_json()
        await fast.receive_json()
        start = trio.current_time()
        for n in range(50):  # the slow client reads nothing from here on
            h.gateway.publish("slow", {"n": n})
            h.gateway.publish("fast", {"n": n})
            message = await fast.receive_json()
            assert message["event"]["n"] == n
            assert trio.current_time() == start  # never delayed by the slow one
        (session,) = h.gateway.registry.sessions_of((None, "slow"))
        await trio.sleep(3)
        assert session.close_code == CloseCode.POLICY_VIOLATION
        assert session.close_reason == "slow consumer"
        assert h.gateway.registry.sessions_of((None, "slow")) == []
        h.gateway.publish("fast", {"n": "after"})
        assert (await fast.receive_json())["event"]["n"] == "after"


async def test_a_consumer_that_catches_up_is_told_what_it_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(**{"server.send_queue_messages": 4, "server.slow_consumer_timeout": 5})
    async with open_harness(settings) as h, h.connect(h.token("alice"), lockstep=True) as client:
        await client.receive_json()
        results = [h.gateway.publish("alice", {"n": n})[0] for n in range(10)]
        assert results.count(0) >= 1  # some could not be queued...
        received = await client.receive_until("error")
        # ...every event that was queued arrives, in order, then the notice of how many were not.
        *events, told = received
        assert [m["event"]["n"] for m in events] == [n for n, ok in enumerate(results) if ok]
        assert told["code"] == "events_dropped" and told["dropped"] == results.count(0)


async def _raw_open(h: Any, token: str) -> tuple[trio.abc.Stream, wsproto.WSConnection]:
    """A bare wsproto client's upgrade request, sent with ``token`` over a harness stream."""
    stream = h.open_stream()
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    request = wsproto.events.Request(
        host="x", target="/ws", extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    await stream.send_all(ws.send(request))
    return stream, ws


def _events(ws: wsproto.WSConnection, data: bytes | bytearray) -> list[wsproto.events.Event]:
    ws.receive_data(bytes(data))
    return list(ws.events())


async def _raw_client(
    h: Any, token: str, pings: list[float], messages: list[dict[str, Any]], *, answer: bool = True
) -> tuple[int | None, float | None]:
    """A wsproto client that notes when each ping came and answers it (unless ``answer`` is
    False), reading until the server ends the stream: (close code, when the close came)."""
    stream, ws = await _raw_open(h, token)
    code, closed_at = None, None
    while data := await stream.receive_some():
        for event in _events(ws, data):
            if isinstance(event, wsproto.events.Ping):
                pings.append(trio.current_time())
                if answer:
                    await stream.send_all(ws.send(event.response()))
            elif isinstance(event, wsproto.events.TextMessage):
                messages.append(json.loads(event.data))
            elif isinstance(event, wsproto.events.CloseConnection):
                code, closed_at = event.code, trio.current_time()
    return code, closed_at


async def test_missing_pong_closes_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.heartbeat_interval": 20, "server.heartbeat_timeout": 10})
    async with open_harness(settings) as h:
        pings: list[float] = []
        code, closed_at = await _raw_client(h, h.token("mute"), pings, [], answer=False)
        assert pings == pytest.approx([20])
        assert code == CloseCode.GOING_AWAY
        assert closed_at == pytest.approx(30)  # the ping, then the pong's timeout
        await trio.testing.wait_all_tasks_blocked()
        assert h.gateway.stats["close.1001"] == 1
        assert len(h.gateway.registry) == 0


async def test_pings_follow_each_answered_one(autojump_clock: trio.testing.MockClock) -> None:
    """A client that answers is pinged every interval after its last pong, and stays."""
    settings = settings_for_tests(**{"server.heartbeat_interval": 20, "server.heartbeat_timeout": 10})
    async with open_harness(settings) as h:
        pings: list[float] = []
        with trio.move_on_after(105) as listening:
            await _raw_client(h, h.token("chatty", ttl=3600), pings, [])
        assert listening.cancelled_caught  # still open when the test stopped listening
        assert pings == pytest.approx([20, 40, 60, 80, 100], abs=0.01)


async def test_expiry_lands_on_time_between_pings(autojump_clock: trio.testing.MockClock) -> None:
    """The watchdog keeps both clocks: pings every 20 s, the warning and the 4401 at expiry."""
    settings = settings_for_tests(
        **{"server.heartbeat_interval": 20, "server.heartbeat_timeout": 10, "auth.refresh_ahead": 15}
    )
    async with open_harness(settings) as h:
        pings: list[float] = []
        messages: list[dict[str, Any]] = []
        code, closed_at = await _raw_client(h, h.token("short", ttl=50), pings, messages)
        assert pings == pytest.approx([20, 40], abs=0.01)
        assert code == CloseCode.UNAUTHORIZED
        assert closed_at == pytest.approx(50, abs=0.01)
        warning = next(m for m in messages if m["type"] == "auth.expiring")
        assert warning["expires_in"] == pytest.approx(15, abs=0.01)


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.idle_timeout": 30})
    async with open_harness(settings) as h, h.connect(h.token()) as client:
        await client.receive_json()
        await trio.sleep(20)
        await client.send_json({"type": "ping"})
        await client.receive_json()
        _, reason = await client.wait_closed()
        assert reason.code == CloseCode.NORMAL
        assert trio.current_time() == pytest.approx(50)


@pytest.mark.parametrize(("drain_timeout", "status"), [(60.0, "ok"), (5.0, "cancelled")])
async def test_drain_with_runs_in_flight(
    autojump_clock: trio.testing.MockClock, drain_timeout: float, status: str
) -> None:
    settings = settings_for_tests(**{"agent.step_delay": 10.0, "server.drain_timeout": drain_timeout})
    async with open_harness(settings) as h:
        async with h.connect(h.token("busy")) as busy, h.connect(h.token("idle")) as idle:
            await busy.receive_json()
            await idle.receive_json()
            await busy.send_json({"type": "user_message", "text": "long"})
            assert (await busy.receive_json())["type"] == "agent_started"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.gateway.drain)
                await trio.testing.wait_all_tasks_blocked()
                # New handshakes are refused while draining.
                refused = await rejected(h, h.token("late"))
                assert refused.status_code == 503
                received, reason = await idle.wait_closed()
                assert [m["type"] for m in received] == ["session.draining"]
                assert reason.code == CloseCode.GOING_AWAY and "reconnect after" in (reason.reason or "")
                received, reason = await busy.wait_closed()
                assert received[0]["type"] == "session.draining"
                assert received[-1]["type"] == "agent_completed" and received[-1]["status"] == status
                assert reason.code == CloseCode.GOING_AWAY
                assert [m["seq"] for m in received] == list(range(2, 2 + len(received)))
            assert trio.current_time() <= drain_timeout + 1
        assert len(h.gateway.registry) == 0


async def test_a_ping_that_crosses_the_servers_close_is_not_a_bug(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client may ping while the server's close frame is on its way: the server must not
    answer with a pong after its close (wsproto forbids it), and must still close cleanly."""
    async with open_harness() as h:
        stream, ws = await _raw_open(h, h.token("pinger"))
        while not any(
            isinstance(e, wsproto.events.TextMessage) for e in _events(ws, await stream.receive_some())
        ):
            pass  # until session.ready
        h.gateway.revoke(subject="pinger")  # the server closes with 4403...
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(ws.send(wsproto.events.Ping(payload=b"late")))  # ...as the client pings
        code = None
        while data := await stream.receive_some():
            for event in _events(ws, data):
                if isinstance(event, wsproto.events.CloseConnection):
                    code = event.code
                    await stream.send_all(ws.send(event.response()))
        assert code == CloseCode.FORBIDDEN
        await trio.testing.wait_all_tasks_blocked()  # the connection's task has ended
        assert h.gateway.stats["close.4403"] == 1
        assert h.gateway.stats["connection.bug"] == 0
