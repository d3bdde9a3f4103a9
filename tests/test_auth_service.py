"""The auth service under MockClock: deadlines, retries, the breaker, single flight, JWKS."""

from __future__ import annotations

import base64
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa

from wsgate import CloseCode
from wsgate.breaker import BreakerState
from wsgate.testing import (
    ConnectionRejected,
    FakeAuthService,
    GatewayHarness,
    open_harness,
    settings_for_tests,
)


def auth_settings(fake: FakeAuthService, policy: str, **over: Any) -> Any:
    return settings_for_tests(
        **{
            "auth.policy": policy,
            "auth.introspection_url": fake.introspection_url,
            "auth.client_id": "wsgate",
            "auth.client_secret": "client-secret",
            **over,
        }
    )


@asynccontextmanager
async def gateway(
    fake: FakeAuthService, policy: str = "tolerant", **over: Any
) -> AsyncIterator[GatewayHarness]:
    async with fake.httpx_client() as http, open_harness(auth_settings(fake, policy, **over), http=http) as h:
        yield h


async def handshake(h: GatewayHarness, token: str) -> dict[str, Any] | ConnectionRejected:
    """session.ready, or the rejection."""
    try:
        async with h.connect(token) as client:
            return await client.receive_json()
    except ConnectionRejected as rejected:
        return rejected


def status(result: dict[str, Any] | ConnectionRejected) -> int:
    return result.status_code if isinstance(result, ConnectionRejected) else 101


def retry_after(result: dict[str, Any] | ConnectionRejected) -> int:
    assert isinstance(result, ConnectionRejected)
    return int(dict((k.lower(), v) for k, v in result.headers)[b"retry-after"])


async def test_active_admitted_inactive_refused_with_client_credentials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    async with gateway(fake, "strict") as h:
        ready = await handshake(h, h.token("alice"))
        assert isinstance(ready, dict) and ready["degraded"] is False
        revoked = h.token("alice", jti="revoked")
        fake.inactive_tokens.add(revoked)
        refused = await handshake(h, revoked)
        assert isinstance(refused, ConnectionRejected)
        assert (refused.status_code, refused.body) == (401, b"token inactive\n")
    expected = "Basic " + base64.b64encode(b"wsgate:client-secret").decode()
    assert fake.seen_authorization == [expected, expected]


async def test_service_disagreeing_on_subject_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    original = fake.respond

    async def lying(*args: Any) -> Any:
        answer = await original(*args)
        if answer is not None and answer[1].get("active"):
            answer[1]["sub"] = "somebody-else"
        return answer

    async with gateway(fake) as h:
        fake.respond = lying  # type: ignore[method-assign,assignment]
        refused = await handshake(h, h.token("alice"))
        assert isinstance(refused, ConnectionRejected) and refused.body == b"token subject mismatch\n"


@pytest.mark.parametrize("mode", ["slow", "hang", "down", "error"])
async def test_unavailable_service_strict_503_within_the_deadline(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    fake = FakeAuthService()
    if mode == "slow":
        fake.latency = 1.5  # above auth.call_timeout = 1 s
    else:
        fake.mode = mode
    async with gateway(fake, "strict") as h:
        start = trio.current_time()
        refused = await handshake(h, h.token())
        elapsed = trio.current_time() - start
        assert status(refused) == 503
        assert retry_after(refused) >= 1
        assert elapsed <= 2.0 + 1e-9  # auth.deadline, well inside the 10 s handshake deadline
        assert fake.calls >= 2  # retried
        assert fake.calls <= 3  # auth.retries = 2


@pytest.mark.parametrize("mode", ["hang", "down"])
async def test_unavailable_service_tolerant_admits_degraded(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    fake = FakeAuthService()
    fake.mode = mode
    async with gateway(fake, "tolerant") as h:
        ready = await handshake(h, h.token())
        assert isinstance(ready, dict) and ready["degraded"] is True


async def test_degraded_session_closed_4403_when_service_returns_and_says_inactive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    fake.mode = "down"
    async with gateway(fake, "tolerant") as h:
        kept, revoked = h.token("alice"), h.token("bob")
        async with h.connect(kept) as alice, h.connect(revoked) as bob:
            assert (await alice.receive_json())["degraded"] is True
            assert (await bob.receive_json())["degraded"] is True
            fake.mode = "up"
            fake.inactive_tokens.add(revoked)
            came_back = trio.current_time()
            _, reason = await bob.wait_closed()
            assert reason.code == CloseCode.FORBIDDEN
            assert trio.current_time() - came_back <= 5.0 + 1e-9  # one breaker.open_wait
            # alice is active: no longer degraded, and still served.
            events = await alice.run("hi")
            assert events[-1]["status"] == "ok"
            (session,) = h.gateway.registry.sessions_of((None, "alice"))
            assert session.degraded is False


async def test_client_leaving_mid_call_cancels_the_call(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    fake.mode = "hang"
    async with gateway(fake, "strict") as h:
        with trio.move_on_after(0.5):
            await handshake(h, h.token())
        await trio.sleep(0.1)
        assert fake.calls == 1
        assert fake.cancelled == 1
        assert fake.in_flight == 0
        assert h.gateway.auth.introspection is not None and h.gateway.auth.introspection.in_flight == 0
        assert h.gateway.stats["handshake.abandoned"] == 1
        assert len(h.gateway.registry) == 0
        assert h.gateway.breaker.in_flight == 0


async def test_breaker_trips_rejects_without_calling_probes_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    fake.mode = "down"
    async with gateway(fake, "strict", **{"auth.retries": 0}) as h:
        breaker = h.gateway.breaker

        def state() -> BreakerState:
            return breaker.state

        for _ in range(10):  # breaker.min_calls failures
            assert status(await handshake(h, h.token())) == 503
        assert state() is BreakerState.OPEN
        calls = fake.calls
        assert calls == 10
        for _ in range(20):
            refused = await handshake(h, h.token())
            assert status(refused) == 503
            assert retry_after(refused) >= 1
        assert fake.calls == calls  # open: no call made
        await trio.sleep(5)  # breaker.open_wait
        assert status(await handshake(h, h.token())) == 503  # a probe, still down
        assert fake.calls == calls + 1
        assert state() is BreakerState.OPEN  # the failed probe re-opened it
        assert status(await handshake(h, h.token())) == 503
        assert fake.calls == calls + 1
        fake.mode = "up"
        await trio.sleep(5)
        for i in range(3):  # breaker.half_open_calls probes succeed (distinct tokens: no cache)
            assert status(await handshake(h, h.token(jti=f"t{i}"))) == 101
        assert state() is BreakerState.CLOSED
        assert fake.calls == calls + 4


async def test_concurrent_handshakes_in_an_outage_stay_within_the_breaker_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    fake.mode = "hang"
    async with gateway(fake, "tolerant") as h:
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(status(await handshake(h, h.token(f"user{i}"))))

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        settings = h.gateway.settings.breaker
        assert results == [101] * 200  # tolerant: all admitted, degraded
        assert fake.max_in_flight <= settings.max_concurrent_calls
        assert fake.calls <= settings.max_concurrent_calls + settings.min_calls
        assert h.gateway.breaker.state is BreakerState.OPEN


async def test_concurrent_lookups_of_one_token_share_one_call(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    fake.latency = 0.5
    async with gateway(fake, "strict") as h:
        token = h.token("alice")
        results: list[int] = []

        async def one() -> None:
            results.append(status(await handshake(h, token)))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert results == [101] * 8
        assert fake.calls == 1
        assert status(await handshake(h, token)) == 101  # cached
        assert fake.calls == 1
        await trio.sleep(61)  # auth.cache_ttl
        assert status(await handshake(h, token)) == 101
        assert fake.calls == 2


async def test_negative_answers_are_cached_briefly(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    async with gateway(fake, "strict") as h:
        token = h.token("alice")
        fake.inactive_tokens.add(token)
        assert status(await handshake(h, token)) == 401
        assert status(await handshake(h, token)) == 401
        assert fake.calls == 1
        await trio.sleep(5)  # auth.negative_cache_ttl
        assert status(await handshake(h, token)) == 401
        assert fake.calls == 2


async def test_a_flapping_service_cannot_make_the_breaker_oscillate_faster_than_its_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    rng = random.Random(7)
    async with gateway(fake, "tolerant", **{"auth.retries": 0}) as h:
        transitions = h.gateway.breaker.subscribe(buffer=1000)

        async def flap() -> None:
            while True:
                fake.mode = rng.choice(["up", "down", "down"])
                await trio.sleep(rng.uniform(0.1, 1.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flap)
            for i in range(300):
                nursery.start_soon(handshake, h, h.token(f"u{i}"))
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        seen = []
        while True:
            try:
                seen.append(transitions.receive_nowait())
            except trio.WouldBlock:
                break
        opens = [t.at for t in seen if t.new is BreakerState.OPEN]
        assert len(opens) >= 2
        opened_at = None
        for transition in seen:  # every open lasts at least breaker.open_wait
            if transition.new is BreakerState.OPEN:
                opened_at = transition.at
            elif transition.new is BreakerState.HALF_OPEN:
                assert opened_at is not None and transition.at - opened_at >= 5.0
        assert len(opens) <= 60 / 5 + 1


def rsa_jwk(kid: str) -> tuple[Any, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return private, jwk


@pytest.mark.parametrize("discovery", [False, True])
async def test_jwks_rotation_and_unknown_kid_flood(
    autojump_clock: trio.testing.MockClock, discovery: bool
) -> None:
    fake = FakeAuthService(issuer="http://auth.test")
    key1, jwk1 = rsa_jwk("k1")
    key2, jwk2 = rsa_jwk("k2")
    sym = base64.urlsafe_b64encode(b"symmetric-key-from-the-key-set!!").decode().rstrip("=")
    fake.jwks = {"keys": [jwk1, {"kty": "oct", "k": sym, "kid": "sym", "alg": "HS256"}]}
    keys = {"auth.discovery": True} if discovery else {"auth.jwks_url": fake.jwks_url}
    settings = settings_for_tests(
        **{"auth.hmac_secret": "", "auth.issuer": fake.issuer, "auth.policy": "local", **keys}
    )
    async with fake.httpx_client() as http, open_harness(settings, http=http) as h:
        await trio.sleep(0.1)
        assert fake.jwks_fetches == 1

        def token(private: Any, kid: str) -> str:
            claims = {"iss": settings.auth.issuer}
            return jwt.encode(
                {"sub": "alice", "aud": "wsgate", "exp": int(h.now() + 600), **claims},
                private,
                algorithm="RS256",
                headers={"kid": kid},
            )

        assert status(await handshake(h, token(key1, "k1"))) == 101
        await trio.sleep(10)  # the start-up fetch is older than auth.jwks_min_refetch_interval (5 s)
        fake.jwks = {"keys": [jwk1, jwk2]}  # the provider rotates a key in
        started = trio.current_time()
        assert status(await handshake(h, token(key2, "k2"))) == 101  # on its first handshake
        assert trio.current_time() - started < settings.server.handshake_timeout
        assert fake.jwks_fetches == 2
        key3, jwk3 = rsa_jwk("k3")
        fake.jwks = {"keys": [jwk2, jwk3]}  # another, within the interval of the last fetch:
        refused = await handshake(h, token(key3, "k3"))
        assert isinstance(refused, ConnectionRejected) and refused.status_code == 503  # not 401
        wait = retry_after(refused)
        assert 1 <= wait <= 5
        await trio.sleep(wait)
        assert status(await handshake(h, token(key3, "k3"))) == 101
        assert fake.jwks_fetches == 3
        # A retired key, once the key set was fetched without it, is refused as unknown.
        assert status(await handshake(h, token(key1, "k1"))) == 503  # not checked yet: limited
        await trio.sleep(5)
        assert status(await handshake(h, token(key1, "k1"))) == 401
        assert fake.jwks_fetches == 4
        # A flood of garbage kids, 10 a second for 20 s: one fetch per interval, no more.
        before, answers = fake.jwks_fetches, []
        await trio.sleep(5)
        for i in range(200):
            answers.append(status(await handshake(h, token(key2, f"garbage-{i}"))))
            await trio.sleep(0.1)
        assert set(answers) == {401, 503}
        assert fake.jwks_fetches - before <= 1 + 20 / 5
        # A symmetric key in the key set is never used (no HS/RS confusion through JWKS).
        forged = jwt.encode(
            {"sub": "mallory", "aud": "wsgate", "exp": int(h.now() + 60), "iss": settings.auth.issuer},
            b"symmetric-key-from-the-key-set!!",
            algorithm="HS256",
            headers={"kid": "sym"},
        )
        assert status(await handshake(h, forged)) == 401


async def test_rechecks_after_an_outage_leave_room_for_new_handshakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every degraded session is re-checked once the service is back, with at most half of
    breaker.max_concurrent_calls in flight, so a new handshake meanwhile is not queued."""
    fake = FakeAuthService()
    fake.mode = "down"
    settings = {"breaker.max_concurrent_calls": 4, "breaker.half_open_calls": 1}
    async with gateway(fake, "tolerant", **settings) as h, trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)

        async def hold(n: int) -> None:
            async with h.connect(h.token(f"user{n}")) as client:
                assert (await client.receive_json())["degraded"] is True
                ready.release()
                await trio.sleep_forever()

        for n in range(12):
            nursery.start_soon(hold, n)
        for _ in range(12):
            await ready.acquire()
        fake.mode = "up"
        fake.latency = 0.3  # every re-check takes a while (under the slow-call mark)
        calls = fake.calls
        await fake.wait_for_calls(calls + 1)  # the probe: the breaker closes when it succeeds
        await fake.wait_for_calls(calls + 2)  # then the other re-checks go
        fake.max_in_flight = fake.in_flight
        start = trio.current_time()
        fresh = await handshake(h, h.token("newcomer"))
        assert isinstance(fresh, dict) and fresh["degraded"] is False
        assert trio.current_time() - start <= 0.3 + 1e-9  # one call's latency, no queue
        # Twelve re-checks, two at a time, 0.3 s each: done well within one more open_wait.
        await trio.sleep(h.gateway.settings.breaker.open_wait)
        assert not any(s.degraded for s in h.gateway.registry.all_sessions())
        assert fake.max_in_flight <= 2 + 1  # the re-checks' half, plus the newcomer's call
        nursery.cancel_scope.cancel()


async def test_an_anonymous_demo_session_is_not_rechecked(autojump_clock: trio.testing.MockClock) -> None:
    """There is no token to ask the auth service about: an anonymous session is never
    re-validated (it used to be re-checked with an empty token, then closed 4403)."""
    fake = FakeAuthService()
    async with (
        gateway(fake, "demo", **{"auth.revalidate_interval": 60}) as h,
        h.connect(None) as client,
    ):
        assert (await client.receive_json())["anonymous"] is True
        await trio.sleep(200)  # three re-validation intervals
        assert fake.calls == 0
        await client.send_json({"type": "ping"})
        assert (await client.receive_json())["type"] == "pong"
