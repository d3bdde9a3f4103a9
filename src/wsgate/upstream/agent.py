"""The agent service as an :class:`~wsgate.agent.Agent`: one streaming POST per run.

Each run is one request to ``agent.upstream_url`` whose response streams the
run's events (SSE or NDJSON), relayed to the client as they come. Deadlines
are cancel scopes: the first event within ``agent.first_event_timeout`` of the
run's start (connecting and retries included), then at most
``agent.idle_timeout`` between events, and the whole run within
``agent.run_timeout``. Failures before the first event are retried with
jittered backoff inside the first-event deadline; after it, never (a run is
relayed at most once). Every call goes through the agent service's own
breaker. However the backend behaves, the run ends with exactly one
``agent_completed``; its ``error.code`` says what went wrong.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, cast

import httpx
import trio
from httpx_sse import EventSource, SSEError

from ..agent import Emit, RunContext
from ..auth.introspection import full_jitter
from ..breaker import BreakerConfig, CircuitBreaker, Outcome
from ..breaker_actor import BreakerActor, Permit
from ..config import AgentSettings, Settings
from .events import (
    UpstreamFailure,
    bounded_lines,
    bounded_text,
    decode,
    protocol_error,
    stream_kind,
    translate,
)
from .tokens import RunTokens, global_run_id

log = logging.getLogger("wsgate.upstream")

RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Retry(Exception):
    """A failure before the first event, worth another attempt if time is left."""

    def __init__(self, failure: UpstreamFailure) -> None:
        self.failure = failure


class _Bounded:
    """The response as httpx-sse reads it, with each event's size bounded."""

    def __init__(self, response: httpx.Response, limit: int) -> None:
        self.headers = response.headers
        self._response = response
        self._limit = limit

    def aiter_text(self) -> AsyncIterator[str]:
        return bounded_text(self._response.aiter_text(), self._limit)


class UpstreamAgent:
    """Relays runs to the agent service."""

    def __init__(
        self,
        settings: AgentSettings,
        http: httpx.AsyncClient,
        breaker: BreakerActor,
        tokens: RunTokens,
        *,
        rng: random.Random | None = None,
    ) -> None:
        assert settings.upstream_url is not None
        self.url = settings.upstream_url
        self._settings = settings
        self._http = http
        self._breaker = breaker
        self._tokens = tokens
        self._rng = rng or random.Random()
        #: ok, or each error code; retried; dropped_events.
        self.stats: Counter[str] = Counter()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        now: Callable[[], float],
        *,
        rng: random.Random | None = None,
    ) -> UpstreamAgent:
        """One pooled client (keep-alive, at most ``agent.max_connections``) and the agent
        service's own breaker, configured like the auth service's (``breaker.*``)."""
        agent = settings.agent
        connect = agent.connect_timeout
        http = httpx.AsyncClient(
            # Reads are bounded by the run's cancel scopes (first event, idle, whole run).
            timeout=httpx.Timeout(connect=connect, read=None, write=connect, pool=connect),
            limits=httpx.Limits(max_connections=agent.max_connections),
        )
        breaker = BreakerActor(
            CircuitBreaker(BreakerConfig(**settings.breaker.for_calls(agent.first_event_timeout))),
            name="agent service",
        )
        return cls(agent, http, breaker, RunTokens(agent, now), rng=rng)

    @property
    def breaker(self) -> BreakerActor:
        return self._breaker

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None:
        settings = self._settings
        failure: UpstreamFailure | None = None
        with trio.move_on_after(settings.run_timeout) as whole:
            try:
                await self._relay(ctx, message, emit)
            except UpstreamFailure as exc:
                failure = exc
        if whole.cancelled_caught:
            failure = UpstreamFailure(
                "upstream_timeout", f"the run took longer than agent.run_timeout ({settings.run_timeout:g} s)"
            )
        if failure is None:
            self.stats["ok"] += 1
            return
        self.stats[failure.code] += 1
        log.warning(
            "upstream run failed: %s",
            failure.message,
            extra={"event": "upstream.failed", "session": ctx.session_id, "run_id": ctx.run_id},
        )
        await emit("agent_completed", status="error", error=failure.as_error())

    # -- one run --------------------------------------------------------------------

    def _request(self, ctx: RunContext, text: str) -> tuple[dict[str, str], dict[str, Any]]:
        identity = ctx.identity
        token = ctx.client_token if ctx.client_token is not None else self._tokens.mint(ctx)
        headers = {
            "Accept": "text/event-stream, application/x-ndjson",
            "Authorization": f"Bearer {token}",
            "X-Request-Id": global_run_id(ctx),
            "traceparent": f"00-{self._rng.getrandbits(128):032x}-{self._rng.getrandbits(64):016x}-01",
        }
        message: dict[str, Any] = {"text": text}
        if ctx.message_id is not None:
            message["id"] = ctx.message_id
        body = {
            "run_id": ctx.run_id,
            "session_id": ctx.session_id,
            "message": message,
            "user": {
                "sub": identity.subject,
                "tenant": identity.tenant,
                "scopes": sorted(identity.scopes),
                "degraded": ctx.degraded,
            },
        }
        return headers, body

    async def _relay(self, ctx: RunContext, text: str, emit: Emit) -> None:
        """Attempts until one streams its first event, within the first-event deadline."""
        settings = self._settings
        headers, body = self._request(ctx, text)
        first_by = trio.current_time() + settings.first_event_timeout
        failure = self._no_first_event()
        for attempt in range(settings.retries + 1):
            if attempt:
                delay = full_jitter(self._rng, attempt, settings.backoff_base, settings.backoff_max)
                if trio.current_time() + delay >= first_by:
                    break
                self.stats["retried"] += 1
                await trio.sleep(delay)
            permit = await self._breaker.acquire()
            if permit is None:
                raise UpstreamFailure("upstream_unavailable", "the agent service's breaker is open")
            try:
                await self._attempt(permit, headers, body, first_by, emit)
                return
            except _Retry as retry:
                failure = retry.failure
            if trio.current_time() >= first_by:
                break
        raise failure

    async def _attempt(
        self, permit: Permit, headers: dict[str, str], body: dict[str, Any], first_by: float, emit: Emit
    ) -> None:
        """One request: relays its events until the run completes. The permit is reported
        once: at the first event, or when the attempt fails before it."""
        held: Permit | None = permit
        outcome = Outcome.ABANDONED  # cancelled before an answer: says nothing of the service

        def settle(result: Outcome) -> None:
            nonlocal held
            if held is not None:
                self._breaker.report(held, result)
                held = None

        try:
            with trio.CancelScope(deadline=first_by) as first:
                async with self._http.stream("POST", self.url, json=body, headers=headers) as response:
                    kind = self._check(response)
                    async with aclosing(self._events(response, kind)) as events:
                        started = False
                        while True:
                            event = await self._next(events, started)
                            if event is None:
                                raise protocol_error("the stream ended before agent_completed")
                            if not started:
                                started = True
                                first.deadline = math.inf
                                settle(Outcome.SUCCESS)
                            if await self._forward(event, emit):
                                return
            if first.cancelled_caught:
                raise _Retry(self._no_first_event())
        except _Retry:  # a 408/425/429/5xx, or no first event in time
            outcome = Outcome.FAILURE
            raise
        except UpstreamFailure:
            # The service answered (a refusal, or a stream it spoiled): it is up.
            outcome = Outcome.SUCCESS
            raise
        except httpx.TransportError as exc:
            outcome = Outcome.FAILURE
            broken = UpstreamFailure("upstream_unavailable", f"the agent service: {type(exc).__name__}")
            if held is None:  # it had started streaming: never retried
                raise broken from None
            raise _Retry(broken) from None
        finally:
            settle(outcome)

    def _no_first_event(self) -> UpstreamFailure:
        timeout = self._settings.first_event_timeout
        return UpstreamFailure(
            "upstream_timeout", f"no event within agent.first_event_timeout ({timeout:g} s)"
        )

    def _check(self, response: httpx.Response) -> str:
        """The response's stream kind, or why it is refused (a retry for a status that may pass)."""
        status = response.status_code
        if status in RETRIED_STATUSES:
            raise _Retry(
                UpstreamFailure("upstream_unavailable", f"the agent service answered {status}", status)
            )
        if status >= 300:
            raise UpstreamFailure(
                "upstream_rejected", f"the agent service refused the run ({status})", status
            )
        kind = stream_kind(response.headers.get("content-type", ""))
        if kind is None:
            raise protocol_error("the response is neither text/event-stream nor application/x-ndjson")
        return kind

    async def _events(
        self, response: httpx.Response, kind: str
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        limit = self._settings.max_event_bytes
        if kind == "sse":
            source = EventSource(cast(httpx.Response, _Bounded(response, limit)))
            try:
                async for sse in source.aiter_sse():
                    if sse.data:  # an event with no data is a keep-alive
                        yield decode(sse.event, sse.data)
            except SSEError as exc:
                raise protocol_error(f"not a valid event stream ({exc})") from None
        else:
            async for line in bounded_lines(response.aiter_bytes(), limit):
                if line:
                    yield decode(None, line)

    async def _next(
        self, events: AsyncIterator[tuple[str, dict[str, Any]]], started: bool
    ) -> tuple[str, dict[str, Any]] | None:
        """The next event; after the first, within ``agent.idle_timeout``."""
        if not started:
            return await anext(events, None)
        idle = self._settings.idle_timeout
        with trio.move_on_after(idle):
            return await anext(events, None)
        raise UpstreamFailure("upstream_timeout", f"no event for agent.idle_timeout ({idle:g} s)")

    async def _forward(self, event: tuple[str, dict[str, Any]], emit: Emit) -> bool:
        """Relay one event; True once the run has completed."""
        settings = self._settings
        translated = translate(*event, settings.upstream_events, settings.passthrough_events)
        if translated is None:
            self.stats["dropped_events"] += 1
            return False
        kind, fields = translated
        await emit(kind, **fields)
        return kind == "agent_completed"
