"""Authentication: the verifier, the auth service and the policy, put together.

:meth:`Authenticator.authenticate` is the one path every token takes, at the
handshake, for first-message auth and for in-band refresh. It feeds the pure
:func:`~wsgate.policy.decide` and acts on its verdict.
"""

from __future__ import annotations

import heapq
import logging
import secrets
from collections import Counter

import attrs

from ..clock import WallClock
from ..errors import Forbidden, Unauthorized, Unavailable
from .introspection import IntrospectionClient, ServiceRefused, ServiceUnavailable, TokenInfo
from .jwks import KeySetSource
from .policy import Level, ServiceAnswer, Verdict, Verification, calls_service, decide
from .tokens import Identity, TokenRejected, TokenSource, TokenVerifier, UnknownKey

log = logging.getLogger("wsgate.auth")

ANONYMOUS_TENANT = "wsgate:anonymous"


@attrs.frozen
class Authenticated:
    identity: Identity
    degraded: bool = False


#: How long a subject's revocation is kept: as long as any token issued before it may live.
SUBJECT_REVOCATION_TTL = 86400.0


class Revocations:
    """Tokens (by ``jti``) and subjects revoked by the operator, until they can no longer matter.

    Checked on every handshake, so forgetting what has expired costs O(log n) per entry,
    not a scan of every revocation: jtis sit in a heap by when they stop mattering, and
    subjects (all kept ``subject_ttl``) in revocation order.
    """

    def __init__(self, subject_ttl: float = SUBJECT_REVOCATION_TTL) -> None:
        self._jti: dict[str, float] = {}
        self._jti_expiry: list[tuple[float, str]] = []  # heap; stale entries skipped on pop
        self._subjects: dict[tuple[str | None, str], float] = {}  # oldest revocation first
        self._subject_ttl = subject_ttl

    def revoke_token(self, jti: str, until: float) -> None:
        until = max(until, self._jti.get(jti, until))
        self._jti[jti] = until
        heapq.heappush(self._jti_expiry, (until, jti))

    def revoke_subject(self, key: tuple[str | None, str], now: float) -> None:
        self._subjects.pop(key, None)  # re-inserted last: the order stays by time
        self._subjects[key] = now

    def is_revoked(self, identity: Identity, now: float) -> bool:
        self._expire(now)
        if identity.token_id is not None and identity.token_id in self._jti:
            return True
        revoked_at = self._subjects.get(identity.user_key)
        if revoked_at is None:
            return False
        # Tokens issued after the revocation are new credentials; older (or undated) ones are not.
        return identity.issued_at is None or identity.issued_at <= revoked_at

    def __len__(self) -> int:
        return len(self._jti) + len(self._subjects)

    def _expire(self, now: float) -> None:
        expiry = self._jti_expiry
        while expiry and expiry[0][0] < now:
            until, jti = heapq.heappop(expiry)
            if self._jti.get(jti) == until:  # not extended by a later revocation
                del self._jti[jti]
        subjects = self._subjects
        while subjects:
            key, at = next(iter(subjects.items()))
            if at + self._subject_ttl >= now:
                break
            del subjects[key]


class Authenticator:
    def __init__(
        self,
        verifier: TokenVerifier,
        level: Level,
        clock: WallClock,
        *,
        introspection: IntrospectionClient | None = None,
        key_set: KeySetSource | None = None,
        anonymous_ttl: float = 3600.0,
    ) -> None:
        self.verifier = verifier
        self.level = level
        self.clock = clock
        self.introspection = introspection
        self.key_set = key_set
        self._anonymous_ttl = anonymous_ttl
        self.revocations = Revocations()
        self.stats: Counter[str] = Counter()

    async def verify(self, token: str, source: TokenSource) -> Identity:
        """Local verification only (signature and claims), bringing the key set up to date
        for a ``kid`` we lack. Raises :class:`TokenRejected`, or :class:`Unavailable` while
        a token's key can be neither found nor ruled out."""
        key_set = self.key_set
        if key_set is not None and not key_set.loaded and not self.verifier.keys:
            raise Unavailable("signing keys are not loaded yet", retry_after=5)
        try:
            return self.verifier.verify(token, self.clock.now(), source)
        except UnknownKey as unknown:
            if key_set is None:
                raise
            retry_after = await key_set.on_unknown_kid(unknown.kid)
            if retry_after is not None:
                raise Unavailable(
                    "the token's signing key cannot be checked yet", retry_after=retry_after
                ) from None
        try:
            return self.verifier.verify(token, self.clock.now(), source)
        except UnknownKey as unknown:
            key_set.confirm_absent(unknown.kid)
            raise

    async def ask_service(
        self, token: str, expires_at: float | None = None
    ) -> tuple[ServiceAnswer, TokenInfo | None, float]:
        """The auth service's answer, with a Retry-After hint for when it has none."""
        if self.introspection is None:
            return ServiceAnswer.NOT_CALLED, None, 0.0
        try:
            info = await self.introspection.introspect(token, expires_at)
        except ServiceRefused as exc:
            return ServiceAnswer.REFUSED, None, exc.retry_after
        except ServiceUnavailable as exc:
            return ServiceAnswer.UNAVAILABLE, None, exc.retry_after
        return (ServiceAnswer.ACTIVE if info.active else ServiceAnswer.INACTIVE), info, 0.0

    async def authenticate(self, token: str | None, source: TokenSource | None) -> Authenticated:
        """Admit or refuse one token; raises the :class:`GatewayError` to answer with."""
        if token is None or source is None:
            decision = decide(Verification.NO_TOKEN, ServiceAnswer.NOT_CALLED, self.level)
            if decision.verdict is Verdict.ADMIT_ANONYMOUS:
                self.stats["anonymous"] += 1
                return Authenticated(self._anonymous())
            raise Unauthorized(decision.reason)
        try:
            identity = await self.verify(token, source)
        except TokenRejected:
            self.stats["rejected.invalid"] += 1
            raise
        if self.revocations.is_revoked(identity, self.clock.now()):
            self.stats["rejected.revoked"] += 1
            raise Forbidden("token revoked")
        answer, info, retry_after = ServiceAnswer.NOT_CALLED, None, 0.0
        if calls_service(self.level, Verification.VERIFIED):
            answer, info, retry_after = await self.ask_service(token, identity.expires_at)
        decision = decide(Verification.VERIFIED, answer, self.level)
        self.stats[decision.verdict.value] += 1
        if decision.verdict is Verdict.REJECT_UNAUTHORIZED:
            raise Unauthorized(decision.reason)
        if decision.verdict is Verdict.REJECT_UNAVAILABLE:
            raise Unavailable(decision.reason, retry_after=max(1.0, retry_after))
        if info is not None:
            identity = self._merge(identity, info)
        return Authenticated(identity, degraded=decision.verdict is Verdict.ADMIT_DEGRADED)

    async def recheck(self, token: str) -> ServiceAnswer:
        """Ask the service again about a live session's token (bypassing the cache)."""
        if self.introspection is None:
            return ServiceAnswer.NOT_CALLED
        self.introspection.forget(token)
        answer, _, _ = await self.ask_service(token)
        return answer

    def _merge(self, identity: Identity, info: TokenInfo) -> Identity:
        # Never fold two people together: the service must agree on who this is.
        if info.subject is not None and info.subject != identity.subject:
            raise Unauthorized("token subject mismatch")
        if info.expires_at is not None and info.expires_at < identity.expires_at:
            return attrs.evolve(identity, expires_at=info.expires_at)
        return identity

    def _anonymous(self) -> Identity:
        return Identity(
            subject=f"anon-{secrets.token_hex(16)}",
            tenant=ANONYMOUS_TENANT,
            expires_at=self.clock.now() + self._anonymous_ttl,
            source=TokenSource.ANONYMOUS,
            scopes=frozenset({"demo"}),
            anonymous=True,
        )
