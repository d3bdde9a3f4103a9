"""Keys from a JWKS URL or OIDC discovery, kept fresh in the background.

An unknown ``kid`` triggers a re-fetch at most once per
``auth.jwks_min_refetch_interval``, so garbage ``kid``s cannot make us hammer
the key server. Symmetric (``oct``) keys from a key set are never used, and
``jku``/``x5u`` in tokens are never followed (the verifier refuses them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import trio

from .config import AuthSettings
from .tokens import VerificationKey

log = logging.getLogger("wsgate.jwks")


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


class KeySetSource:
    """Fetches the key set, hands it to ``on_keys``, and refreshes it."""

    def __init__(
        self,
        settings: AuthSettings,
        http: httpx.AsyncClient,
        on_keys: Callable[[list[VerificationKey]], None],
    ) -> None:
        self._settings = settings
        self._http = http
        self._on_keys = on_keys
        self._jwks_url = settings.jwks_url
        self.loaded = False
        self._last_fetch = -float("inf")
        self._fetching: trio.Event | None = None
        self.fetches = 0

    async def discover(self) -> None:
        """Resolve ``jwks_uri`` from the issuer's OIDC discovery document."""
        issuer = (self._settings.issuer or "").rstrip("/")
        document = await self._get_json(f"{issuer}/.well-known/openid-configuration")
        if not isinstance(document, dict) or not isinstance(document.get("jwks_uri"), str):
            raise KeySetError("discovery document has no jwks_uri")
        if document.get("issuer") != self._settings.issuer:
            raise KeySetError("discovery document names another issuer")
        self._jwks_url = document["jwks_uri"]

    async def refresh(self) -> bool:
        """Fetch the key set now (one fetch at a time); True when it loaded."""
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
            self.loaded = True
            log.info("key set loaded", extra={"event": "jwks.loaded", "outcome": f"{len(keys)} keys"})
        except (KeySetError, httpx.HTTPError, ValueError, trio.TooSlowError) as exc:
            log.warning("key set fetch failed: %s", type(exc).__name__, extra={"event": "jwks.failed"})
        finally:
            self._fetching.set()
            self._fetching = None
        return self.loaded

    async def on_unknown_kid(self) -> bool:
        """Re-fetch for an unknown ``kid`` unless we fetched recently; True if re-fetched."""
        if trio.current_time() - self._last_fetch < self._settings.jwks_min_refetch_interval:
            return False
        with trio.move_on_after(self._settings.deadline):
            return await self.refresh()
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load once (retrying with a capped backoff until it works), then refresh periodically."""
        task_status.started()
        delay = 1.0
        while True:
            with trio.move_on_after(self._settings.deadline * 2):
                await self.refresh()
            delay = self._settings.jwks_refresh_interval if self.loaded else min(delay * 2, 60.0)
            await trio.sleep(delay)

    async def _get_json(self, url: str) -> Any:
        with trio.fail_after(self._settings.call_timeout):
            response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        return response.json()
