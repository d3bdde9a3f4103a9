"""Talking to the identity provider: how the gateway authenticates, and what an answer means.

Client authentication (``auth.client_auth``), RFC 6749 section 2.3.1:

- ``basic``: ``Authorization: Basic`` of the client id and secret, each
  form-encoded first (a secret with ``+``, ``%`` or ``:`` must be);
- ``post``: ``client_id`` and ``client_secret`` in the form body;
- ``bearer``: ``auth.client_secret`` sent as a bearer token;
- ``client_credentials``: a bearer token the gateway obtains itself from the
  token endpoint with the client-credentials grant (authenticated with
  ``basic``) and renews before it expires;
- ``none``.

Every answer is one of: an answer to use (200 with JSON), a *failure* of the
service (unreachable, too slow, 5xx, 429: retried, and counted by the
breaker), or a *refusal* of our request (any other status, or a 200 that is
not the JSON asked for): the service is up and our configuration is wrong.
A refusal is not retried, does not count toward opening the breaker, and
carries the provider's ``error`` and ``error_description`` for the log.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote_plus

import httpx
import trio

from ..config import AuthSettings


class ProviderFailed(Exception):
    """The service did not answer usefully in time: an outage, for the breaker."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProviderRefused(Exception):
    """The service answered and refused our request: our configuration, not an outage."""

    def __init__(self, status: int, error: str | None = None, description: str | None = None) -> None:
        self.status = status
        self.error = error
        self.description = description
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        """``HTTP 401 invalid_client: the secret is wrong``, safe to log."""
        text = f"HTTP {self.status}"
        if self.error:
            text += f" {self.error}"
        if self.description:
            text += f": {self.description}"
        return text


def _safe(value: Any) -> str | None:
    """A provider's ``error`` field as printable ASCII, bounded, or None."""
    if not isinstance(value, str):
        return None
    return value.encode("ascii", "backslashreplace").decode()[:200] or None


def json_answer(response: httpx.Response) -> Any:
    """The JSON of a 200, or raise :class:`ProviderFailed` / :class:`ProviderRefused`."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise ProviderFailed(f"HTTP {status}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if status != 200:
        error = body if isinstance(body, dict) else {}
        raise ProviderRefused(status, _safe(error.get("error")), _safe(error.get("error_description")))
    if body is None:
        raise ProviderRefused(status, "not_json", "the answer is not JSON")
    return body


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` value of RFC 6749 section 2.3.1: each part form-encoded, then base64."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


class ClientAuth:
    """Adds the gateway's client authentication to one request to the provider."""

    def __init__(self, settings: AuthSettings, http: httpx.AsyncClient) -> None:
        self._method = settings.client_auth
        self._client_id = settings.client_id or ""
        self._secret = settings.client_secret or ""
        self._scope = settings.token_scope
        self._http = http
        #: The token endpoint for ``client_credentials``: set, or found by discovery.
        self.token_url = settings.token_url
        self._token: str | None = None
        self._token_until = -float("inf")  # Trio time
        self._fetching = trio.Lock()
        self.tokens_fetched = 0

    async def apply(self, data: dict[str, str], headers: dict[str, str]) -> None:
        """Add credentials to the form ``data`` and ``headers``; for ``client_credentials``
        this may first fetch a token (raises :class:`ProviderFailed` or :class:`ProviderRefused`)."""
        method = self._method
        if method == "basic":
            headers["Authorization"] = basic_credentials(self._client_id, self._secret)
        elif method == "post":
            data["client_id"] = self._client_id
            data["client_secret"] = self._secret
        elif method == "bearer":
            headers["Authorization"] = f"Bearer {self._secret}"
        elif method == "client_credentials":
            headers["Authorization"] = f"Bearer {await self._service_token()}"

    def forget(self) -> None:
        """Drop the service token (the provider refused it): the next call fetches a new one."""
        self._token = None

    async def _service_token(self) -> str:
        async with self._fetching:  # one fetch at a time; the others use what it got
            if self._token is not None and trio.current_time() < self._token_until:
                return self._token
            if self.token_url is None:
                raise ProviderFailed("token endpoint not known yet (discovery)")
            data = {"grant_type": "client_credentials"}
            if self._scope:
                data["scope"] = self._scope
            try:
                response = await self._http.post(
                    self.token_url,
                    data=data,
                    headers={
                        "Accept": "application/json",
                        "Authorization": basic_credentials(self._client_id, self._secret),
                    },
                )
            except httpx.TransportError as exc:
                raise ProviderFailed(f"token endpoint unreachable ({type(exc).__name__})") from None
            body = json_answer(response)
            token = body.get("access_token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise ProviderRefused(response.status_code, "no_access_token", "the token answer has none")
            lifetime = body.get("expires_in")
            lifetime = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else 300.0
            # Renewed ahead of expiry: a tenth of its life, at most a minute.
            self._token_until = trio.current_time() + lifetime - min(60.0, lifetime / 10)
            self._token = token
            self.tokens_fetched += 1
            return token
