"""RFC 7662 token introspection under deadlines, retries, a cache and the breaker.

Each call runs under its own cancel scope (``call_timeout``); failures of the
service (connect errors, timeouts, 5xx, 429) are retried with full-jitter
exponential backoff, all inside one overall ``deadline``, and count toward
opening the breaker. A refusal of our request (400, 401, 403: our credentials
or configuration are wrong) is not retried, does not count against the
service, and is logged with the provider's ``error`` and
``error_description`` (see :mod:`wsgate.provider`). Answers are cached by a
hash of the token, never the token itself, and never beyond the token's own
``exp``; concurrent lookups of one token share one call, which is cancelled
when nobody waits for it any more.
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

from ..breaker import Outcome
from ..breaker_actor import BreakerActor
from ..config import AuthSettings
from .provider import ClientAuth, ProviderFailed, ProviderRefused, json_answer
from .tokens import finite_number

log = logging.getLogger("wsgate.auth.introspection")


@attrs.frozen
class TokenInfo:
    """The parts of an introspection answer wsgate uses."""

    active: bool
    subject: str | None = None
    expires_at: float | None = None
    scopes: frozenset[str] | None = None


class ServiceUnavailable(Exception):
    """No answer could be had in time (down, slow, or the breaker is open)."""

    def __init__(self, reason: str, *, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class ServiceRefused(ServiceUnavailable):
    """The service refused the gateway's request: no answer about the token, and no outage."""


#: Retry-After for clients while the service refuses our requests: a configuration
#: problem is not fixed in a second.
REFUSED_RETRY_AFTER = 30.0
#: A refusal is logged at most this often per (status, error): every handshake meets it.
REFUSAL_LOG_INTERVAL = 60.0


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
        #: The introspection endpoint: set, or found by discovery (None until then).
        self.url = settings.introspection_url
        self._settings = settings
        self._http = http
        self._actor = actor
        self._nursery = nursery
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self._cache: OrderedDict[str, tuple[TokenInfo, float]] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self.stats: Counter[str] = Counter()
        #: Answers by class: active, inactive, refused, unavailable (cache hits not counted).
        self.answers: Counter[str] = Counter({"active": 0, "inactive": 0, "refused": 0, "unavailable": 0})
        self.client_auth = ClientAuth(settings, http)
        #: The last refusal, until the service next answers: what /readyz reports.
        self.refusal: ProviderRefused | None = None
        self._refusals_logged: dict[tuple[int, str | None], float] = {}

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def introspect(self, token: str, expires_at: float | None = None) -> TokenInfo:
        """The service's answer for ``token`` (whose own ``exp`` is ``expires_at``, so that an
        answer is never cached beyond it); raises :class:`ServiceUnavailable` or its
        subclass :class:`ServiceRefused`."""
        key = token_key(token)
        cached = self._cached(key)
        if cached is not None:
            self.stats["cache.hit"] += 1
            return cached
        flight = self._flights.get(key)
        if flight is None:
            self.stats["cache.miss"] += 1
            flight = self._flights[key] = _Flight()
            self._nursery.start_soon(self._fly, key, token, expires_at, flight)
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

    def _store(self, key: str, info: TokenInfo, expires_at: float | None) -> None:
        settings = self._settings
        ttl = settings.cache_ttl if info.active else settings.negative_cache_ttl
        if info.active:
            for until in (info.expires_at, expires_at):
                if until is not None:
                    ttl = min(ttl, until - self._wall())
        if ttl <= 0:
            return
        self._cache[key] = (info, trio.current_time() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > settings.cache_size:
            self._cache.popitem(last=False)

    async def _fly(self, key: str, token: str, expires_at: float | None, flight: _Flight) -> None:
        try:
            with flight.scope:
                flight.result = await self._call_with_retries(token)
                self._store(key, flight.result, expires_at)
                self.answers["active" if flight.result.active else "inactive"] += 1
            if flight.scope.cancelled_caught:
                self.stats["call.abandoned"] += 1
                flight.error = ServiceUnavailable("abandoned")
        except ServiceRefused as exc:
            self.answers["refused"] += 1
            flight.error = exc
        except ServiceUnavailable as exc:
            self.answers["unavailable"] += 1
            flight.error = exc
        except Exception:
            log.exception("introspection failed", extra={"event": "introspection.error"})
            flight.error = ServiceUnavailable("internal error")
        finally:
            del self._flights[key]
            flight.done.set()

    async def _call_with_retries(self, token: str) -> TokenInfo:
        settings = self._settings
        if self.url is None:
            raise ServiceUnavailable("auth service endpoint not discovered yet", retry_after=5)
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
                    info = await self._call_once(self.url, token)
                    outcome = Outcome.SUCCESS
                    self.stats["call.ok"] += 1
                    self.refusal = None
                    return info
                except ProviderFailed as exc:
                    outcome = Outcome.FAILURE
                    reason = f"auth service {exc.reason}"
                    self.stats["call.failed"] += 1
                except ProviderRefused as exc:
                    # The service is up and answering: that is a success for the breaker.
                    outcome = Outcome.SUCCESS
                    self.stats["call.refused"] += 1
                    self._refused(exc)
                    raise ServiceRefused(
                        "auth service refused the gateway's request", retry_after=REFUSED_RETRY_AFTER
                    ) from None
                finally:
                    self._actor.report(permit, outcome)
        self.stats["call.gave_up"] += 1
        raise ServiceUnavailable(reason)

    def _refused(self, refusal: ProviderRefused) -> None:
        self.refusal = refusal
        if refusal.status == 401:
            self.client_auth.forget()
        key = (refusal.status, refusal.error)
        now = trio.current_time()
        if now - self._refusals_logged.get(key, -float("inf")) >= REFUSAL_LOG_INTERVAL:
            self._refusals_logged[key] = now
            log.error(
                "the auth service refused the gateway's introspection request: %s "
                "(check auth.client_auth, auth.client_id, auth.client_secret, auth.introspection_url)",
                refusal.summary,
                extra={"event": "introspection.refused", "status": refusal.status, "reason": refusal.error},
            )

    async def _call_once(self, url: str, token: str) -> TokenInfo:
        started = trio.current_time()
        try:
            return await self._call_once_timed(url, token)
        finally:
            if self._observe is not None:
                self._observe(trio.current_time() - started)

    async def _call_once_timed(self, url: str, token: str) -> TokenInfo:
        with trio.move_on_after(self._settings.call_timeout) as call:
            data = {"token": token, "token_type_hint": "access_token"}
            headers = {"Accept": "application/json"}
            try:
                await self.client_auth.apply(data, headers)
                response = await self._http.post(url, data=data, headers=headers)
            except httpx.TransportError as exc:
                raise ProviderFailed(f"unreachable ({type(exc).__name__})") from None
        if call.cancelled_caught:
            raise ProviderFailed("timed out")
        try:
            return parse_answer(json_answer(response))
        except ValueError:
            raise ProviderRefused(200, "not_introspection", "the answer is not RFC 7662 JSON") from None


def full_jitter(rng: random.Random, attempt: int, base: float, cap: float) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1-based)."""
    return rng.uniform(0, min(cap, base * math.pow(2, attempt - 1)))
