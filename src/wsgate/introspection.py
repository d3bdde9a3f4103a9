"""RFC 7662 token introspection under deadlines, retries, a cache and the breaker.

Each call runs under its own cancel scope (``call_timeout``); retryable failures
(connect errors, timeouts, 5xx, 429) are retried with full-jitter exponential
backoff, all inside one overall ``deadline``. Answers are cached by a hash of
the token, never the token itself; concurrent lookups of one token share one
call, which is cancelled when nobody waits for it any more.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

from .breaker import Outcome
from .breaker_actor import BreakerActor
from .config import AuthSettings
from .tokens import finite_number

log = logging.getLogger("wsgate.introspection")


@attrs.frozen
class TokenInfo:
    """The parts of an introspection answer wsgate uses."""

    active: bool
    subject: str | None = None
    expires_at: float | None = None
    scopes: frozenset[str] | None = None


class ServiceUnavailable(Exception):
    """No answer could be had in time (down, slow, refusing, or the breaker is open)."""

    def __init__(self, reason: str, *, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Retryable(Exception):
    pass


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_answer(body: Any) -> TokenInfo:
    """Read an RFC 7662 JSON answer; raises ValueError when it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
        raise ValueError("not an introspection answer")
    if not body["active"]:
        return TokenInfo(active=False)
    subject = body.get("sub")
    exp = body.get("exp")
    scope = body.get("scope")
    return TokenInfo(
        active=True,
        subject=subject if isinstance(subject, str) else None,
        expires_at=finite_number(exp),
        scopes=frozenset(scope.split()) if isinstance(scope, str) else None,
    )


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        self.waiters = 0
        self.result: TokenInfo | None = None
        self.error: ServiceUnavailable | None = None


class IntrospectionClient:
    def __init__(
        self,
        settings: AuthSettings,
        http: httpx.AsyncClient,
        actor: BreakerActor,
        nursery: trio.Nursery,
        wall_clock: Callable[[], float],
        *,
        rng: random.Random | None = None,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self._observe = observe
        if settings.introspection_url is None:
            raise ValueError("auth.introspection_url is not set")
        self._url = settings.introspection_url
        self._settings = settings
        self._http = http
        self._actor = actor
        self._nursery = nursery
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self._cache: OrderedDict[str, tuple[TokenInfo, float]] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self.stats: Counter[str] = Counter()
        self._auth: httpx.Auth | None = None
        self._headers: dict[str, str] = {"Accept": "application/json"}
        if settings.client_auth == "basic":
            self._auth = httpx.BasicAuth(settings.client_id or "", settings.client_secret or "")
        elif settings.client_auth == "bearer":
            self._headers["Authorization"] = f"Bearer {settings.client_secret}"

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def introspect(self, token: str) -> TokenInfo:
        """The service's answer for ``token``; raises :class:`ServiceUnavailable`."""
        key = token_key(token)
        cached = self._cached(key)
        if cached is not None:
            self.stats["cache.hit"] += 1
            return cached
        flight = self._flights.get(key)
        if flight is None:
            self.stats["cache.miss"] += 1
            flight = self._flights[key] = _Flight()
            self._nursery.start_soon(self._fly, key, token, flight)
        else:
            self.stats["single_flight.joined"] += 1
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.done.is_set():
                flight.scope.cancel()  # nobody wants this answer any more
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    def forget(self, token: str) -> None:
        """Drop a cached answer (e.g. before a re-check that must ask the service)."""
        self._cache.pop(token_key(token), None)

    def _cached(self, key: str) -> TokenInfo | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        info, until = entry
        if trio.current_time() >= until:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return info

    def _store(self, key: str, info: TokenInfo) -> None:
        settings = self._settings
        ttl = settings.cache_ttl if info.active else settings.negative_cache_ttl
        if info.active and info.expires_at is not None:
            ttl = min(ttl, info.expires_at - self._wall())
        if ttl <= 0:
            return
        self._cache[key] = (info, trio.current_time() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > settings.cache_size:
            self._cache.popitem(last=False)

    async def _fly(self, key: str, token: str, flight: _Flight) -> None:
        try:
            with flight.scope:
                flight.result = await self._call_with_retries(token)
                self._store(key, flight.result)
            if flight.scope.cancelled_caught:
                self.stats["call.abandoned"] += 1
                flight.error = ServiceUnavailable("abandoned")
        except ServiceUnavailable as exc:
            flight.error = exc
        except Exception:
            log.exception("introspection failed", extra={"event": "introspection.error"})
            flight.error = ServiceUnavailable("internal error")
        finally:
            del self._flights[key]
            flight.done.set()

    async def _call_with_retries(self, token: str) -> TokenInfo:
        settings = self._settings
        reason = "deadline exceeded"
        with trio.move_on_after(settings.deadline):
            for attempt in range(settings.retries + 1):
                if attempt:
                    await trio.sleep(
                        full_jitter(self._rng, attempt, settings.backoff_base, settings.backoff_max)
                    )
                permit = await self._actor.acquire()
                if permit is None:
                    self.stats["call.breaker_open"] += 1
                    raise ServiceUnavailable(
                        "auth service breaker open", retry_after=self._actor.retry_after()
                    )
                outcome = Outcome.ABANDONED
                try:
                    info = await self._call_once(token)
                    outcome = Outcome.SUCCESS
                    self.stats["call.ok"] += 1
                    return info
                except _Retryable as exc:
                    outcome = Outcome.FAILURE
                    reason = str(exc)
                    self.stats["call.retryable_failure"] += 1
                except ServiceUnavailable:
                    outcome = Outcome.FAILURE
                    self.stats["call.failure"] += 1
                    raise
                finally:
                    self._actor.report(permit, outcome)
        self.stats["call.gave_up"] += 1
        raise ServiceUnavailable(reason)

    async def _call_once(self, token: str) -> TokenInfo:
        started = trio.current_time()
        try:
            return await self._call_once_timed(token)
        finally:
            if self._observe is not None:
                self._observe(trio.current_time() - started)

    async def _call_once_timed(self, token: str) -> TokenInfo:
        with trio.move_on_after(self._settings.call_timeout) as call:
            try:
                response = await self._http.post(
                    self._url,
                    data={"token": token, "token_type_hint": "access_token"},
                    headers=self._headers,
                    auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                raise _Retryable(f"auth service unreachable ({type(exc).__name__})") from None
        if call.cancelled_caught:
            raise _Retryable("auth service timed out")
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"auth service answered HTTP {status}")
        if status != 200:
            log.error(
                "auth service refused the introspection request",
                extra={"event": "introspection.refused", "status": status},
            )
            raise ServiceUnavailable(f"auth service answered HTTP {status}")
        try:
            return parse_answer(response.json())
        except ValueError:
            raise ServiceUnavailable("auth service answer is not RFC 7662 JSON") from None


def full_jitter(rng: random.Random, attempt: int, base: float, cap: float) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1-based)."""
    return rng.uniform(0, min(cap, base * math.pow(2, attempt - 1)))
