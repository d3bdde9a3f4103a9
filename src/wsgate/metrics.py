"""Prometheus metrics, read from the gateway's counters at scrape time.

The hot paths only bump entries of a :class:`Stats` (a ``Counter``; or observe a
histogram); the collector turns them into Prometheus families when ``/metrics``
is scraped, on a registry of the gateway's own. Every counter belongs to a
family declared once, in :data:`FAMILIES` (``handshake.429``: family
``handshake``, label ``429``) or :data:`PLAIN`; counting a key of no declared
family raises, so a typo fails where it is made instead of starting a series
nobody exports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import attrs
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .auth.authenticator import Authenticator
from .breaker import BreakerState
from .breaker_actor import BreakerActor
from .cluster.redis import RedisBroker
from .registry import Registry
from .session.sessions import Sessions
from .upstream.agent import UpstreamAgent

BREAKER_STATE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.frozen
class Family:
    metric: str
    doc: str
    label: str


FAMILIES: dict[str, Family] = {
    "handshake": Family("wsgate_handshakes", "Handshakes by outcome.", "outcome"),
    "first_message": Family(
        "wsgate_first_message_auth", "First-message auth refusals by outcome.", "outcome"
    ),
    "close": Family(
        "wsgate_close_codes", "Ended sessions by close code (1006: dropped, no close frame).", "code"
    ),
    "refresh": Family("wsgate_token_refreshes", "In-band refreshes by outcome.", "outcome"),
    "recheck": Family("wsgate_rechecks", "Re-checks of live sessions that changed them.", "outcome"),
    "run": Family("wsgate_agent_runs", "Agent runs by final status.", "status"),
    "send": Family("wsgate_send", "Back-pressure events.", "event"),
    "session": Family(
        "wsgate_sessions",
        "Sessions beyond a connection: detached, resumed, expired (never resumed); resume_refused"
        " (unknown session, token or user), resume_gap, resume_expired.",
        "event",
    ),
    "connection": Family(
        "wsgate_connection_failures", "Connections ended by a bug of ours (logged).", "kind"
    ),
}
PLAIN: dict[str, tuple[str, str]] = {
    "agent_events": ("wsgate_agent_events", "Agent events queued for clients."),
    "published": ("wsgate_published_events", "Server-push events queued."),
    "replayed": ("wsgate_replayed_messages", "Messages replayed to resumed sessions."),
    "revoked": ("wsgate_revoked_sessions", "Sessions closed because their token or subject was revoked."),
}


class Stats(Counter[str]):
    """The gateway's counters: ``family.label`` keys of :data:`FAMILIES`, or :data:`PLAIN`
    names; any other key raises ``KeyError`` when counted."""

    def __missing__(self, key: str) -> int:
        family, dot, label = key.partition(".")
        if (dot and label and family in FAMILIES) or (not dot and key in PLAIN):
            return 0
        raise KeyError(f"{key!r}: no such counter; declare its family in wsgate.metrics")


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
        self,
        *,
        stats: Counter[str],
        sessions: Registry,
        auth: Authenticator,
        breaker: BreakerActor,
        upstream: UpstreamAgent | None = None,
        broker: RedisBroker | None = None,
        detached: Sessions | None = None,
    ) -> None:
        """Collect counters and gauges from these at each scrape."""
        self.registry.register(_GatewayCollector(stats, sessions, auth, breaker, upstream, broker, detached))

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
        self,
        stats: Counter[str],
        sessions: Registry,
        auth: Authenticator,
        breaker: BreakerActor,
        upstream: UpstreamAgent | None,
        broker: RedisBroker | None,
        detached: Sessions | None,
    ) -> None:
        self._stats = stats
        self._detached = detached
        self._sessions = sessions
        self._auth = auth
        self._breaker = breaker
        self._upstream = upstream
        self._broker = broker

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
        if self._detached is not None:
            waiting = GaugeMetricFamily("wsgate_sessions_detached", "Sessions waiting to be resumed.")
            waiting.add_metric([], sum(1 for _ in self._detached.detached_hosts()))
            yield waiting
            kept = GaugeMetricFamily("wsgate_session_log_bytes", "Bytes detached sessions keep to replay.")
            kept.add_metric([], self._detached.log_bytes())
            yield kept
        for prefix, family in FAMILIES.items():
            yield _family(family.metric, family.doc, family.label, stats, prefix + ".")
        for key, (metric, doc) in PLAIN.items():
            plain = CounterMetricFamily(metric, doc)
            plain.add_metric([], stats[key])
            yield plain
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
        if self._upstream is not None:
            yield _family(
                "wsgate_upstream",
                "Runs through the agent service: ok, or their error code; retries; events dropped.",
                "outcome",
                self._upstream.stats,
                "",
            )
            state = GaugeMetricFamily(
                "wsgate_upstream_breaker_state", "Agent-service breaker: 0 closed, 1 half-open, 2 open."
            )
            state.add_metric([], BREAKER_STATE[self._upstream.breaker.state])
            yield state
        if self._broker is not None:
            connected = GaugeMetricFamily(
                "wsgate_broker_connected", "1 while this node is connected to Redis."
            )
            connected.add_metric([], 1 if self._broker.state == "connected" else 0)
            yield connected
            yield _family(
                "wsgate_broker",
                "limit_fallback: connections admitted on this node's own limit while Redis was away.",
                "event",
                self._broker.stats,
                "",
            )
