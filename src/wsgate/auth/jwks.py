"""Keys from a JWKS URL or OIDC discovery, kept fresh in the background.

A token with an unknown ``kid`` makes the key set be fetched again at once
(one fetch at a time, awaited within the handshake's deadline), so a key the
provider has just rotated in is accepted on its first handshake. Such fetches
happen at most once per ``auth.jwks_min_refetch_interval``, so garbage
kids cannot make us hammer the provider: a flood of random kids costs one
fetch per interval. A kid that the freshest key set lacks is refused (401);
one that could not be checked (a fetch refused by that limit, or failed) is
answered 503 with ``Retry-After``: the token may well be valid.

Discovery reads the provider's OpenID configuration for ``jwks_uri`` and, when
there, ``introspection_endpoint`` and ``token_endpoint``; where it has no
introspection endpoint it tries the RFC 8414 authorization-server metadata.

Symmetric (``oct``) keys from a key set are never used, and ``jku``/``x5u``
in tokens are never followed (the verifier refuses them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import trio

from ..config import AuthSettings
from .keys import VerificationKey

log = logging.getLogger("wsgate.auth.jwks")


class KeySetError(Exception):
    pass


def keys_from_jwks(document: Any) -> list[VerificationKey]:
    """Signing keys of a JWKS document, each bound to its one algorithm."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySetError("not a JWKS document")
    keys = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") == "oct":
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        algorithm = jwk.algorithm_name
        if algorithm.upper().startswith("HS") or algorithm.lower() == "none":
            continue
        keys.append(VerificationKey(jwk.key, frozenset({algorithm}), jwk.key_id))
    return keys


MAX_ABSENT_KIDS = 10_000  # kids remembered as absent from the current key set


def _string(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    return value if isinstance(value, str) and value.startswith(("http://", "https://")) else None


class KeySetSource:
    """Fetches the key set, hands it to ``on_keys``, and refreshes it; with discovery, hands
    the provider's endpoints to ``on_endpoints(introspection_endpoint, token_endpoint)``."""

    def __init__(
        self,
        settings: AuthSettings,
        http: httpx.AsyncClient,
        on_keys: Callable[[list[VerificationKey]], None],
        on_endpoints: Callable[[str | None, str | None], None] | None = None,
    ) -> None:
        self._settings = settings
        self._http = http
        self._on_keys = on_keys
        self._on_endpoints = on_endpoints
        self._jwks_url = settings.jwks_url
        self.loaded = False
        self._last_fetch = -float("inf")
        self._fetching: trio.Event | None = None
        # Kids the current key set was found to lack, and when (Trio time).
        self._absent: dict[str | None, float] = {}
        self.fetches = 0
        self.refused_refetches = 0
        #: Why the last fetch failed (None once one worked), for the start-up report.
        self.last_error: str | None = None

    async def discover(self) -> None:
        """Resolve ``jwks_uri`` (and the introspection and token endpoints) from the issuer's
        OpenID configuration, falling back to RFC 8414 metadata for the endpoints."""
        issuer = self._settings.issuer or ""
        base = issuer.rstrip("/")
        document = await self._get_json(f"{base}/.well-known/openid-configuration")
        if not isinstance(document, dict) or not isinstance(document.get("jwks_uri"), str):
            raise KeySetError("discovery document has no jwks_uri")
        if document.get("issuer") != issuer:
            raise KeySetError("discovery document names another issuer")
        self._jwks_url = document["jwks_uri"]
        introspection, token = (
            _string(document, "introspection_endpoint"),
            _string(document, "token_endpoint"),
        )
        if introspection is None:
            metadata = await self._authorization_server_metadata(issuer)
            introspection = _string(metadata, "introspection_endpoint")
            token = token or _string(metadata, "token_endpoint")
        if self._on_endpoints is not None:
            self._on_endpoints(introspection, token)

    async def _authorization_server_metadata(self, issuer: str) -> dict[str, Any]:
        """RFC 8414 metadata: under the issuer (the common form), else at the origin with
        the issuer's path appended (the RFC's form); empty when neither answers."""
        parts = urlsplit(issuer)
        path = parts.path.rstrip("/")
        candidates = [f"{issuer.rstrip('/')}/.well-known/oauth-authorization-server"]
        if path:
            candidates.append(f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}")
        for url in candidates:
            try:
                document = await self._get_json(url)
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(document, dict) and document.get("issuer") == issuer:
                return document
        return {}

    async def refresh(self, *, quiet: bool = False) -> bool:
        """Fetch the key set now (one fetch at a time); True when it loaded. ``quiet``: do not
        log a failure (the caller reports :attr:`last_error` itself)."""
        if self._fetching is not None:
            await self._fetching.wait()
            return self.loaded
        self._fetching = trio.Event()
        self._last_fetch = trio.current_time()
        try:
            if self._jwks_url is None:
                await self.discover()
            assert self._jwks_url is not None
            keys = keys_from_jwks(await self._get_json(self._jwks_url))
            self.fetches += 1
            self._on_keys(keys)
            self._absent.clear()
            self.loaded = True
            self.last_error = None
            log.info("key set loaded", extra={"event": "jwks.loaded", "outcome": f"{len(keys)} keys"})
        except (KeySetError, httpx.HTTPError, ValueError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                self.last_error = f"no answer within auth.call_timeout, {self._settings.call_timeout:g} s"
            else:
                self.last_error = str(exc) if isinstance(exc, KeySetError) else type(exc).__name__
            if not quiet:
                log.warning("key set fetch failed: %s", self.last_error, extra={"event": "jwks.failed"})
        finally:
            self._fetching.set()
            self._fetching = None
        return self.loaded

    async def on_unknown_kid(self, kid: str | None) -> float | None:
        """A token names ``kid``, which the keys in hand lack. Bring the key set up to date
        if that may be done now; returns None when the keys in hand are the ones to judge
        the token by (fetched just now, or already found to lack ``kid``), else the seconds
        after which the key set can be fetched again (the token cannot be judged now)."""
        interval = self._settings.jwks_min_refetch_interval
        if trio.current_time() - self._absent.get(kid, -float("inf")) < interval:
            return None
        if self._fetching is not None:  # a fetch under way: its answer is ours too
            await self._fetching.wait()
            return None if self.loaded else interval
        wait = self._last_fetch + interval - trio.current_time()
        if wait > 0:
            self.refused_refetches += 1
            return wait
        with trio.move_on_after(self._settings.deadline):
            fetches = self.fetches
            await self.refresh()
            if self.fetches > fetches:
                return None
        return interval

    def confirm_absent(self, kid: str | None) -> None:
        """The current key set was searched for ``kid`` and lacks it: refuse it (401) without
        another fetch for ``auth.jwks_min_refetch_interval``, or until the key set is fetched."""
        if len(self._absent) >= MAX_ABSENT_KIDS:
            self._absent.clear()
        self._absent[kid] = trio.current_time()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load once before reporting started (so a gateway listens with its keys when the
        provider answers; if it does not, within ``auth.deadline`` x 2, the gateway starts
        not ready), retrying with a capped backoff until it works; then refresh periodically."""
        delay = 1.0
        first = True
        while True:
            with trio.move_on_after(self._settings.deadline * 2) as waited:
                await self.refresh(quiet=first)
            if waited.cancelled_caught:
                self.last_error = "timed out"
            first = False
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            delay = self._settings.jwks_refresh_interval if self.loaded else min(delay * 2, 60.0)
            await trio.sleep(delay)

    async def _get_json(self, url: str) -> Any:
        with trio.fail_after(self._settings.call_timeout):
            response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        return response.json()
