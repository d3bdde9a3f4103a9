"""The breaker state machine, table-tested: every transition, with time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from wsgate.breaker import BreakerConfig, BreakerState, CircuitBreaker, Decision, Outcome

C, OP, H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
ALLOW, REJECT, WAIT = Decision.ALLOW, Decision.REJECT, Decision.WAIT
OK, FAIL, GONE = Outcome.SUCCESS, Outcome.FAILURE, Outcome.ABANDONED
CONFIG = BreakerConfig(
    window=20,
    min_calls=10,
    failure_rate=0.5,
    slow_call_duration=1.0,
    slow_call_rate=0.8,
    open_wait=5.0,
    half_open_calls=3,
    max_concurrent_calls=20,
)


def calls(outcomes: str, t: float = 0.0, duration: float = 0.1) -> list[tuple[Any, ...]]:
    """One closed-state call per letter: s = success, f = failure, w = slow success, x = abandoned."""
    ops: list[tuple[Any, ...]] = []
    for letter in outcomes:
        outcome = {"s": OK, "f": FAIL, "w": OK, "x": GONE}[letter]
        ops.append(("allow", t, ALLOW))
        ops.append(("record", outcome, 2.0 if letter == "w" else duration, t, C))
    return ops


TRIP = calls("f" * 10)

CASES: list[tuple[str, list[tuple[Any, ...]], BreakerState]] = [
    ("fewer than min_calls failures stay closed", calls("f" * 9), C),
    ("min_calls failures open", calls("f" * 10), OP),
    ("failure rate at the threshold opens", calls("sfsfsfsfsf"), OP),
    ("failure rate under the threshold stays closed", calls("ssssssffff"), C),
    ("abandoned calls do not count", calls("x" * 30 + "f" * 9), C),
    ("the window slides: old successes age out", calls("s" * 20 + "f" * 9), C),
    ("the window slides: 10 of the last 20 failed", calls("s" * 20 + "f" * 10), OP),
    ("slow calls at the slow rate open", calls("w" * 8 + "s" * 2), OP),
    ("slow calls under the slow rate stay closed", calls("w" * 7 + "s" * 3), C),
    ("open rejects before the wait", [*TRIP, ("allow", 4.99, REJECT)], OP),
    ("open half-opens after the wait", [*TRIP, ("allow", 5.0, ALLOW)], H),
    (
        "half-open permits only its probes",
        [*TRIP, ("allow", 5, ALLOW), ("allow", 5, ALLOW), ("allow", 5, ALLOW), ("allow", 5, REJECT)],
        H,
    ),
    (
        "all probes succeeding closes",
        [*TRIP, *[("allow", 5, ALLOW)] * 3, *[("record", OK, 0.1, 5.5, H)] * 3],
        C,
    ),
    (
        "a failed probe re-opens",
        [*TRIP, *[("allow", 5, ALLOW)] * 3, ("record", OK, 0.1, 5.5, H), ("record", FAIL, 0.1, 5.6, H)],
        OP,
    ),
    (
        "re-opened waits again from the failed probe",
        [
            *TRIP,
            ("allow", 5, ALLOW),
            ("record", FAIL, 0.1, 6, H),
            ("allow", 10.9, REJECT),
            ("allow", 11, ALLOW),
        ],
        H,
    ),
    ("a slow probe re-opens", [*TRIP, ("allow", 5, ALLOW), ("record", OK, 1.5, 6.5, H)], OP),
    (
        "an abandoned probe frees its permit",
        [
            *TRIP,
            *[("allow", 5, ALLOW)] * 3,
            ("allow", 5, REJECT),
            ("record", GONE, 0, 5, H),
            ("allow", 5, ALLOW),
        ],
        H,
    ),
    ("a late success from closed does not close an open breaker", [*TRIP, ("record", OK, 0.1, 1, C)], OP),
    (
        "a late failure from closed does not touch half-open",
        [*TRIP, ("allow", 5, ALLOW), ("record", FAIL, 0.1, 5, C)],
        H,
    ),
    (
        "closing empties the window",
        [*TRIP, *[("allow", 5, ALLOW)] * 3, *[("record", OK, 0.1, 5, H)] * 3, *calls("f" * 9, t=6)],
        C,
    ),
]


@pytest.mark.parametrize(("name", "ops", "final"), CASES, ids=[c[0] for c in CASES])
def test_breaker_table(name: str, ops: list[tuple[Any, ...]], final: BreakerState) -> None:
    breaker = CircuitBreaker(CONFIG)
    for op in ops:
        if op[0] == "allow":
            decision, _ = breaker.allow(op[1])
            assert decision is op[2], (name, op, breaker.state)
        else:
            _, outcome, duration, now, permitted_in = op
            breaker.record(outcome, duration, now, permitted_in=permitted_in)
    assert breaker.state is final


def test_concurrency_cap_makes_calls_wait_for_a_slot() -> None:
    breaker = CircuitBreaker(BreakerConfig(max_concurrent_calls=2))
    assert breaker.allow(0)[0] is ALLOW
    assert breaker.allow(0)[0] is ALLOW
    assert breaker.allow(0)[0] is WAIT
    breaker.record(OK, 0.1, 0.1, permitted_in=C)
    assert breaker.allow(0.1)[0] is ALLOW


def test_transitions_are_reported_with_their_time() -> None:
    breaker = CircuitBreaker(CONFIG)
    transitions = []
    for _ in range(10):
        breaker.allow(1)
        transitions.append(breaker.record(FAIL, 0.1, 1, permitted_in=C))
    assert [t for t in transitions if t] and transitions[-1] is not None
    assert (transitions[-1].old, transitions[-1].new, transitions[-1].at) == (C, OP, 1)
    assert breaker.retry_after(3) == 3
    _, half = breaker.allow(6)
    assert half is not None and (half.old, half.new) == (OP, H)
    assert breaker.retry_after(6) == 0
