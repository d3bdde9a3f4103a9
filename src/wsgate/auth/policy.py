"""The admission policy: a pure function of what we know about a request.

``decide(verification, answer, level)`` is the table in ``docs/configuration.md`` ("Policy levels"). No
level admits a token that failed verification, and no two people are ever
folded into one identity: an anonymous demo connection gets its own identity.
"""

from __future__ import annotations

import enum

import attrs


class Level(enum.Enum):
    STRICT = "strict"
    TOLERANT = "tolerant"
    LOCAL = "local"
    DEMO = "demo"


class Verification(enum.Enum):
    VERIFIED = "verified"
    FAILED = "failed"
    NO_TOKEN = "no_token"


class ServiceAnswer(enum.Enum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    UNAVAILABLE = "unavailable"  # down, timed out, or the breaker is open
    #: It answered, refusing the gateway's own request (wrong credentials or endpoint):
    #: it said nothing about the token, so it is decided as if unavailable.
    REFUSED = "refused"
    NOT_CALLED = "not_called"


class Verdict(enum.Enum):
    ADMIT = "admit"
    ADMIT_DEGRADED = "admit_degraded"
    ADMIT_ANONYMOUS = "admit_anonymous"
    REJECT_UNAUTHORIZED = "reject_401"
    REJECT_UNAVAILABLE = "reject_503"

    @property
    def admitted(self) -> bool:
        return self in (Verdict.ADMIT, Verdict.ADMIT_DEGRADED, Verdict.ADMIT_ANONYMOUS)


@attrs.frozen
class Decision:
    verdict: Verdict
    reason: str


def calls_service(level: Level, verification: Verification) -> bool:
    """Whether the auth service is consulted at all for this request."""
    return level is not Level.LOCAL and verification is Verification.VERIFIED


def decide(verification: Verification, answer: ServiceAnswer, level: Level) -> Decision:
    """The admission decision for one request (or one re-check of a live session)."""
    if verification is Verification.FAILED:
        return Decision(Verdict.REJECT_UNAUTHORIZED, "token invalid")
    if verification is Verification.NO_TOKEN:
        if level is Level.DEMO:
            return Decision(Verdict.ADMIT_ANONYMOUS, "anonymous demo identity")
        return Decision(Verdict.REJECT_UNAUTHORIZED, "token missing")
    if level is Level.LOCAL or answer is ServiceAnswer.NOT_CALLED:
        return Decision(Verdict.ADMIT, "verified locally")
    if answer is ServiceAnswer.ACTIVE:
        return Decision(Verdict.ADMIT, "active")
    if answer is ServiceAnswer.INACTIVE:
        return Decision(Verdict.REJECT_UNAUTHORIZED, "token inactive")
    cause = (
        "auth service refused the gateway's request"
        if answer is ServiceAnswer.REFUSED
        else "auth service unavailable"
    )
    if level is Level.STRICT:
        return Decision(Verdict.REJECT_UNAVAILABLE, cause)
    return Decision(Verdict.ADMIT_DEGRADED, f"{cause}; admitted degraded")
