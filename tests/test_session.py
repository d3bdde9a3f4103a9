"""In-memory gateway tests under MockClock: the golden path and its failure modes."""

from __future__ import annotations

import gc
import uuid
from typing import Any

import pytest
import trio
import trio.testing
from benchmarks.inprocess import read_until, upgrade_request

from wsgate import CloseCode, RunContext
from wsgate.agent import Emit
from wsgate.session import Session, SessionCore
from wsgate.testing import ConnectionRejected, GatewayHarness, open_harness, settings_for_tests

AGENT_EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


def header(rejection: ConnectionRejected, name: bytes) -> bytes | None:
    return next((v for k, v in rejection.headers if k.lower() == name.lower()), None)


@pytest.mark.parametrize("via", ["header", "subprotocol"])
async def test_golden_path(autojump_clock: trio.testing.MockClock, via: str) -> None:
    async with open_harness() as h, h.connect(h.token("alice"), via=via) as client:
        ready = await client.receive_json()
        assert ready["type"] == "session.ready"
        assert ready["subject"] == "alice"
        assert ready["protocol"] == "wsgate.v1"
        assert ready["degraded"] is False
        assert ready["expires_at"] == h.now() + 900
        assert client.subprotocol == ("wsgate.v1" if via == "subprotocol" else None)
        events = await client.run("hello there world")
        assert [e["type"] for e in events] == AGENT_EVENTS
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        assert {e["run_id"] for e in events} == {"r1"}
        assert events[3]["result"]["words"] == 3
        assert events[-1]["status"] == "ok"
        # A second run on the same connection continues the sequence.
        again = await client.run("x")
        assert [e["seq"] for e in again] == [6, 7, 8, 9, 10]
        assert {e["run_id"] for e in again} == {"r2"}


async def test_subprotocol_never_echoes_the_token(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        token = h.token()
        async with h.connect(token, via="subprotocol") as client:
            assert client.subprotocol == "wsgate.v1"
            assert all(token.encode() not in v for _, v in client.ws.handshake_headers)


async def expect_rejection(h: GatewayHarness, status: int, **kw: Any) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as caught:
        async with h.connect(**kw):
            pass  # pragma: no cover
    assert caught.value.status_code == status, caught.value.body
    return caught.value


async def test_refusals_before_the_upgrade(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        missing = await expect_rejection(h, 401)
        assert header(missing, b"www-authenticate") == b'Bearer error="invalid_token"'
        assert missing.body == b"token missing\n"
        bad_key = await expect_rejection(h, 401, token=h.token(iss="https://issuer.test", aud="wsgate") + "x")
        assert bad_key.body == b"bad signature\n"
        expired = await expect_rejection(h, 401, token=h.token(ttl=-1))
        assert expired.body == b"token expired\n"
        await expect_rejection(h, 404, token=h.token(), path="/nope")
        two = await expect_rejection(
            h,
            400,
            token=h.token("alice"),
            subprotocols=["wsgate.v1", "bearer." + h.token("mallory")],
        )
        assert two.body == b"more than one token in the request\n"
        await expect_rejection(h, 400, subprotocols=["bearer." + h.token()])
        assert h.gateway.stats["handshake.401"] == 3
        assert h.gateway.stats["handshake.admitted"] == 0
        assert len(h.gateway.registry) == 0


async def test_same_token_twice_is_fine(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        token = h.token()
        async with h.connect(token, subprotocols=["wsgate.v1", f"bearer.{token}"]) as client:
            assert (await client.receive_json())["type"] == "session.ready"


async def test_handshake_deadline_drops_a_silent_client(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness(settings_for_tests(**{"server.handshake_timeout": 3})) as h:
        stream = h.open_stream()
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        start = trio.current_time()
        assert await stream.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(3)
        assert h.gateway.stats["handshake.timeout"] == 1
        # The gateway still serves others.
        async with h.connect(h.token()) as client:
            assert (await client.receive_json())["type"] == "session.ready"


async def test_run_cancel_gives_a_terminal_event(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, h.connect(h.token()) as client:
        await client.receive_json()
        await client.send_json({"type": "user_message", "text": "long job"})
        started = await client.receive_json()
        assert started["type"] == "agent_started"
        await client.send_json({"type": "run.cancel", "run_id": started["run_id"]})
        done = await client.receive_json()
        assert done == {"type": "agent_completed", "run_id": "r1", "status": "cancelled", "seq": 2}
        await client.send_json({"type": "run.cancel", "run_id": "r1"})
        assert (await client.receive_json())["code"] == "unknown_run"
        # Nothing more of r1 arrives; the connection still works.
        await client.send_json({"type": "ping", "id": "p"})
        assert await client.receive_json() == {"type": "pong", "id": "p", "seq": 4}


@pytest.mark.parametrize(
    ("frame", "code", "text"),
    [
        ("not json", "bad_message", "not valid JSON"),
        ("[1, 2]", "bad_message", "must be a JSON object"),
        ('{"text": "x"}', "bad_message", "field 'type' is required"),
        ('{"type": 5}', "bad_message", "field 'type' is required"),
        ('{"type": "nope"}', "unknown_type", "unknown message type 'nope'"),
        ('{"type": "user_message"}', "bad_message", "field 'text' is required"),
        ('{"type": "user_message", "text": 5}', "bad_message", "field 'text' must be a string"),
        ('{"type": "run.cancel", "run_id": []}', "bad_message", "field 'run_id' must be a string"),
        (
            '{"type": "user_message", "text": "x", "meta": ' + "[" * 40 + "]" * 40 + "}",
            "bad_message",
            "nested",
        ),
        (b"\x00binary", "bad_message", "binary frames"),
        ('{"type": "auth", "token": "x"}', "already_authenticated", "already authenticated"),
    ],
)
async def test_malformed_messages_get_an_error_and_the_connection_survives(
    autojump_clock: trio.testing.MockClock, frame: str | bytes, code: str, text: str
) -> None:
    async with open_harness() as h, h.connect(h.token()) as client:
        await client.receive_json()
        await client.send_text(frame)
        error = await client.receive_json()
        assert error["type"] == "error"
        assert error["code"] == code
        assert text in error["message"]
        events = await client.run("still here")
        assert events[-1]["status"] == "ok"


async def test_endless_malformed_messages_close_with_4400(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, h.connect(h.token()) as client:
        for _ in range(25):
            await client.send_text("nope")
        received, reason = await client.wait_closed()
        assert reason.code == CloseCode.MALFORMED_MESSAGE
        assert [m["type"] for m in received[1:]] == ["error"] * 20


async def test_a_crashing_session_closes_alone_with_1011(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SessionCore.receive

    def receive(self: SessionCore, raw: str | bytes, now: float) -> Any:
        if self.identity.subject == "crasher":
            raise RuntimeError("bug in a handler")
        return original(self, raw, now)

    monkeypatch.setattr(SessionCore, "receive", receive)
    async with open_harness() as h, h.connect(h.token("bystander")) as bystander:
        await bystander.receive_json()
        await bystander.send_json({"type": "user_message", "text": "during the crash"})
        async with h.connect(h.token("crasher")) as crasher:
            await crasher.receive_json()
            await crasher.send_json({"type": "ping"})
            _, reason = await crasher.wait_closed()
            assert reason.code == CloseCode.INTERNAL_ERROR
        events = await bystander.receive_until("agent_completed")
        assert [e["type"] for e in events] == AGENT_EVENTS
        assert h.gateway.stats["close.1011"] == 1


async def test_client_vanishing_mid_send_ends_only_its_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h, h.connect(h.token("bob")) as bob:
        await bob.receive_json()
        async with h.connect(h.token("alice")) as alice:
            await alice.receive_json()
            await alice.send_json({"type": "user_message", "text": "x"})
            await alice.receive_json()
            await alice.ws._stream.aclose()  # the network goes away mid-run
        events = await bob.run("fine")
        assert events[-1]["status"] == "ok"
        await trio.sleep(1)
        assert h.gateway.stats["connection.bug"] == 0
        assert h.gateway.registry.users == 1


class FailingAgent:
    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None:
        await emit("agent_started")
        raise ValueError("agent bug")


async def test_an_agent_failure_ends_its_run_not_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness(agent=FailingAgent()) as h, h.connect(h.token()) as client:
        await client.receive_json()
        events = await client.run("x")
        assert [(e["type"], e.get("status")) for e in events] == [
            ("agent_started", None),
            ("agent_completed", "error"),
        ]
        await client.send_json({"type": "ping"})
        assert (await client.receive_json())["type"] == "pong"


async def test_concurrent_runs_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"server.max_runs_per_session": 2})
    async with open_harness(settings) as h, h.connect(h.token()) as client:
        await client.receive_json()
        for _ in range(3):
            await client.send_json({"type": "user_message", "text": "x"})
        seen = [await client.receive_json() for _ in range(11)]
        errors = [m for m in seen if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["too_many_runs"]
        done = [m for m in seen if m["type"] == "agent_completed"]
        assert sorted(m["run_id"] for m in done) == ["r1", "r2"]
        seqs = [m["seq"] for m in seen]
        assert seqs == sorted(seqs) == list(range(1, 12))


async def _closed_by_client(h: GatewayHarness, *, mid_run: bool) -> Session:
    """Connect as alice, maybe start a long run, close from the client side; the session."""
    async with h.connect(h.token("alice")) as client:
        await client.receive_json()
        (session,) = h.gateway.registry.sessions_of((None, "alice"))
        if mid_run:
            await client.send_json({"type": "user_message", "text": "long job"})
            assert (await client.receive_json())["type"] == "agent_started"
    await trio.sleep(0.01)  # MockClock time: what needs no timer is done by then
    assert h.gateway.registry.sessions_of((None, "alice")) == []
    return session


async def test_a_client_close_stops_writer_and_watchdog_without_cancelling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The commonest close: the client leaves an idle session. The writer and the watchdog
    are told to stop and end on their own; the nursery is never cancelled, and the
    watchdog is woken rather than cancelled out of its sleep."""
    async with open_harness() as h:
        session = await _closed_by_client(h, mid_run=False)
        assert (session.close_code, session.close_reason) == (CloseCode.NORMAL, "client closed")
        assert session._nursery is not None
        assert not session._nursery.cancel_scope.cancel_called
        assert session._wake is not None
        assert not session._wake.cancel_called
        assert h.gateway.stats["close.1000"] == 1


async def test_a_client_close_mid_run_cancels_the_run(autojump_clock: trio.testing.MockClock) -> None:
    """With a run still going, the client's close (final: the session ends) cancels the run,
    which lives beside the connection, not in its nursery; the connection ends gently."""
    async with open_harness() as h:
        session = await _closed_by_client(h, mid_run=True)
        assert session.close_code == CloseCode.NORMAL
        assert session._nursery is not None
        assert not session._nursery.cancel_scope.cancel_called
        assert session.host._scopes == {}
        assert h.gateway.stats["run.cancelled"] == 1
        assert h.gateway.stats["close.1000"] == 1


def _unique_token(h: GatewayHarness, **claims: Any) -> str:
    """A token no other test mints: tokens are deterministic under MockClock, and a frame
    of an earlier test's (garbage not yet collected) may still hold the same text."""
    return h.token("alice", jti=uuid.uuid4().hex, **claims)


def _holders_of(token: str, *mine: object) -> list[str]:
    """What, in this whole process, refers to a str or bytes with ``token``'s signature,
    besides the test's own ``token`` and ``mine``.

    The collector stops tracking tuples and dicts that hold only atoms (a header's
    ``(name, value)`` pair, say), so those are looked into through whatever holds them.
    """
    gc.collect()  # an earlier test's cyclic garbage is not "held"
    needle = token.rsplit(".", 1)[1]
    raw = needle.encode()
    ignore = {id(token), id(needle), id(raw), *map(id, mine)}
    found: list[str] = []

    def look(holder: object, value: object, depth: int) -> None:
        if id(value) in ignore:
            return
        if (isinstance(value, str) and needle in value) or (
            isinstance(value, bytes | bytearray) and raw in value
        ):
            where = getattr(getattr(holder, "cr_code", None), "co_qualname", "")
            found.append(f"{type(holder).__name__} {where} -> {type(value).__name__}[{len(value)}]")
        elif isinstance(value, tuple | dict | frozenset) and not gc.is_tracked(value) and depth < 4:
            for inner in gc.get_referents(value):
                look(value, inner, depth + 1)

    for holder in gc.get_objects():
        for value in gc.get_referents(holder):
            look(holder, value, 0)
    return found


async def test_an_idle_session_holds_no_copy_of_its_token(autojump_clock: trio.testing.MockClock) -> None:
    """Tokens are not stored beyond verification. trio-websocket's reader keeps what it read
    last (the request head, and the request event with its headers) until the client's
    next frame; the gateway empties both once the upgrade is answered."""
    async with open_harness() as h:
        token = _unique_token(h)
        upgrade = upgrade_request(token)  # canned bytes: the client keeps no parsed copy
        stream = h.open_stream()
        await stream.send_all(upgrade)
        await read_until(stream, b"session.ready")
        await trio.testing.wait_all_tasks_blocked()
        assert h.gateway.registry.sessions_of((None, "alice"))
        assert _holders_of(token, upgrade) == []


async def test_a_refreshed_token_is_not_held_after_the_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same for a token refreshed in-band: once ``auth.refreshed`` is out, neither the
    gateway's reader nor trio-websocket's keeps the message that carried it."""
    async with open_harness() as h, h.connect(h.token("alice")) as client:
        await client.receive_json()
        fresh = _unique_token(h, ttl=1800)
        await client.send_json({"type": "auth.refresh", "token": fresh})
        assert (await client.receive_json())["type"] == "auth.refreshed"
        await trio.testing.wait_all_tasks_blocked()
        assert _holders_of(fresh) == []


async def test_a_first_message_token_is_not_held_after_admission(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same for first-message auth: the ``auth`` message is not kept once admitted."""
    settings = settings_for_tests(**{"auth.first_message": True})
    async with open_harness(settings) as h, h.connect() as client:
        token = _unique_token(h)
        await client.send_json({"type": "auth", "token": token})
        assert (await client.receive_json())["type"] == "session.ready"
        await trio.testing.wait_all_tasks_blocked()
        assert _holders_of(token) == []


async def test_a_seeded_harness_reproduces_its_session_ids(autojump_clock: trio.testing.MockClock) -> None:
    async def ids(seed: int) -> list[str]:
        async with open_harness(seed=seed) as h:
            found = []
            for _ in range(2):
                async with h.connect(h.token()) as client:
                    found.append((await client.receive_json())["session_id"])
            return found

    first = await ids(7)
    assert first == await ids(7)
    assert first != await ids(8)
    assert len(set(first)) == 2
