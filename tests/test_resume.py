"""Sessions that outlive their socket: detach, resume, and the races around them (MockClock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from wsgate.agent import Emit, RunContext
from wsgate.errors import CloseCode
from wsgate.testing import Client, GatewayHarness, SharedSessions, open_harness, settings_for_tests

TOOL_SECONDS = 10.0


class ToolAgent:
    """A run with a long tool call in the middle, then a streamed answer."""

    async def run(self, ctx: RunContext, text: str, emit: Emit) -> None:
        await emit("agent_started")
        await emit("agent_thinking", text="planning")
        await emit("tool_executing", tool="search", args={"q": text})
        await trio.sleep(TOOL_SECONDS)
        await emit("tool_completed", tool="search", result={"hits": 3})
        for chunk in ("The ", "answer ", "is 42."):
            await emit("agent_delta", text=chunk)
            await trio.sleep(0.5)
        await emit("agent_completed", status="ok", output="The answer is 42.")


KINDS = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_delta",
    "agent_delta",
    "agent_delta",
    "agent_completed",
]


@asynccontextmanager
async def harness(**overrides: Any) -> AsyncIterator[GatewayHarness]:
    async with open_harness(settings_for_tests(**overrides), agent=ToolAgent()) as h:
        yield h


async def start_run(
    client: Client, until: str = "tool_executing"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The session's ready, and what arrived of a run up to ``until``."""
    ready = await client.receive_json()
    assert ready["type"] == "session.ready" and ready["resume_token"]
    await client.send_json({"type": "user_message", "text": "hi", "id": "m1"})
    return ready, await client.receive_until(until)


async def detached_mid_run(
    h: GatewayHarness, token: str | None = None, until: str = "tool_executing"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A session whose connection dropped with a run going: its ready, what arrived of the run."""
    async with h.connect(token or h.token("alice")) as first:
        ready, before = await start_run(first, until)
        await first.drop()
    return ready, before


async def test_a_drop_mid_tool_then_a_resume_5_s_later_gets_every_event_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        ready, before = await detached_mid_run(h)
        await trio.sleep(5)  # the tool is still running, on the detached session
        assert h.gateway.stats["session.detached"] == 1
        async with h.connect(h.token("alice")) as second:
            fresh = await second.receive_json()
            answer = await second.resume(ready, before[-1]["seq"])
            assert answer["type"] == "session.resumed" and answer["recovered"] is True
            assert answer["session_id"] == ready["session_id"] != fresh["session_id"]
            assert answer["resume_token"] not in (None, ready["resume_token"])
            after = await second.receive_until("agent_completed")
        events = before + after
        assert [e["type"] for e in events] == KINDS
        assert [e["seq"] for e in events] == list(range(1, len(KINDS) + 1))
        assert {e["run_id"] for e in events} == {"r1"} and {e["message_id"] for e in events} == {"m1"}
        assert h.gateway.stats["session.resumed"] == 1
        assert h.gateway.stats["run.ok"] == 1


async def test_what_the_run_sent_while_detached_is_replayed_before_the_live_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Resumed after the run has finished: all of it comes from the log, the seq goes on."""
    async with harness() as h:
        ready, before = await detached_mid_run(h, until="agent_thinking")
        await trio.sleep(TOOL_SECONDS + 5)
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["recovered"] is True
            replayed = await second.receive_until("agent_completed")
            assert h.gateway.stats["replayed"] == len(replayed) == len(KINDS) - 2
            await second.send_json({"type": "ping", "id": "p"})
            assert await second.receive_json() == {"type": "pong", "id": "p", "seq": len(KINDS) + 1}


async def test_a_resume_after_the_window_is_expired_and_the_runs_were_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(**{"resume.window": 3}) as h:
        ready, before = await detached_mid_run(h)
        await trio.sleep(4)
        assert h.gateway.stats["session.expired"] == 1 and h.gateway.stats["run.cancelled"] == 1
        assert list(h.gateway.sessions.detached_hosts()) == []
        async with h.connect(h.token("alice")) as second:
            fresh = await second.receive_json()
            answer = await second.resume(ready, before[-1]["seq"])
            assert answer == {
                "type": "session.resumed",
                "session_id": fresh["session_id"],
                "recovered": False,
                "resume_token": answer["resume_token"],
                "reason": "expired",
            }
            # The connection goes on with its fresh session, numbered from 1.
            await second.send_json({"type": "ping"})
            assert (await second.receive_json())["seq"] == 1


async def test_a_last_seq_the_log_no_longer_reaches_is_a_gap_never_a_partial_replay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(**{"resume.max_events": 3}) as h:
        async with h.connect(h.token("alice")) as first:
            ready, _ = await start_run(first, until="agent_started")
            await first.drop()
        await trio.sleep(TOOL_SECONDS + 5)  # seven more events: the log keeps the last three
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, 1)) | {"resume_token": None} == {
                "type": "session.resumed",
                "session_id": (await _session_id(h, second)),
                "recovered": False,
                "resume_token": None,
                "reason": "gap",
            }
            with trio.move_on_after(1):
                extra = await second.receive_json()
                pytest.fail(f"nothing is replayed after a gap, got {extra}")
        async with h.connect(h.token("alice")) as third:
            await third.receive_json()
            # From the log's first message on, the replay is whole; the token is still good.
            answer = await third.resume(ready, len(KINDS) - 3)
            assert answer["recovered"] is True
            assert [e["seq"] for e in await third.receive_until("agent_completed")] == [6, 7, 8]


async def _session_id(h: GatewayHarness, client: Client) -> str:
    (session,) = h.gateway.registry.sessions_of((None, "alice"))
    return session.id


async def test_a_last_seq_ahead_of_the_session_is_a_gap(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ready, before = await detached_mid_run(h)
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"] + 5))["reason"] == "gap"


async def test_two_connections_resuming_at_once_one_wins_and_the_other_gets_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        ready, before = await detached_mid_run(h)
        answers: dict[str, dict[str, Any]] = {}
        streams: dict[str, list[dict[str, Any]]] = {}

        async def resume(name: str) -> None:
            async with h.connect(h.token("alice")) as client:
                await client.receive_json()
                answers[name] = answer = await client.resume(ready, before[-1]["seq"])
                if answer["recovered"]:
                    streams[name] = await client.receive_until("agent_completed")
                else:
                    with trio.move_on_after(TOOL_SECONDS + 5):
                        streams[name] = [await client.receive_json()]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume, "a")
            nursery.start_soon(resume, "b")
        winners = [name for name, answer in answers.items() if answer["recovered"]]
        assert len(winners) == 1
        (loser,) = set(answers) - set(winners)
        assert answers[loser]["reason"] == "unknown"  # the token was used: it is good once
        assert loser not in streams  # not one event of the session
        assert [e["type"] for e in before + streams[winners[0]]] == KINDS


async def test_resuming_a_session_still_served_moves_it_and_closes_the_old_connection_4409(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A half-open connection the server has not noticed: the newer one takes the session."""
    async with harness() as h, h.connect(h.token("alice")) as old, h.connect(h.token("alice")) as new:
        ready, before = await start_run(old)
        await new.receive_json()
        assert (await new.resume(ready, before[-1]["seq"]))["recovered"] is True
        received, reason = await old.wait_closed()
        assert received == [] and reason.code == CloseCode.SESSION_MOVED
        assert [e["type"] for e in before + await new.receive_until("agent_completed")] == KINDS
        assert len(h.gateway.registry.sessions_of((None, "alice"))) == 1


async def test_another_subject_cannot_resume_and_is_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        async with h.connect(h.token("alice")) as alice:
            ready, before = await start_run(alice)
            await alice.drop()
        async with h.connect(h.token("mallory")) as mallory:
            await mallory.receive_json()
            answer = await mallory.resume(ready, 0)
            assert (answer["recovered"], answer["reason"]) == (False, "unknown")
            assert answer["session_id"] != ready["session_id"]
            with trio.move_on_after(TOOL_SECONDS + 5):
                pytest.fail(f"mallory got {await mallory.receive_json()}")
        # Nor another tenant's same subject, nor a wrong token; alice's own still works.
        async with h.connect(h.token("alice", tenant="other")) as other:
            await other.receive_json()
            assert (await other.resume(ready, 0))["reason"] == "unknown"
        async with h.connect(h.token("alice")) as guess:
            await guess.receive_json()
            assert (await guess.resume({**ready, "resume_token": "x" * 32}, 0))["reason"] == "unknown"
        assert h.gateway.stats["session.resume_refused"] == 3
        async with h.connect(h.token("alice")) as again:
            await again.receive_json()
            assert (await again.resume(ready, before[-1]["seq"]))["recovered"] is True
            assert [e["type"] for e in before + await again.receive_until("agent_completed")] == KINDS


async def test_a_token_expiring_while_detached_ends_the_session_at_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        ready, before = await detached_mid_run(h, h.token("alice", ttl=4))
        await trio.sleep(3.9)
        assert h.gateway.stats["session.expired"] == 0
        await trio.sleep(0.2)
        assert h.gateway.stats["session.expired"] == 1 and h.gateway.stats["run.cancelled"] == 1
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["reason"] == "expired"


async def test_a_refresh_right_after_a_resume_is_the_resumed_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        ready, before = await detached_mid_run(h, h.token("alice", ttl=60))
        async with h.connect(h.token("alice", ttl=60)) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["recovered"] is True
            await second.send_json({"type": "auth.refresh", "token": h.token("alice", ttl=900)})
            refreshed = await second.receive_json()
            assert refreshed["type"] == "auth.refreshed" and refreshed["seq"] == before[-1]["seq"] + 1
            (session,) = h.gateway.registry.sessions_of((None, "alice"))
            assert session.id == ready["session_id"]
            assert session.identity.expires_at == refreshed["expires_at"]
            # The resumed session lives on the refreshed token: nothing expires at 60 s.
            rest = await second.receive_until("agent_completed")
            await trio.sleep(120)
            await second.send_json({"type": "ping"})
            assert (await second.receive_json())["seq"] == rest[-1]["seq"] + 1


async def test_a_final_close_ends_the_session_and_its_runs_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        async with h.connect(h.token("alice")) as first:
            ready, before = await start_run(first)
        await trio.sleep(0.1)
        assert h.gateway.stats["run.cancelled"] == 1 and h.gateway.stats["session.detached"] == 0
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["reason"] == "unknown"


async def test_revoking_the_subject_ends_its_detached_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        async with h.connect(h.token("alice")) as first:
            await start_run(first)
            await first.drop()
        await trio.sleep(1)
        h.gateway.revoke(subject="alice")
        assert list(h.gateway.sessions.detached_hosts()) == []
        await trio.sleep(0.1)
        assert h.gateway.stats["run.cancelled"] == 1


async def test_resume_is_only_a_first_message_and_off_when_the_window_is_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h, h.connect(h.token("alice")) as client:
        ready = await client.receive_json()
        await client.send_json({"type": "ping"})
        await client.receive_json()
        await client.send_json(
            {"type": "session.resume", "session_id": ready["session_id"], "resume_token": "t", "last_seq": 0}
        )
        assert (await client.receive_json())["code"] == "resume_not_first"
    async with harness(**{"resume.window": 0}) as h:
        async with h.connect(h.token("alice")) as first:
            ready = await first.receive_json()
            assert ready["resume_token"] is None
            await first.send_json({"type": "user_message", "text": "hi"})
            await first.receive_until("tool_executing")
            await first.drop()
        await trio.sleep(0.1)
        assert h.gateway.stats["run.cancelled"] == 1 and h.gateway.stats["session.detached"] == 0


# -- across gateways: what Redis does in a cluster, in memory under MockClock ----------------


async def test_drained_then_resumed_on_a_new_gateway_process(autojump_clock: trio.testing.MockClock) -> None:
    """The old process drains (the run finishes, 1001, the session is stored) and exits; a new
    one on the same store resumes the session: nothing replayed twice, numbering goes on."""
    shared = SharedSessions()
    settings = settings_for_tests(**{"server.drain_reconnect_jitter": 0})
    async with open_harness(settings, agent=ToolAgent(), session_store=shared.node("old")) as old:
        async with old.connect(old.token("alice")) as client:
            ready, before = await start_run(client)
            old.nursery.start_soon(old.gateway.drain)
            seen, reason = await client.wait_closed()
        assert reason.code == CloseCode.GOING_AWAY
        assert [e["type"] for e in before + seen if e["type"] != "session.draining"] == KINDS
        assert ready["session_id"] in shared.records  # stored before the drain returned
    shared.kill("old")
    async with (
        open_harness(settings, agent=ToolAgent(), session_store=shared.node("new"), seed=1) as new,
        new.connect(new.token("alice")) as client,
    ):
        await client.receive_json()
        last = seen[-1]["seq"]
        assert (await client.resume(ready, last))["recovered"] is True
        await client.send_json({"type": "user_message", "text": "again"})
        again = await client.receive_until("agent_completed")
        assert [e["seq"] for e in again] == list(range(last + 1, last + 1 + len(KINDS)))
        assert {e["run_id"] for e in again} == {"r2"}  # run ids go on too


async def test_resumed_on_another_gateway_while_the_run_goes_on_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The run stays on the gateway that started it; the other relays its events as they come,
    and holds its own (a pong) until the run has ended, numbered after it."""
    shared = SharedSessions()
    async with (
        open_harness(settings_for_tests(), agent=ToolAgent(), session_store=shared.node("a")) as a,
        open_harness(settings_for_tests(), agent=ToolAgent(), session_store=shared.node("b"), seed=1) as b,
    ):
        ready, before = await detached_mid_run(a)
        await trio.sleep(1)
        async with b.connect(b.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["recovered"] is True
            await second.send_json({"type": "user_message", "text": "not yet"})
            after = await second.receive_until("agent_completed")
            assert [e["type"] for e in before + after] == KINDS
            assert [e["seq"] for e in before + after] == list(range(1, len(KINDS) + 1))
            refused = await second.receive_json()  # held while the run ran there: numbered after it
            assert (refused["code"], refused["seq"]) == ("runs_elsewhere", len(KINDS) + 1)
            await second.send_json({"type": "user_message", "text": "now"})
            assert (await second.receive_until("agent_completed"))[-1]["seq"] == 2 * len(KINDS) + 1
        assert list(a.gateway.sessions.detached_hosts()) == []  # a let it go once its run ended


async def test_a_run_whose_gateway_dies_while_detached_ends_node_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = SharedSessions()
    async with open_harness(
        settings_for_tests(), agent=ToolAgent(), session_store=shared.node("b"), seed=1
    ) as b:
        async with open_harness(settings_for_tests(), agent=ToolAgent(), session_store=shared.node("a")) as a:
            ready, before = await detached_mid_run(a)
            await trio.sleep(1)
        shared.kill("a")  # a is gone, mid-tool, its run with it
        async with b.connect(b.token("alice")) as second:
            await second.receive_json()
            assert (await second.resume(ready, before[-1]["seq"]))["recovered"] is True
            (lost,) = await second.receive_until("agent_completed")
            assert (
                lost["seq"] == before[-1]["seq"] + 1 and lost["run_id"] == "r1" and lost["message_id"] == "m1"
            )
            assert lost["status"] == "error" and lost["error"]["code"] == "node_lost"


async def test_metrics_count_detached_resumed_expired_and_the_bytes_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(**{"resume.window": 30}) as h:
        ready, before = await detached_mid_run(h)
        await trio.sleep(1)
        text = h.gateway.metrics.exposition().decode()
        assert "wsgate_sessions_detached 1.0" in text
        (host,) = h.gateway.sessions.detached_hosts()
        assert f"wsgate_session_log_bytes {float(host.core.log.bytes)}" in text and host.core.log.bytes > 0
        async with h.connect(h.token("alice")) as second:
            await second.receive_json()
            await second.resume(ready, 1)
            await second.receive_until("agent_completed")
        async with h.connect(h.token("bob")) as other:
            await other.receive_json()
            await other.resume(ready, 0)
        text = h.gateway.metrics.exposition().decode()
        for line in (
            'wsgate_sessions_total{event="detached"} 1.0',
            'wsgate_sessions_total{event="resumed"} 1.0',
            'wsgate_sessions_total{event="resume_refused"} 1.0',
            f"wsgate_replayed_messages_total {float(len(before) - 1)}",
            "wsgate_sessions_detached 0.0",
        ):
            assert line in text, line


async def test_a_user_reconnecting_in_a_loop_keeps_no_more_detached_sessions_than_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(**{"server.max_connections_per_user": 3}) as h:
        readies = []
        for _ in range(5):
            async with h.connect(h.token("alice")) as client:
                ready, _ = await start_run(client)
                readies.append(ready)
                await client.drop()
            await trio.sleep(0.1)
        waiting = {host.id for host in h.gateway.sessions.detached_hosts()}
        assert waiting == {r["session_id"] for r in readies[2:]}  # the two oldest ended
        assert h.gateway.stats["session.expired"] == 2 and h.gateway.stats["run.cancelled"] == 2
        async with h.connect(h.token("alice")) as client:
            await client.receive_json()
            assert (await client.resume(readies[0], 3))["reason"] == "expired"
        async with h.connect(h.token("alice")) as client:
            await client.receive_json()
            assert (await client.resume(readies[4], 3))["recovered"] is True
