"""What real identity providers need, under MockClock against the scriptable fake.

Client authentication as RFC 6749 section 2.3.1 has it, a refusal of our request
kept apart from an outage, a slow provider that answers in time, endpoints
found by discovery, and a degraded session told when it is no longer degraded.
The same paths run against a real provider in ``tests/test_e2e_provider.py``.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import unquote_plus

import pytest
import trio
import trio.testing

from test_auth_service import gateway, handshake, retry_after, status
from wsgate.breaker import BreakerState
from wsgate.testing import ConnectionRejected, FakeAuthService, open_harness, settings_for_tests

AWKWARD_SECRET = "s3cr+t%2F:with spaces&more"


def basic_pair(header: str | None) -> tuple[str, str]:
    assert header is not None and header.startswith("Basic ")
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return unquote_plus(user), unquote_plus(password)


async def test_basic_form_encodes_the_id_and_secret(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    async with gateway(
        fake, "strict", **{"auth.client_id": "my:client", "auth.client_secret": AWKWARD_SECRET}
    ) as h:
        assert status(await handshake(h, h.token("alice"))) == 101
    header = fake.seen_authorization[0]
    assert header is not None
    encoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert encoded == "my%3Aclient:s3cr%2Bt%252F%3Awith+spaces%26more"  # each part form-encoded
    assert basic_pair(header) == ("my:client", AWKWARD_SECRET)


async def test_post_sends_the_credentials_in_the_form(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    async with gateway(
        fake, "strict", **{"auth.client_auth": "post", "auth.client_secret": AWKWARD_SECRET}
    ) as h:
        assert status(await handshake(h, h.token("alice"))) == 101
    assert fake.seen_authorization == [None]
    form = fake.seen_forms[0]
    assert (form["client_id"], form["client_secret"]) == ("wsgate", AWKWARD_SECRET)
    assert form["token_type_hint"] == "access_token"


async def test_client_credentials_gets_a_service_token_and_renews_it_before_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAuthService()
    fake.require_service_token = True
    fake.service_token_ttl = 120
    over = {
        "auth.client_auth": "client_credentials",
        "auth.token_url": fake.token_url,
        "auth.token_scope": "introspection",
        "auth.cache_ttl": 0,
    }
    async with gateway(fake, "strict", **over) as h:
        for _ in range(3):
            assert status(await handshake(h, h.token("alice"))) == 101
        assert fake.service_tokens == ["service-token-1"]  # one token for all three calls
        await trio.sleep(110)  # past 120 s less a tenth: renewed before it expires
        assert status(await handshake(h, h.token("alice"))) == 101
        assert fake.service_tokens == ["service-token-1", "service-token-2"]
    assert fake.seen_authorization == ["Bearer service-token-1"] * 3 + ["Bearer service-token-2"]


async def test_a_refusal_is_a_configuration_problem_not_an_outage(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong client secret: 503 with a long Retry-After for clients, one clear log line for
    the operator, /readyz and /metrics say so, and the breaker never opens."""
    fake = FakeAuthService()
    fake.mode = "refuse"
    caplog.set_level(logging.ERROR, logger="wsgate.auth.introspection")
    async with gateway(fake, "strict", **{"auth.negative_cache_ttl": 0}) as h:
        for _ in range(30):
            refused = await handshake(h, h.token("alice"))
            assert isinstance(refused, ConnectionRejected)
            assert (refused.status_code, retry_after(refused)) == (503, 30)
            assert refused.body == b"auth service refused the gateway's request\n"
        assert h.gateway.breaker.state is BreakerState.CLOSED
        assert fake.calls == 30  # each asked, none retried
        refusal = "HTTP 401 invalid_client: client authentication failed"
        # (In the harness nothing listens on TCP, so "not listening" is there too.)
        assert f"auth service refuses the gateway's requests: {refusal}" in h.gateway.readiness_problems()
        assert 'wsgate_auth_answers_total{class="refused"} 30.0' in h.gateway.metrics.exposition().decode()
        fake.mode = "up"  # the operator fixes the secret
        assert status(await handshake(h, h.token("alice"))) == 101
        assert h.gateway.readiness_problems() == ["not listening"]
    lines = [r.getMessage() for r in caplog.records if r.name == "wsgate.auth.introspection"]
    assert len(lines) == 1  # not one per handshake
    assert "HTTP 401 invalid_client: client authentication failed" in lines[0]
    assert "auth.client_secret" in lines[0]


async def test_under_tolerant_a_refusal_admits_degraded(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    fake.mode = "refuse"
    async with gateway(fake, "tolerant") as h:
        ready = await handshake(h, h.token("alice"))
        assert isinstance(ready, dict) and ready["degraded"] is True


async def test_a_slow_provider_that_answers_in_time_does_not_open_the_breaker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PBKDF2 on every call: 0.7 s, under the 1 s call deadline. Before, 0.5 s counted as slow."""
    fake = FakeAuthService()
    fake.latency = 0.7
    async with gateway(fake, "strict", **{"auth.cache_ttl": 0}) as h:
        for i in range(25):
            assert status(await handshake(h, h.token(f"u{i}"))) == 101
        assert h.gateway.breaker.state is BreakerState.CLOSED


async def test_the_breaker_says_why_it_opened(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeAuthService()
    fake.mode = "error"
    caplog.set_level(logging.WARNING, logger="wsgate.breaker")
    async with gateway(fake, "strict", **{"auth.retries": 0}) as h:
        for i in range(10):
            await handshake(h, h.token(f"u{i}"))
        assert h.gateway.breaker.state is BreakerState.OPEN
    opened = [r.getMessage() for r in caplog.records if "-> open" in r.getMessage()]
    assert opened == ["auth service breaker closed -> open: failure rate 10/10 >= 0.5"]


@pytest.mark.parametrize("where", ["openid", "rfc8414"])
async def test_discovery_finds_the_introspection_endpoint(
    autojump_clock: trio.testing.MockClock, where: str
) -> None:
    fake = FakeAuthService(issuer="http://auth.test")
    fake.advertise = where
    settings = settings_for_tests(
        **{
            "auth.issuer": fake.issuer,
            "auth.discovery": True,
            "auth.policy": "strict",
            "auth.client_id": "wsgate",
            "auth.client_secret": "client-secret",
        }
    )
    async with fake.httpx_client() as http, open_harness(settings, http=http) as h:
        await trio.sleep(1)
        assert h.gateway.auth.introspection is not None
        assert h.gateway.auth.introspection.url == fake.introspection_url
        assert h.gateway.auth.introspection.client_auth.token_url == fake.token_url
        assert status(await handshake(h, h.token("alice", iss=fake.issuer))) == 101
        fake.inactive_tokens.add(revoked := h.token("alice", iss=fake.issuer, jti="gone"))
        assert status(await handshake(h, revoked)) == 401  # the discovered endpoint was asked
    assert fake.calls == 2


async def test_discovery_without_credentials_stays_jwt_only(autojump_clock: trio.testing.MockClock) -> None:
    """Some providers refuse to introspect their own JWTs: without credentials configured, an
    advertised endpoint is not used, and no handshake depends on it."""
    fake = FakeAuthService(issuer="http://auth.test")
    fake.advertise = "openid"
    settings = settings_for_tests(
        **{"auth.issuer": fake.issuer, "auth.discovery": True, "auth.policy": "strict"}
    )
    async with fake.httpx_client() as http, open_harness(settings, http=http) as h:
        assert h.gateway.auth.introspection is None
        assert status(await handshake(h, h.token("alice", iss=fake.issuer))) == 101
    assert fake.calls == 0


async def test_a_degraded_session_is_told_when_it_is_restored(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeAuthService()
    fake.mode = "down"
    async with gateway(fake, "tolerant") as h, h.connect(h.token("alice")) as client:
        assert (await client.receive_json())["degraded"] is True
        fake.mode = "up"
        restored = await client.receive_json()  # re-checked once the service answers again
        assert (restored["type"], restored["degraded"]) == ("session.restored", False)
        (session,) = h.gateway.registry.sessions_of((None, "alice"))
        assert session.degraded is False
