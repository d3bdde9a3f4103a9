"""wsgate.client under MockClock against the in-memory gateway: runs, pushes, refresh on
auth.expiring, and reconnect with resume that honours each close code."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from test_resume import KINDS, TOOL_SECONDS, ToolAgent
from wsgate import client as wsclient
from wsgate.errors import CloseCode
from wsgate.testing import GatewayHarness, open_harness, settings_for_tests


def connect(h: GatewayHarness, token: Any, **options: Any) -> Any:
    return wsclient.connect(
        "ws://in-memory/ws", token=token, opener=h.opener, rng=random.Random(7), **options
    )


async def test_a_run_and_a_push(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness(agent=ToolAgent()) as h, connect(h, h.token("alice")) as client:
        assert client.state is wsclient.State.OPEN and client.session["subject"] == "alice"
        events = [event async for event in client.run("hi")]
        assert [e.type for e in events] == KINDS
        assert [e.seq for e in events] == list(range(1, len(KINDS) + 1)) and {e.run_id for e in events} == {
            "r1"
        }
        h.gateway.publish("alice", {"n": 1})
        push = await client.events().receive()
        assert (push.type, push.fields["event"], push.seq) == ("event", {"n": 1}, len(KINDS) + 1)


async def test_a_dropped_connection_is_resumed_and_the_run_goes_on_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    states: list[tuple[wsclient.State, dict[str, Any]]] = []
    async with (
        open_harness(agent=ToolAgent()) as h,
        connect(h, lambda: h.token("alice"), on_state=lambda s, d: states.append((s, d))) as client,
    ):
        received = []
        async for event in client.run("hi"):
            received.append(event)
            if event.type == "tool_executing":
                await h.cut()  # the network drops mid-tool
        assert [e.type for e in received] == KINDS
        assert [e.seq for e in received] == list(range(1, len(KINDS) + 1))
        kinds = [s for s, _ in states]
        assert kinds[:3] == [wsclient.State.OPEN, wsclient.State.RECONNECTING, wsclient.State.OPEN]
        assert states[2][1]["resumed"] is True
        assert h.gateway.stats["session.resumed"] == 1


async def test_a_session_that_cannot_be_recovered_interrupts_its_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(**{"resume.window": 1})
    async with open_harness(settings, agent=ToolAgent()) as h:
        opened = trio.Event()

        def slow_token() -> str:  # the first reconnect waits until the window has passed
            return h.token("alice")

        async with connect(h, slow_token, backoff_base=4.0) as client:
            with pytest.raises(wsclient.RunInterrupted, match="expired"):
                async for event in client.run("hi"):
                    if event.type == "tool_executing":
                        await h.cut()
            opened.set()
            assert client.state is wsclient.State.OPEN
            assert [e.type async for e in client.run("again")] == KINDS  # a fresh session works


async def test_drain_1001_reconnects_after_the_servers_hint(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.drain_reconnect_jitter": 3.0})
    async with open_harness(settings, agent=ToolAgent()) as h:
        states: list[tuple[wsclient.State, dict[str, Any]]] = []
        async with connect(
            h, lambda: h.token("alice"), on_state=lambda s, d: states.append((s, d))
        ) as client:
            h.nursery.start_soon(h.gateway.drain)
            draining = await client.events().receive()
            assert draining.type == "session.draining"
            await trio.sleep(0.1)
            assert states[1] == (wsclient.State.RECONNECTING, {"delay": draining.fields["reconnect_after"]})


async def test_expiring_tokens_are_refreshed_in_band_from_the_callable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h:
        calls = []

        def fresh() -> str:
            calls.append(trio.current_time())
            return h.token("alice", ttl=60)

        async with connect(h, fresh) as client:
            await trio.sleep(300)  # five lifetimes of the token
            assert client.state is wsclient.State.OPEN
            assert len(calls) >= 5 and h.gateway.stats["refresh.ok"] >= 4
            assert h.gateway.stats["close.4401"] == 0


async def test_4401_gets_a_new_token_and_4403_stops(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        # A 5 s token whose refresh is refused (not a JWT): it expires (4401); the reconnect
        # asks the callable again and gets a good one.
        tokens = iter([h.token("alice", ttl=5), "not-a-jwt", h.token("alice", ttl=900)])
        async with connect(h, lambda: next(tokens)) as client:
            await trio.sleep(10)
            assert client.state is wsclient.State.OPEN and h.gateway.stats["close.4401"] == 1
            h.gateway.revoke(subject="alice")
            await trio.sleep(1)
            assert client.state.value == "closed"
            with pytest.raises(wsclient.ClientClosed) as closed:
                await client.send({"type": "ping"})
            assert closed.value.code == CloseCode.FORBIDDEN


async def test_a_fixed_token_refused_at_the_first_connect_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h:
        with pytest.raises(wsclient.ClientClosed) as closed:
            async with connect(h, h.token("alice", iss="https://other.example")):
                pass
        assert closed.value.code == 401


async def test_a_run_refused_by_the_server_raises_and_the_session_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_for_tests(**{"server.max_runs_per_session": 1})
    async with open_harness(settings, agent=ToolAgent()) as h, connect(h, h.token("alice")) as client:
        first = client.run("one")
        assert (await first.__anext__()).type == "agent_started"
        with pytest.raises(wsclient.RunInterrupted, match="too_many_runs"):
            async for _ in client.run("two"):
                pass
        assert [e.type async for e in first] == KINDS[1:]
        _ = TOOL_SECONDS
