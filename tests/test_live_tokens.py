"""Tokens on live connections under MockClock: expiry, refresh, revocation, first-message auth."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from wsgate import CloseCode
from wsgate.testing import Client, ConnectionRejected, FakeAuthService, open_harness, settings_for_tests


async def receive_timed(client: Client) -> tuple[float, dict[str, Any]]:
    message = await client.receive_json()
    return trio.current_time(), message


async def test_expiring_warning_then_4401_at_exp(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, h.connect(h.token(ttl=100)) as client:
        await client.receive_json()
        at, warning = await receive_timed(client)
        assert warning["type"] == "auth.expiring"
        assert at == pytest.approx(90)  # min(60 s, 10 % of 100 s) ahead
        assert warning["expires_at"] == h.now() + 10
        assert warning["expires_in"] == pytest.approx(10)
        _, reason = await client.wait_closed()
        assert reason.code == CloseCode.UNAUTHORIZED
        assert trio.current_time() == pytest.approx(100)


@pytest.mark.parametrize("grace", [0.0, 5.0])
async def test_nothing_is_delivered_after_exp_plus_grace(
    autojump_clock: trio.testing.MockClock, grace: float
) -> None:
    settings = settings_for_tests(**{"auth.expiry_grace": grace, "agent.step_delay": 3.0})
    async with open_harness(settings) as h, h.connect(h.token(ttl=20)) as client:
        await client.receive_json()
        await trio.sleep(10)
        await client.send_json({"type": "user_message", "text": "long"})
        arrivals = []
        while True:
            try:
                arrivals.append(await receive_timed(client))
            except Exception:
                break
        assert all(at <= 20 + grace for at, _ in arrivals)
        assert client.ws.closed is not None and client.ws.closed.code == CloseCode.UNAUTHORIZED


async def test_refresh_rearms_and_the_stream_has_no_gap(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"agent.step_delay": 4.0})
    async with open_harness(settings) as h, h.connect(h.token("alice", ttl=10)) as client:
        await client.receive_json()
        await client.send_json({"type": "user_message", "text": "a run across the refresh"})
        seen = await client.receive_until("auth.expiring")  # at t=9, mid-run
        assert trio.current_time() == pytest.approx(9)
        await client.send_json({"type": "auth.refresh", "token": h.token("alice", ttl=100)})
        seen += await client.receive_until("agent_completed")
        types = [m["type"] for m in seen]
        assert "auth.refreshed" in types
        refreshed = next(m for m in seen if m["type"] == "auth.refreshed")
        assert refreshed["expires_at"] == h.now() - trio.current_time() + 9 + 100
        assert [m["type"] for m in seen if m["type"].startswith(("agent", "tool"))] == [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_completed",
        ]
        assert [m["seq"] for m in seen] == list(range(1, 1 + len(seen)))
        # Re-armed: the next warning comes 10 s before the new expiry.
        at, warning = await receive_timed(client)
        assert warning["type"] == "auth.expiring"
        assert at == pytest.approx(9 + 100 - 10)


async def test_refresh_with_another_subject_closes_4403(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, h.connect(h.token("alice")) as client:
        await client.receive_json()
        await client.send_json({"type": "auth.refresh", "token": h.token("mallory")})
        _, reason = await client.wait_closed()
        assert reason.code == CloseCode.FORBIDDEN


async def test_refresh_with_another_tenant_closes_4403(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h, h.connect(h.token("alice", tenant="a")) as client:
        await client.receive_json()
        await client.send_json({"type": "auth.refresh", "token": h.token("alice", tenant="b")})
        _, reason = await client.wait_closed()
        assert reason.code == CloseCode.FORBIDDEN


async def test_invalid_refresh_is_an_error_and_the_old_token_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h, h.connect(h.token("alice", ttl=50)) as client:
        await client.receive_json()
        await client.send_json({"type": "auth.refresh", "token": h.token("alice", ttl=-5)})
        error = await client.receive_json()
        assert (error["type"], error["code"], error["message"]) == (
            "error",
            "refresh_rejected",
            "token expired",
        )
        await client.send_json({"type": "auth.refresh", "token": "garbage"})
        assert (await client.receive_json())["message"] == "malformed token"
        events = await client.run("still open")
        assert events[-1]["status"] == "ok"
        received, reason = await client.wait_closed()
        assert [m["type"] for m in received] == ["auth.expiring"]
        assert reason.code == CloseCode.UNAUTHORIZED
        assert trio.current_time() == pytest.approx(50)


@pytest.mark.parametrize(("sent_before_exp", "kept"), [(2.001, True), (2.0, False), (1.5, False)])
async def test_slow_refresh_racing_the_expiry(
    autojump_clock: trio.testing.MockClock, sent_before_exp: float, kept: bool
) -> None:
    """The rule: a refresh counts only if decided strictly before exp + grace."""
    fake = FakeAuthService()
    fake.latency = 2.0  # the refresh's auth-service call takes 2 s
    settings = settings_for_tests(
        **{
            "auth.introspection_url": fake.introspection_url,
            "auth.client_auth": "none",
            "auth.policy": "strict",
            "auth.call_timeout": 2.5,
            "auth.deadline": 3.0,
        }
    )
    async with (
        fake.httpx_client() as http,
        open_harness(settings, http=http) as h,
        h.connect(h.token("alice", ttl=100)) as client,  # admitted at t=2 (the service call)
    ):
        await client.receive_json()
        exp = 100
        await trio.sleep(exp - sent_before_exp - trio.current_time())
        await client.send_json({"type": "auth.refresh", "token": h.token("alice", ttl=200)})
        received, reason = await client.wait_closed() if not kept else ([], None)
        if kept:
            assert (await client.receive_json())["type"] == "auth.expiring"
            assert (await client.receive_json())["type"] == "auth.refreshed"
            await trio.sleep(10)
            assert client.ws.closed is None
        else:
            assert reason is not None and reason.code == CloseCode.UNAUTHORIZED
            assert trio.current_time() == pytest.approx(exp)
            assert "auth.refreshed" not in [m["type"] for m in received]


async def test_two_refreshes_racing_are_applied_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    fake.script.extend(["up", "up", "up"])
    settings = settings_for_tests(
        **{
            "auth.introspection_url": fake.introspection_url,
            "auth.client_auth": "none",
            "auth.policy": "strict",
        }
    )
    async with (
        fake.httpx_client() as http,
        open_harness(settings, http=http) as h,
        h.connect(h.token("alice", ttl=100)) as client,
    ):
        await client.receive_json()
        fake.latency = 0.5
        first, second = h.token("alice", ttl=300), h.token("alice", ttl=200, jti="second")
        await client.send_json({"type": "auth.refresh", "token": first})
        await client.send_json({"type": "auth.refresh", "token": second})
        one, two = await client.receive_json(), await client.receive_json()
        assert (one["type"], two["type"]) == ("auth.refreshed", "auth.refreshed")
        assert one["expires_at"] == h.now() - trio.current_time() + 300
        (session,) = h.gateway.registry.sessions_of((None, "alice"))
        assert session.identity.expires_at == two["expires_at"]
        assert session.identity.token_id == "second"


async def test_refresh_rate_limit_closes_4429(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"auth.refresh_limit": 3, "auth.refresh_window": 60})
    async with open_harness(settings) as h, h.connect(h.token("alice")) as client:
        await client.receive_json()
        for _ in range(3):
            await client.send_json({"type": "auth.refresh", "token": h.token("alice")})
            assert (await client.receive_json())["type"] == "auth.refreshed"
        await trio.sleep(61)  # the window slides
        for _ in range(3):
            await client.send_json({"type": "auth.refresh", "token": h.token("alice")})
            assert (await client.receive_json())["type"] == "auth.refreshed"
        await client.send_json({"type": "auth.refresh", "token": h.token("alice")})
        _, reason = await client.wait_closed()
        assert reason.code == CloseCode.RATE_LIMITED


async def test_revocation_reaches_every_connection_of_the_user_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness() as h:
        alice_token = h.token("alice", jti="a1")
        async with (
            h.connect(alice_token) as a1,
            h.connect(h.token("alice")) as a2,
            h.connect(h.token("bob")) as bob,
        ):
            for client in (a1, a2, bob):
                await client.receive_json()
            start = trio.current_time()
            assert h.gateway.revoke(subject="alice") == 2
            for client in (a1, a2):
                _, reason = await client.wait_closed()
                assert reason.code == CloseCode.FORBIDDEN
            assert trio.current_time() - start < 1
            assert (await bob.run("unaffected"))[-1]["status"] == "ok"
        with pytest.raises(ConnectionRejected) as refused:
            async with h.connect(alice_token):
                pass  # pragma: no cover
        assert refused.value.status_code == 403
        await trio.sleep(1)
        async with h.connect(h.token("alice")) as fresh:  # issued after the revocation
            assert (await fresh.receive_json())["type"] == "session.ready"


async def test_revocation_by_jti(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        stolen = h.token("alice", jti="stolen")
        async with h.connect(stolen) as old, h.connect(h.token("alice", jti="other")) as other:
            await old.receive_json()
            await other.receive_json()
            assert h.gateway.revoke(jti="stolen") == 1
            _, reason = await old.wait_closed()
            assert reason.code == CloseCode.FORBIDDEN
            await other.send_json({"type": "ping"})
            assert (await other.receive_json())["type"] == "pong"
        with pytest.raises(ConnectionRejected):
            async with h.connect(stolen):
                pass  # pragma: no cover


async def test_periodic_revalidation_closes_a_token_the_service_revoked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    settings = settings_for_tests(
        **{
            "auth.introspection_url": fake.introspection_url,
            "auth.client_auth": "none",
            "auth.revalidate_interval": 60,
        }
    )
    async with fake.httpx_client() as http, open_harness(settings, http=http) as h:
        token = h.token("alice", ttl=3600)
        async with h.connect(token) as client:
            await client.receive_json()
            await trio.sleep(30)
            fake.inactive_tokens.add(token)
            _, reason = await client.wait_closed()
            assert reason.code == CloseCode.FORBIDDEN
            assert trio.current_time() == pytest.approx(60)


def first_message_settings(**over: Any) -> Any:
    return settings_for_tests(**{"auth.first_message": True, **over})


async def test_first_message_auth(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness(first_message_settings()) as h, h.connect(subprotocols=["wsgate.v1"]) as client:
        assert client.subprotocol == "wsgate.v1"
        await client.send_json({"type": "auth", "token": h.token("alice")})
        ready = await client.receive_json()
        assert (ready["type"], ready["subject"]) == ("session.ready", "alice")
        assert (await client.run("hi"))[-1]["status"] == "ok"


async def test_first_message_timeout_4408(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness(first_message_settings()) as h, h.connect() as client:
        received, reason = await client.wait_closed()
        assert reason.code == CloseCode.AUTH_TIMEOUT
        assert trio.current_time() == pytest.approx(5)
        assert [m["type"] for m in received] == ["error"]


@pytest.mark.parametrize(
    "first",
    [
        {"type": "user_message", "text": "hi"},
        {"type": "ping"},
        {"type": "auth"},
        {"type": "auth", "token": "not-a-token"},
        "not json",
    ],
)
async def test_first_message_other_than_a_valid_auth_is_4401(
    autojump_clock: trio.testing.MockClock, first: Any
) -> None:
    async with open_harness(first_message_settings(), agent=None) as h, h.connect() as client:
        if isinstance(first, str):
            await client.send_text(first)
        else:
            await client.send_json(first)
        received, reason = await client.wait_closed()
        assert reason.code == CloseCode.UNAUTHORIZED
        assert [m["type"] for m in received] == ["error"]  # nothing but errors before auth


async def test_a_token_in_the_request_still_wins_in_first_message_mode(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness(first_message_settings()) as h:
        with pytest.raises(ConnectionRejected):
            async with h.connect("bad.token.here"):
                pass  # pragma: no cover
        async with h.connect(h.token("bob")) as client:
            assert (await client.receive_json())["subject"] == "bob"


async def test_cookie_token_needs_an_allowed_origin(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_for_tests(**{"auth.cookie": True, "auth.allowed_origins": "https://app.example"})
    async with open_harness(settings) as h:
        cookie = (b"cookie", f"theme=dark; wsgate_token={h.token('erin')}".encode())
        async with h.connect(headers=[cookie, (b"origin", b"https://app.example")]) as client:
            assert (await client.receive_json())["subject"] == "erin"
        for headers in ([cookie], [cookie, (b"origin", b"https://evil.example")]):
            with pytest.raises(ConnectionRejected) as refused:
                async with h.connect(headers=headers):
                    pass  # pragma: no cover
            assert refused.value.status_code == 403


async def test_query_token_only_when_switched_on(autojump_clock: trio.testing.MockClock) -> None:
    async with open_harness() as h:
        with pytest.raises(ConnectionRejected) as refused:
            async with h.connect(path=f"/ws?access_token={h.token('frank')}"):
                pass  # pragma: no cover
        assert refused.value.status_code == 401
    async with open_harness(settings_for_tests(**{"auth.query_param": True})) as h:
        async with h.connect(path=f"/ws?access_token={h.token('frank')}") as client:
            assert (await client.receive_json())["subject"] == "frank"
        with pytest.raises(ConnectionRejected) as two:
            async with h.connect(h.token("grace"), path=f"/ws?access_token={h.token('frank')}"):
                pass  # pragma: no cover
        assert two.value.status_code == 400


def test_cookie_without_origins_is_refused_at_start() -> None:
    from wsgate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"auth\.allowed_origins: required when auth\.cookie is on"):
        settings_for_tests(**{"auth.cookie": True})
