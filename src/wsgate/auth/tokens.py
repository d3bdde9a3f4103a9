"""The one token verifier: every JWT wsgate accepts passes through here.

Nothing else in wsgate decodes a JWT (``JWT.decode``: PyJWT, with keys
prepared once). Time is passed in (``now``, in epoch seconds) so that tests
drive expiry with Trio's ``MockClock``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import jwt

from ..config import HMAC_ALGORITHMS, AuthSettings
from ..errors import ConfigError, Unauthorized
from ..protocol import has_utf8
from .keys import JWT, VerificationKey

_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Header parameters that point at keys elsewhere; we never follow them.
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")


class TokenSource(enum.Enum):
    HEADER = "header"
    SUBPROTOCOL = "subprotocol"
    COOKIE = "cookie"
    QUERY = "query"
    FIRST_MESSAGE = "first_message"
    REFRESH = "refresh"
    ANONYMOUS = "anonymous"


@attrs.frozen
class Identity:
    """Who a connection is. Immutable; a refresh makes a new one for the same subject."""

    subject: str
    expires_at: float
    source: TokenSource
    tenant: str | None = None
    scopes: frozenset[str] = frozenset()
    issued_at: float | None = None
    token_id: str | None = None
    anonymous: bool = False

    @property
    def user_key(self) -> tuple[str | None, str]:
        """The key users are isolated by: (tenant, subject)."""
        return (self.tenant, self.subject)

    @property
    def subject_hash(self) -> str:
        """A short stable hash of the subject, for logs."""
        # surrogatepass: an Identity built by hand may hold text with no UTF-8 form.
        key = f"{self.tenant}\0{self.subject}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(key).hexdigest()[:12]


class TokenRejected(Unauthorized):
    """The token failed verification; ``reason`` is short and safe to show."""


class UnknownKey(TokenRejected):
    """The token names a ``kid`` we do not have (or, without a kid, uses an algorithm no
    key of ours has); a key-set refresh may find it."""

    def __init__(self, reason: str, kid: str | None = None) -> None:
        super().__init__(reason)
        self.kid = kid


def _read_header(token: str) -> dict[str, Any]:
    segment = token.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(header, dict):
        raise TokenRejected("malformed token")
    return header


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else None.

    Integers too large for a float (``10**400``) are None, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class TokenVerifier:
    """Verifies a JWT against the configured keys and claims, or raises TokenRejected."""

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 0.0,
        max_token_bytes: int = 8192,
        required_claims: Iterable[str] = ("exp", "sub"),
        token_types: Iterable[str] = ("JWT", "at+jwt"),
        tenant_claim: str = "tenant",
        dynamic_keys: bool = False,
    ) -> None:
        self._static = tuple(keys)
        self._dynamic_keys = dynamic_keys
        if not self._static and not dynamic_keys:
            raise ConfigError(["auth.keys: no verification key configured"])
        self.set_dynamic_keys(())
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._max_bytes = max_token_bytes
        self._required = sorted(set(required_claims) | {"exp", "sub"})
        self._types = frozenset(t.lower() for t in token_types)
        self._tenant_claim = tenant_claim
        self._options: Any = {
            "require": self._required,
            "verify_exp": False,  # checked below against the `now` we are given
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }

    def set_dynamic_keys(self, keys: Iterable[VerificationKey]) -> None:
        """Replace the keys that came from a key set (JWKS); static keys stay."""
        self._keys = self._static + tuple(keys)
        self._algorithms: frozenset[str] = frozenset().union(*(k.algorithms for k in self._keys))

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        return self._keys

    @classmethod
    def from_settings(cls, settings: AuthSettings, keys: Iterable[VerificationKey]) -> TokenVerifier:
        return cls(
            keys,
            issuer=settings.issuer,
            audience=settings.audience,
            leeway=settings.leeway,
            max_token_bytes=settings.max_token_bytes,
            required_claims=settings.required_claims,
            token_types=settings.token_types,
            tenant_claim=settings.tenant_claim,
            dynamic_keys=bool(settings.jwks_url or settings.discovery),
        )

    def verify(self, token: str, now: float, source: TokenSource) -> Identity:
        """Return the token's identity, or raise :class:`TokenRejected` saying why.

        Everything from the raw string to the :class:`Identity`, claim conversions
        included, happens inside this one error boundary: a signed token with claims
        of any shape or size is refused with a reason, never with another exception.
        """
        if len(token) > self._max_bytes:
            raise TokenRejected("token too large")
        if token.count(".") != 2 or not token.isascii():
            raise TokenRejected("malformed token")
        try:
            header = _read_header(token)
            alg = self._check_header(header)
            claims = self._decode(token, header, alg)
            return self._identity(claims, now, source)
        except TokenRejected:
            raise
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad signature") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"missing claim {exc.claim}") from None
        except (
            jwt.PyJWTError,
            binascii.Error,
            ValueError,
            TypeError,
            KeyError,
            RecursionError,
            OverflowError,
        ):
            raise TokenRejected("malformed token") from None

    def _check_header(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenRejected("algorithm not allowed")
        if "crit" in header:
            raise TokenRejected("unsupported critical header")
        if any(h in header for h in _FORBIDDEN_HEADERS):
            raise TokenRejected("remote key references are not accepted")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in self._types):
            raise TokenRejected("wrong token type")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("malformed token")
        if alg not in self._algorithms:
            if self._dynamic_keys and alg in _ASYMMETRIC:
                raise UnknownKey("no key for this algorithm", kid=header.get("kid"))
            raise TokenRejected("algorithm not allowed")
        return alg

    def _candidates(self, header: Mapping[str, Any], alg: str) -> list[VerificationKey]:
        kid = header.get("kid")
        usable = [k for k in self._keys if alg in k.algorithms]
        if kid is not None:
            named = [k for k in usable if k.kid == kid]
            if named:
                return named
            if self._dynamic_keys and not any(k.kid is None for k in usable):
                raise UnknownKey("unknown key id", kid=kid)
        return [k for k in usable if k.kid is None] or usable

    def _decode(self, token: str, header: Mapping[str, Any], alg: str) -> dict[str, Any]:
        candidates = self._candidates(header, alg)
        if not candidates:
            raise TokenRejected("no key for this token")
        last: Exception = TokenRejected("bad signature")
        for key in candidates:
            try:
                claims: dict[str, Any] = JWT.decode(
                    token,
                    key.prepared,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    options=self._options,
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc
        raise last

    def _identity(self, claims: Mapping[str, Any], now: float, source: TokenSource) -> Identity:
        exp = _number_claim(claims, "exp")
        nbf = _number_claim(claims, "nbf")
        iat = _number_claim(claims, "iat")
        assert exp is not None  # a required claim: PyJWT checked it is there
        if now > exp + self._leeway:
            raise TokenRejected("token expired")
        if nbf is not None and now + self._leeway < nbf:
            raise TokenRejected("token not yet valid")
        if iat is not None and now + self._leeway < iat:
            raise TokenRejected("token issued in the future")
        # Exact comparison ourselves too: never a prefix, substring or list match.
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise TokenRejected("wrong issuer")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 256 or not has_utf8(subject):
            raise TokenRejected("claim sub must be a non-empty string")
        tenant = claims.get(self._tenant_claim)
        if tenant is not None and (not isinstance(tenant, str) or len(tenant) > 256 or not has_utf8(tenant)):
            raise TokenRejected(f"claim {self._tenant_claim} must be a string")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not has_utf8(jti)):
            raise TokenRejected("claim jti must be a string")
        return Identity(
            subject=subject,
            expires_at=exp,
            source=source,
            tenant=tenant,
            scopes=_scopes(claims),
            issued_at=iat,
            token_id=jti,
        )


def _number_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A numeric date claim as a float; None when absent. Refuses what is not a finite
    number, including integers too large for a float (``10**400``)."""
    if name not in claims:
        return None
    number = finite_number(claims[name])
    if number is None:
        raise TokenRejected(f"claim {name} must be a number")
    return number


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str) and has_utf8(scope):
        return frozenset(scope.split())
    if isinstance(scope, list) and all(isinstance(s, str) and has_utf8(s) for s in scope):
        return frozenset(scope)
    if scope is None:
        return frozenset()
    raise TokenRejected("claim scope must be a string or a list of strings")


def mint_token(
    secret: bytes,
    subject: str,
    *,
    now: float,
    ttl: float = 900.0,
    issuer: str | None = None,
    audience: str | None = None,
    scopes: Iterable[str] = (),
    **claims: Any,
) -> str:
    """Sign an HS256 token (dev mode, tests and ``wsgate token``)."""
    payload: dict[str, Any] = {"sub": subject, "iat": int(now), "exp": int(now + ttl), **claims}
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    scope_list = list(scopes)
    if scope_list:
        payload["scope"] = " ".join(scope_list)
    return jwt.encode(payload, secret, algorithm="HS256")


__all__ = [
    "HMAC_ALGORITHMS",
    "Identity",
    "TokenRejected",
    "TokenSource",
    "TokenVerifier",
    "UnknownKey",
    "finite_number",
    "mint_token",
]
