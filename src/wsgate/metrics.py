"""Prometheus metrics, read from the gateway's counters at scrape time.

The hot paths only bump plain ``collections.Counter`` entries (or observe a
histogram); this collector turns them into Prometheus families when
``/metrics`` is scraped, on a registry of the gateway's own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .auth import Authenticator
from .breaker import BreakerState
from .breaker_actor import BreakerActor
from .registry import Registry

BREAKER_STATE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The gateway's metrics registry: histograms observed live, counters collected from
    the objects given to :meth:`watch`, once they exist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handshake_seconds = Histogram(
            "wsgate_handshake_seconds",
            "Time from the upgrade request to admission or refusal.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth_call_seconds = Histogram(
            "wsgate_auth_call_seconds",
            "Duration of one introspection call to the auth service.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(
        self, *, stats: Counter[str], sessions: Registry, auth: Authenticator, breaker: BreakerActor
    ) -> None:
        """Collect counters and gauges from these at each scrape."""
        self.registry.register(_GatewayCollector(stats, sessions, auth, breaker))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _family(name: str, doc: str, label: str, stats: Counter[str], prefix: str) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(stats.items()):
        if key.startswith(prefix):
            family.add_metric([key[len(prefix) :]], value)
    return family


class _GatewayCollector(Collector):
    def __init__(
        self, stats: Counter[str], sessions: Registry, auth: Authenticator, breaker: BreakerActor
    ) -> None:
        self._stats = stats
        self._sessions = sessions
        self._auth = auth
        self._breaker = breaker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats
        open_by = GaugeMetricFamily(
            "wsgate_connections_open", "Open connections by admission outcome.", labels=["outcome"]
        )
        outcomes: Counter[str] = Counter({"normal": 0, "degraded": 0, "demo": 0})
        for session in self._sessions.all_sessions():
            outcomes[
                "demo" if session.identity.anonymous else "degraded" if session.degraded else "normal"
            ] += 1
        for outcome, count in sorted(outcomes.items()):
            open_by.add_metric([outcome], count)
        yield open_by
        yield _family("wsgate_handshakes", "Handshakes by outcome.", "outcome", stats, "handshake.")
        yield _family("wsgate_close_codes", "Close codes sent.", "code", stats, "close.")
        yield _family("wsgate_token_refreshes", "In-band refreshes by outcome.", "outcome", stats, "refresh.")
        yield _family("wsgate_agent_runs", "Agent runs by final status.", "status", stats, "run.")
        yield _family("wsgate_send", "Back-pressure events.", "event", stats, "send.")
        events = CounterMetricFamily("wsgate_agent_events", "Agent events queued for clients.")
        events.add_metric([], stats["agent.events"])
        yield events
        published = CounterMetricFamily("wsgate_published_events", "Server-push events queued.")
        published.add_metric([], stats["published"])
        yield published
        introspection = self._auth.introspection
        if introspection is not None:
            yield _family(
                "wsgate_auth_calls", "Auth-service calls by outcome.", "outcome", introspection.stats, "call."
            )
            yield _family(
                "wsgate_auth_cache", "Introspection cache lookups.", "result", introspection.stats, "cache."
            )
            yield _family(
                "wsgate_auth_answers",
                "What the auth service's answers meant: active, inactive, refused (the gateway's"
                " request was refused: its configuration), unavailable (an outage).",
                "class",
                introspection.answers,
                "",
            )
        breaker = GaugeMetricFamily(
            "wsgate_breaker_state", "Auth-service breaker: 0 closed, 1 half-open, 2 open."
        )
        breaker.add_metric([], BREAKER_STATE[self._breaker.state])
        yield breaker
        yield _family(
            "wsgate_breaker_transitions",
            "Breaker transitions by new state.",
            "to",
            self._breaker.stats,
            "transition.",
        )
        yield _family("wsgate_admission", "Admission decisions by verdict.", "verdict", self._auth.stats, "")
