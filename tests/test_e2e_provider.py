"""wsgate against a real identity provider: django-oauth-toolkit, run by the tests as its own
process on 127.0.0.1 (``tests/idp_server.py``), with the ``websockets`` client over real sockets.

The gateway finds everything through discovery: the JWKS from the OpenID configuration,
the introspection endpoint from the RFC 8414 metadata (the provider's OpenID document
has none). Access tokens are the provider's own RS256 JWTs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import Server, recv, start_process, start_server, stop
from idp_server import CHAT_SECRET, PASSWORD, WSGATE_SECRET

pytestmark = pytest.mark.slow
IDP_SCRIPT = Path(__file__).with_name("idp_server.py")
ADMIN_KEY = "provider-tests-admin-key"


def new_key(path: Path) -> Path:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@dataclass
class Provider:
    proc: subprocess.Popen[str]
    url: str

    @property
    def issuer(self) -> str:
        return f"{self.url}/o"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def token(self, user: str = "alice", scope: str = "read") -> str:
        """A user's access token, from the provider's token endpoint (password grant)."""
        response = httpx.post(
            f"{self.issuer}/token/",
            data={"grant_type": "password", "username": user, "password": PASSWORD, "scope": scope},
            auth=("chat", CHAT_SECRET),
            timeout=30,
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def revoke(self, token: str) -> None:
        """RFC 7009 revocation at the provider."""
        response = httpx.post(
            f"{self.issuer}/revoke_token/", data={"token": token}, auth=("chat", CHAT_SECRET), timeout=30
        )
        assert response.status_code == 200

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_provider(root: Path, key: Path, *more: str, port: int = 0) -> Provider:
    proc, match = start_process(
        [sys.executable, str(IDP_SCRIPT), "--db", str(root / "idp.sqlite3"), "--key", str(key),
         "--port", str(port), *more],
        r"listening on (http://\S+)",
        what="the identity provider",
    )  # fmt: skip
    return Provider(proc, match.group(1))


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    root = tmp_path_factory.mktemp("idp")
    running = start_provider(root, new_key(root / "key.pem"))
    yield running
    running.stop()


def start_gateway(root: Path, provider: Provider, **auth: Any) -> Server:
    settings = {
        "issuer": provider.issuer,
        "audience": "wsgate",
        "discovery": True,
        "policy": "strict",
        "client_id": "wsgate",
        "client_secret": WSGATE_SECRET,
        "call_timeout": 3,
        "deadline": 4,
        **auth,
    }
    lines = ["[server]", "handshake_timeout = 10", "[auth]"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in settings.items()]
    (root / "wsgate.toml").write_text("\n".join(lines) + "\n")
    return start_server(
        root,
        "--config",
        str(root / "wsgate.toml"),
        "--admin-port",
        "0",
        env={"WSGATE_ADMIN__API_KEY": ADMIN_KEY, "WSGATE_AGENT__STEP_DELAY": "0.01"},
    )


def admitted(url: str, token: str) -> tuple[int, dict[str, str], dict[str, Any] | None]:
    """(101, {}, session.ready) or (status, headers, None) for one handshake."""

    async def attempt() -> tuple[int, dict[str, str], dict[str, Any] | None]:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                return 101, {}, await recv(ws)
        except websockets.InvalidStatus as refused:
            response = refused.response
            return response.status_code, {k.lower(): v for k, v in response.headers.raw_items()}, None

    return asyncio.run(attempt())


def metric(server: Server, name: str) -> str:
    text = httpx.get(f"{server.admin}/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("client_auth", ["basic", "post", "client_credentials"])
def test_golden_path_with_a_provider_token(provider: Provider, tmp_path: Path, client_auth: str) -> None:
    """Each client authentication method, with a secret holding + % : and a space."""
    extra = {"token_scope": "introspection"} if client_auth == "client_credentials" else {}
    gateway = start_gateway(tmp_path, provider, client_auth=client_auth, **extra)
    try:

        async def golden() -> list[dict[str, Any]]:
            headers = {"Authorization": f"Bearer {provider.token('alice')}"}
            async with websockets.connect(gateway.url, additional_headers=headers) as ws:
                ready = await recv(ws)
                assert (ready["subject"], ready["degraded"]) == ("alice", False)
                await ws.send(json.dumps({"type": "user_message", "text": "hi"}))
                return [await recv(ws) for _ in range(5)]

        events = asyncio.run(golden())
        assert events[-1]["type"] == "agent_completed" and events[-1]["status"] == "ok"
        assert 'wsgate_auth_answers_total{class="active"} 1.0' in metric(gateway, "wsgate_auth_answers")
        assert httpx.get(f"{gateway.admin}/readyz", timeout=10).status_code == 200
    finally:
        stop(gateway)


def test_another_audience_is_refused(provider: Provider, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, provider)
    try:
        status, headers, _ = admitted(gateway.url, provider.token("alice", scope="read other-audience"))
        assert status == 401 and headers["www-authenticate"] == 'Bearer error="invalid_token"'
    finally:
        stop(gateway)


def test_revocation_at_the_provider_ends_the_session_and_refuses_the_token(
    provider: Provider, tmp_path: Path
) -> None:
    """RFC 7009 revocation: the live session is closed 4403 within auth.revalidate_interval,
    and the token is refused at the handshake within auth.cache_ttl."""
    gateway = start_gateway(tmp_path, provider, revalidate_interval=2, cache_ttl=1)
    token = provider.token("bob")
    try:

        async def scenario() -> tuple[float, int]:
            async with websockets.connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                await recv(ws)
                await asyncio.to_thread(provider.revoke, token)
                revoked_at = time.monotonic()
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    async with asyncio.timeout(10):
                        while True:
                            await ws.recv()
                assert closed.value.rcvd is not None
                return time.monotonic() - revoked_at, closed.value.rcvd.code

        took, code = asyncio.run(scenario())
        assert code == 4403 and took <= 2 + 1.5
        # The re-check that closed it asked the provider afresh: no cached "active" is left.
        status, _, _ = admitted(gateway.url, token)
        assert status == 401
    finally:
        stop(gateway)


def test_a_wrong_client_secret_is_an_operator_error_not_an_outage(provider: Provider, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, provider, client_secret="not-the-secret", negative_cache_ttl=0)
    try:
        for _ in range(12):  # more than breaker.min_calls
            status, headers, _ = admitted(gateway.url, provider.token("alice"))
            assert (status, headers["retry-after"]) == (503, "30")
        assert metric(gateway, "wsgate_breaker_state ") == "wsgate_breaker_state 0.0"  # still closed
        ready = httpx.get(f"{gateway.admin}/readyz", timeout=10)
        assert ready.status_code == 503
        assert "auth service refuses the gateway's requests: HTTP 403" in " ".join(ready.json()["problems"])
    finally:
        logs = stop(gateway)
    refusals = [line for line in logs.splitlines() if "refused the gateway's introspection request" in line]
    assert len(refusals) == 1 and "HTTP 403" in refusals[0] and "auth.client_secret" in refusals[0]


def test_in_band_refresh_with_a_fresh_provider_token(provider: Provider, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, provider)
    try:

        async def scenario() -> dict[str, Any]:
            first = provider.token("alice")
            async with websockets.connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {first}"}
            ) as ws:
                ready = await recv(ws)
                fresh = await asyncio.to_thread(provider.token, "alice")
                await ws.send(json.dumps({"type": "auth.refresh", "token": fresh}))
                refreshed = await recv(ws)
                assert refreshed["expires_at"] >= ready["expires_at"]
                return refreshed

        assert asyncio.run(scenario())["type"] == "auth.refreshed"
    finally:
        stop(gateway)


def test_provider_down_and_back_with_a_rotated_key(tmp_path: Path) -> None:
    """The provider is killed and restarted, with a new signing key (the old one still
    published): strict answers 503 + Retry-After while it is down, then admits; tolerant
    admits degraded, then sends session.restored; a token signed by the new key is admitted
    on its first handshake. Client secrets are checked with PBKDF2 here, as in production:
    a provider that slow, but answering in time, does not open the breaker."""
    old_key = new_key(tmp_path / "old.pem")
    running = start_provider(tmp_path, old_key, "--slow-hasher")
    port = running.port
    (tmp_path / "strict").mkdir()
    (tmp_path / "tolerant").mkdir()
    strict = start_gateway(tmp_path / "strict", running)
    tolerant = start_gateway(tmp_path / "tolerant", running, policy="tolerant", revalidate_interval=300)
    try:
        before = running.token("alice")
        unchecked = running.token("alice")  # never shown to a gateway before the outage
        for _ in range(12):  # PBKDF2 on every introspection call: slow, not failing
            assert admitted(strict.url, running.token("alice"))[0] == 101
        assert metric(strict, "wsgate_breaker_state ") == "wsgate_breaker_state 0.0"

        async def degraded_then_restored() -> list[dict[str, Any]]:
            nonlocal running
            headers = {"Authorization": f"Bearer {before}"}
            async with websockets.connect(tolerant.url, additional_headers=headers) as up:
                seen = [await recv(up)]  # admitted while the provider is up
                await asyncio.to_thread(running.stop)
                fresh = {"Authorization": f"Bearer {unchecked}"}  # (not cached: the service is asked)
                async with websockets.connect(tolerant.url, additional_headers=fresh) as down:
                    seen.append(await recv(down))  # tolerant, provider down: degraded
                    seen.append({"strict": await asyncio.to_thread(admitted, strict.url, unchecked)})
                    new = new_key(tmp_path / "new.pem")
                    running = await asyncio.to_thread(
                        start_provider,
                        tmp_path,
                        new,
                        "--slow-hasher",
                        "--inactive-key",
                        str(old_key),
                        port=port,
                    )
                    async with asyncio.timeout(30):  # re-checked once the provider answers again
                        while (message := json.loads(await down.recv()))["type"] != "session.restored":
                            pass
                    seen.append(message)
            return seen

        ready, down, strict_down, restored = asyncio.run(degraded_then_restored())
        assert ready["degraded"] is False  # the first connection came while the provider was up
        assert down["degraded"] is True
        status, headers, _ = strict_down["strict"]
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert restored == {"type": "session.restored", "degraded": False, "seq": restored["seq"]}
        rotated = running.token("alice")
        header = json.loads(base64.urlsafe_b64decode(rotated.split(".")[0] + "=="))
        assert header["kid"] != json.loads(base64.urlsafe_b64decode(before.split(".")[0] + "=="))["kid"]

        async def strict_admits_again() -> list[int]:
            # The outage opened strict's breaker: it answers 503 with a Retry-After until it
            # lets a call through; the new key's token is taken on its first real check.
            statuses = []
            for _ in range(10):
                status, headers, _ = await asyncio.to_thread(admitted, strict.url, rotated)
                statuses.append(status)
                if status != 503:
                    break
                await asyncio.sleep(int(headers["retry-after"]))
            return statuses

        statuses = asyncio.run(strict_admits_again())
        assert statuses[-1] == 101 and set(statuses[:-1]) <= {503}
    finally:
        running.stop()
        stop(strict)
        stop(tolerant)
