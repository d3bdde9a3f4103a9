"""The admission policy table (DESIGN section 3), over every combination."""

from __future__ import annotations

import itertools

import pytest

from wsgate.auth.policy import Level, ServiceAnswer, Verdict, Verification, calls_service, decide

V, F, N = Verification.VERIFIED, Verification.FAILED, Verification.NO_TOKEN
ACTIVE, INACTIVE, DOWN, REFUSED, NOT_CALLED = (
    ServiceAnswer.ACTIVE,
    ServiceAnswer.INACTIVE,
    ServiceAnswer.UNAVAILABLE,
    ServiceAnswer.REFUSED,
    ServiceAnswer.NOT_CALLED,
)
ADMIT, DEGRADED, ANON = Verdict.ADMIT, Verdict.ADMIT_DEGRADED, Verdict.ADMIT_ANONYMOUS
R401, R503 = Verdict.REJECT_UNAUTHORIZED, Verdict.REJECT_UNAVAILABLE

# (level, verification) -> verdict for each service answer: active, inactive, unavailable,
# refused (the service refused the gateway's own request: decided as unavailable), not called
TABLE = {
    (Level.STRICT, V): (ADMIT, R401, R503, R503, ADMIT),
    (Level.TOLERANT, V): (ADMIT, R401, DEGRADED, DEGRADED, ADMIT),
    (Level.LOCAL, V): (ADMIT, ADMIT, ADMIT, ADMIT, ADMIT),
    (Level.DEMO, V): (ADMIT, R401, DEGRADED, DEGRADED, ADMIT),
    (Level.STRICT, F): (R401,) * 5,
    (Level.TOLERANT, F): (R401,) * 5,
    (Level.LOCAL, F): (R401,) * 5,
    (Level.DEMO, F): (R401,) * 5,
    (Level.STRICT, N): (R401,) * 5,
    (Level.TOLERANT, N): (R401,) * 5,
    (Level.LOCAL, N): (R401,) * 5,
    (Level.DEMO, N): (ANON,) * 5,
}
ANSWERS = (ACTIVE, INACTIVE, DOWN, REFUSED, NOT_CALLED)


@pytest.mark.parametrize(
    ("level", "verification", "answer"), list(itertools.product(Level, Verification, ServiceAnswer))
)
def test_policy_table(level: Level, verification: Verification, answer: ServiceAnswer) -> None:
    expected = TABLE[(level, verification)][ANSWERS.index(answer)]
    assert decide(verification, answer, level).verdict is expected


@pytest.mark.parametrize("level", list(Level))
def test_no_level_admits_a_failed_token(level: Level) -> None:
    for answer in ServiceAnswer:
        assert not decide(F, answer, level).verdict.admitted


def test_local_never_calls_the_service() -> None:
    assert not calls_service(Level.LOCAL, V)
    assert all(calls_service(level, V) for level in Level if level is not Level.LOCAL)
    assert not any(calls_service(level, F) or calls_service(level, N) for level in Level)
