"""A scriptable auth service for tests: RFC 7662 introspection, JWKS and discovery.

Use it in-process (``httpx_client()``, so ``MockClock`` drives its latency) or
as a real HTTP server on 127.0.0.1 (``serve``, built on h11). Script it with
``mode`` (``up``, ``down``, ``error``, ``hang``, ``refuse``: a 401
``invalid_client`` as for a wrong client secret), ``latency``, a ``script`` of
modes for the next calls (flapping), and the sets of inactive tokens and
revoked subjects. It also issues client-credentials tokens at ``/token``
(``require_service_token`` makes introspection accept only those), and
advertises its introspection endpoint in its OpenID configuration or its
RFC 8414 metadata as ``advertise`` says.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import trio

from ..httpserver import Request, Response, serve_http

MODES = ("up", "down", "error", "hang", "refuse")


def _claims(token: str) -> dict[str, Any]:
    """The token's payload, unverified: the fake trusts whatever it is shown."""
    try:
        segment = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


class FakeAuthService:
    def __init__(self, *, issuer: str = "https://issuer.test", base_url: str = "http://auth.test") -> None:
        self.issuer = issuer
        self.base_url = base_url
        self.mode = "up"
        self.latency = 0.0
        self.script: deque[str] = deque()
        self.inactive_tokens: set[str] = set()
        self.revoked_subjects: set[str] = set()
        self.jwks: dict[str, Any] = {"keys": []}
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.jwks_fetches = 0
        self.seen_authorization: list[str | None] = []
        self.seen_forms: list[dict[str, str]] = []
        #: Where the introspection endpoint is advertised: "openid", "rfc8414" or "nowhere".
        self.advertise = "nowhere"
        self.service_token_ttl = 120
        self.service_tokens: list[str] = []
        self.require_service_token = False
        self._call_arrived = trio.Event()

    async def wait_for_calls(self, count: int) -> None:
        """Return once ``count`` introspection calls have arrived in all (no polling)."""
        while self.calls < count:
            await self._call_arrived.wait()
            self._call_arrived = trio.Event()

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    def httpx_client(self) -> httpx.AsyncClient:
        """An HTTP client whose requests this fake answers in-process."""
        return httpx.AsyncClient(transport=httpx.MockTransport(self._mock_handler))

    async def _mock_handler(self, request: httpx.Request) -> httpx.Response:
        answer = await self.respond(
            request.method, request.url.path, dict(request.headers), await request.aread()
        )
        if answer is None:
            raise httpx.ConnectError("auth service down", request=request)
        status, body = answer
        return httpx.Response(status, json=body)

    async def respond(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any] | None:
        """The answer to one request, or None to drop the connection."""
        if path == "/_control":
            return self._control(method, body)
        if path == "/.well-known/openid-configuration":
            document = {"issuer": self.issuer, "jwks_uri": self.jwks_url}
            if self.advertise == "openid":
                document |= {
                    "introspection_endpoint": self.introspection_url,
                    "token_endpoint": self.token_url,
                }
            return 200, document
        if path == "/.well-known/oauth-authorization-server" and self.advertise == "rfc8414":
            return 200, {
                "issuer": self.issuer,
                "introspection_endpoint": self.introspection_url,
                "token_endpoint": self.token_url,
            }
        if path == "/jwks":
            self.jwks_fetches += 1
            return 200, self.jwks
        if path == "/token" and method == "POST":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            if form.get("grant_type") != "client_credentials":
                return 400, {"error": "unsupported_grant_type"}
            token = f"service-token-{len(self.service_tokens) + 1}"
            self.service_tokens.append(token)
            return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.service_token_ttl}
        if path != "/introspect" or method != "POST":
            return 404, {"error": "not_found"}
        self.calls += 1
        self._call_arrived.set()
        self.seen_authorization.append(headers.get("authorization"))
        self.seen_forms.append({k: v[0] for k, v in parse_qs(body.decode()).items()})
        mode = self.script.popleft() if self.script else self.mode
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if mode == "hang":
                await trio.sleep_forever()
            if self.latency:
                await trio.sleep(self.latency)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        if mode == "down":
            return None
        if mode == "error":
            return 503, {"error": "unavailable"}
        latest = f"Bearer {self.service_tokens[-1]}" if self.service_tokens else None
        if mode == "refuse" or (self.require_service_token and headers.get("authorization") != latest):
            return 401, {"error": "invalid_client", "error_description": "client authentication failed"}
        token = parse_qs(body.decode()).get("token", [""])[0]
        claims = _claims(token)
        if token in self.inactive_tokens or claims.get("sub") in self.revoked_subjects or not claims:
            return 200, {"active": False}
        return 200, {
            "active": True,
            "sub": claims.get("sub"),
            "exp": claims.get("exp"),
            "scope": claims.get("scope", ""),
            "token_type": "access_token",
        }

    def _control(self, method: str, body: bytes) -> tuple[int, Any]:
        """Script the fake over HTTP (for a fake running in another process)."""
        if method == "POST":
            try:
                change = json.loads(body or b"{}")
                if change.get("mode", self.mode) not in MODES:
                    raise ValueError("unknown mode")
                self.mode = change.get("mode", self.mode)
                self.latency = float(change.get("latency", self.latency))
                self.inactive_tokens.update(change.get("inactive_tokens", []))
                self.revoked_subjects.update(change.get("revoked_subjects", []))
            except (ValueError, TypeError, AttributeError) as exc:
                return 400, {"error": str(exc)}
        return 200, {
            "mode": self.mode,
            "latency": self.latency,
            "calls": self.calls,
            "cancelled": self.cancelled,
        }

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve over real HTTP on ``host``; reports the bound port when started."""

        async def handle(request: Request) -> Response | None:
            answer = await self.respond(
                request.method, urlsplit(request.target).path, request.headers, request.body
            )
            if answer is None:
                return None  # drop the connection: the client sees the service as down
            status, payload = answer
            return Response(status, json.dumps(payload).encode())

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_http, handle, host, port)
            self.base_url = f"http://{host}:{bound}"
            task_status.started(bound)


def main(argv: list[str] | None = None) -> None:
    """``python -m wsgate.testing.fakeauth [--port N]``: serve the fake on 127.0.0.1 until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description="A scriptable fake auth service (tests only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    fake = FakeAuthService()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake.serve, args.host, args.port)
            print(f"fake auth service on http://{args.host}:{port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
