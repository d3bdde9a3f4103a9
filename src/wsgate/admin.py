"""The admin listener: server push, revocation and health, for operators and backends.

Bound to 127.0.0.1 by default. ``/healthz``, ``/readyz``, ``/metrics``,
``/auth/check`` (why a token would be refused: what a browser cannot learn
from a refused handshake), the browser client ``/client/wsgate.js`` and the
``/demo`` page are open (``/demo/token``
mints dev tokens in dev mode only); ``/publish`` and ``/revoke`` need
``Authorization: Bearer <admin.api_key>``.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from .auth.devkey import DevTokens
from .cluster.broker import Audience
from .fanout import audience_of_request, events_of_request
from .httpserver import Request, Response
from .metrics import Metrics
from .protocol import loads_strict


class Operated(Protocol):
    """What the admin listener asks of the gateway (``Gateway`` is one)."""

    dev_tokens: DevTokens | None
    metrics: Metrics

    def readiness_problems(self) -> list[str]: ...

    def readiness_detail(self) -> dict[str, Any]: ...

    def public_url(self) -> str: ...

    async def check_token(self, token: str) -> dict[str, Any]: ...

    async def push(self, audience: Audience, events: list[dict[str, Any]]) -> dict[str, Any]: ...

    async def revoke_everywhere(
        self, *, jti: str | None = None, subject: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]: ...


DEMO_PAGE = (resources.files("wsgate") / "static" / "demo.html").read_bytes()
#: The browser client (an ES module), also in the package as ``wsgate/static/wsgate.js``.
CLIENT_JS = (resources.files("wsgate") / "static" / "wsgate.js").read_bytes()


def _json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode())


class AdminApp:
    def __init__(self, gateway: Operated, api_key: str | None) -> None:
        self._gateway = gateway
        self._key = api_key.encode() if api_key else None

    async def handle(self, request: Request) -> Response:
        path = urlsplit(request.target).path
        if path == "/healthz" and request.method == "GET":
            return _json(200, {"status": "ok"})
        if path == "/readyz" and request.method == "GET":
            problems = self._gateway.readiness_problems()
            body = {"ready": not problems, "problems": problems, **self._gateway.readiness_detail()}
            return _json(503 if problems else 200, body)
        if path == "/demo" and request.method == "GET":
            return Response(200, DEMO_PAGE, content_type="text/html; charset=utf-8")
        if path == "/client/wsgate.js" and request.method == "GET":
            return Response(200, CLIENT_JS, content_type="text/javascript; charset=utf-8")
        if path == "/demo/config" and request.method == "GET":
            return _json(
                200, {"url": self._gateway.public_url(), "dev": self._gateway.dev_tokens is not None}
            )
        if path == "/demo/token" and request.method == "POST":
            dev_tokens = self._gateway.dev_tokens
            if dev_tokens is None:
                return _json(404, {"error": "dev tokens exist only in dev mode"})
            return self._demo_token(dev_tokens, request)
        if path == "/auth/check" and request.method == "POST":
            return await self._check(request)
        if path == "/metrics" and request.method == "GET":
            return Response(200, self._gateway.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
        if path not in ("/publish", "/revoke"):
            return _json(404, {"error": "not found"})
        if request.method != "POST":
            return Response(405, b'{"error":"method not allowed"}', headers=(("allow", "POST"),))
        if not self._authorized(request):
            return Response(
                401, b'{"error":"admin api key required"}', headers=(("www-authenticate", "Bearer"),)
            )
        try:
            body = loads_strict(request.body.decode())
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            return await (self._publish(body) if path == "/publish" else self._revoke(body))
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": str(exc)})
        except RecursionError:
            return _json(400, {"error": "JSON nested too deeply"})

    def _demo_token(self, dev_tokens: DevTokens, request: Request) -> Response:
        """A dev token for ``{"sub", "tenant"}`` in the body (default: a demo user)."""
        try:
            body = loads_strict(request.body.decode() or "{}")
        except (ValueError, RecursionError):
            return _json(400, {"error": "the body must be a JSON object"})
        subject = body.get("sub") if isinstance(body, dict) else None
        tenant = body.get("tenant") if isinstance(body, dict) else None
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            subject = "demo-user"
        claims: dict[str, Any] = {"tenant": tenant} if isinstance(tenant, str) and tenant else {}
        return _json(200, {"token": dev_tokens.mint(subject, ttl=300, **claims)})

    async def _check(self, request: Request) -> Response:
        """Whether the token in ``Authorization: Bearer`` would be admitted now, and if not,
        the status and reason the handshake answers with (nothing more)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _json(400, {"error": "send the token as Authorization: Bearer <token>"})
        answer = await self._gateway.check_token(token.strip())
        return _json(200, answer)

    def _authorized(self, request: Request) -> bool:
        if self._key is None:
            return False
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._key)

    async def _publish(self, body: dict[str, Any]) -> Response:
        audience, events = audience_of_request(body), events_of_request(body)
        return _json(200, await self._gateway.push(audience, events))

    async def _revoke(self, body: dict[str, Any]) -> Response:
        jti, subject, tenant = body.get("jti"), body.get("subject"), body.get("tenant")
        if (jti is None) == (subject is None):
            raise ValueError("give exactly one of 'jti' and 'subject'")
        if not isinstance(jti or subject, str):
            raise ValueError("'jti' or 'subject' must be a string")
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError("'tenant' must be a string")
        return _json(200, await self._gateway.revoke_everywhere(jti=jti, subject=subject, tenant=tenant))
