"""Pushes to many at once through ``/publish``: some users, a tenant, everyone, many events;
each connection gets each event once and in order, and no one gets another's."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.admin import AdminApp
from wsgate.fanout import audience_of_request, events_of_request
from wsgate.httpserver import Request
from wsgate.testing import Client, GatewayHarness, open_harness

KEY = "fanout-admin-key-0123456789"


async def publish(h: GatewayHarness, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = Request("POST", "/publish", {"authorization": f"Bearer {KEY}"}, json.dumps(body).encode())
    response = await AdminApp(h.gateway, KEY).handle(request)
    answer: dict[str, Any] = json.loads(response.body)
    return response.status, answer


async def pushes(client: Client, count: int) -> list[Any]:
    received = [await client.receive_json() for _ in range(count)]
    assert [m["type"] for m in received] == ["event"] * count
    assert [m["seq"] for m in received] == list(range(1, count + 1))
    return [m["event"]["n"] for m in received]


USERS = [("alice", None), ("bob", None), ("carol", "acme"), ("dave", "acme"), ("erin", "other")]


async def test_one_push_of_many_events_to_some_users_a_tenant_and_everyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h, trio.open_nursery() as nursery:
        clients: dict[str, Client] = {}
        opened = trio.Event()

        async def hold(subject: str, tenant: str | None) -> None:
            claims: dict[str, Any] = {"tenant": tenant} if tenant else {}
            async with h.connect(h.token(subject, **claims)) as client:
                await client.receive_json()
                clients[subject] = client
                if len(clients) == len(USERS):
                    opened.set()
                await trio.sleep_forever()

        for subject, tenant in USERS:
            nursery.start_soon(hold, subject, tenant)
        await opened.wait()
        events = [{"n": n} for n in range(50)]
        status, answer = await publish(h, {"subjects": ["alice", "bob", "alice", "nobody"], "events": events})
        assert status == 200 and answer == {"delivered": 100, "connections": 2}
        assert await pushes(clients["alice"], 50) == list(range(50))
        assert await pushes(clients["bob"], 50) == list(range(50))
        status, answer = await publish(h, {"everyone": True, "tenant": "acme", "event": {"n": "acme"}})
        assert answer == {"delivered": 2, "connections": 2}
        for subject in ("carol", "dave"):
            assert (await clients[subject].receive_json())["event"] == {"n": "acme"}
        status, answer = await publish(h, {"everyone": True, "events": [{"n": "all"}]})
        assert answer == {"delivered": 5, "connections": 5}
        for subject, client in clients.items():
            message = await client.receive_json()
            assert message["event"] == {"n": "all"}, subject
        with trio.move_on_after(1):  # nothing else arrives anywhere: no one got another's
            for client in clients.values():
                pytest.fail(f"unexpected {await client.receive_json()}")
        assert h.gateway.stats["published"] == 107
        nursery.cancel_scope.cancel()


async def test_a_full_queue_drops_what_does_not_fit_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from wsgate.testing import settings_for_tests

    settings = settings_for_tests(**{"server.send_queue_messages": 10})
    async with open_harness(settings) as h, h.connect(h.token("alice"), lockstep=True) as client:
        await client.receive_json()
        status, answer = await publish(h, {"subject": "alice", "events": [{"n": n} for n in range(30)]})
        assert status == 200 and answer["delivered"] < 30
        got = [await client.receive_json() for _ in range(answer["delivered"] + 1)]
        assert [m["event"]["n"] for m in got[:-1]] == list(range(answer["delivered"]))
        assert got[-1]["code"] == "events_dropped" and got[-1]["dropped"] == 30 - answer["delivered"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"event": {}}, "exactly one of 'subject', 'subjects' or 'everyone'"),
        ({"subject": "a", "everyone": True, "event": {}}, "exactly one of"),
        ({"subjects": [], "event": {}}, "'subjects' must be a non-empty list"),
        ({"subjects": ["a", 3], "event": {}}, "'subjects' must be a non-empty list"),
        ({"everyone": 1, "event": {}}, "'everyone' must be true"),
        ({"subject": "a"}, "exactly one of 'event'"),
        ({"subject": "a", "event": {}, "events": [{}]}, "exactly one of 'event'"),
        ({"subject": "a", "events": [1]}, "'events' must be a non-empty list of JSON objects"),
        ({"subject": "a", "events": [{}] * 1001}, "at most 1000 events"),
        ({"subjects": ["a"] * 10_001, "event": {}}, "at most 10000 users"),
        ({"subject": "a", "tenant": 1, "event": {}}, "'tenant' must be a string"),
    ],
)
async def test_a_bad_publish_is_a_400_that_names_the_problem(
    autojump_clock: trio.testing.MockClock, body: dict[str, Any], message: str
) -> None:
    async with open_harness() as h, h.connect(h.token("a")) as client:
        await client.receive_json()
        status, answer = await publish(h, body)
        assert status == 400 and message in answer["error"]
        assert h.gateway.stats["published"] == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(["subject", "subjects", "everyone", "tenant", "event", "events", "other"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS, JSON, max_size=5))
def test_any_body_is_either_an_audience_and_events_or_a_value_error(body: dict[str, Any]) -> None:
    try:
        audience, events = audience_of_request(body), events_of_request(body)
    except ValueError as exc:
        assert str(exc)
        return
    assert audience.subjects is None or all(isinstance(s, str) and s for s in audience.subjects)
    assert events and all(isinstance(e, dict) for e in events)
