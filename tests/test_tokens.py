"""TokenVerifier: every rejection the design names, and acceptance within leeway."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

from wsgate.auth import keys
from wsgate.auth.keys import _JWS, VerificationKey, load_keys
from wsgate.auth.tokens import TokenRejected, TokenSource, TokenVerifier
from wsgate.config import AuthSettings, KeySettings
from wsgate.errors import ConfigError

SECRET = b"s" * 64
NOW = 1_800_000_000.0
ISS = "https://issuer.example"
AUD = "wsgate"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": NOW - 10, "exp": NOW + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], secret: bytes = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def verifier(*keys: VerificationKey, leeway: float = 0.0, **kw: Any) -> TokenVerifier:
    return TokenVerifier(
        keys or (VerificationKey(SECRET, frozenset({"HS256"})),),
        issuer=ISS,
        audience=AUD,
        leeway=leeway,
        **kw,
    )


def verify(token: str, v: TokenVerifier | None = None, now: float = NOW) -> Any:
    return (v or verifier()).verify(token, now, TokenSource.HEADER)


def test_valid_token_gives_identity() -> None:
    token = hs(claims(scope="read write", tenant="acme", jti="t1"))
    identity = verify(token)
    assert identity.subject == "alice"
    assert identity.tenant == "acme"
    assert identity.scopes == frozenset({"read", "write"})
    assert identity.expires_at == NOW + 300
    assert identity.token_id == "t1"
    assert identity.source is TokenSource.HEADER
    assert identity.user_key == ("acme", "alice")
    assert token not in repr(identity)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed token"),
        ("garbage", "malformed token"),
        ("a.b.c", "malformed token"),
        ("a.b", "malformed token"),
        ("é.é.é", "malformed token"),
        (b64({"alg": "HS256"}) + "." + b64(b"not json") + ".sig", "bad signature|malformed token"),
        (b64(b"not json") + "." + b64({}) + ".sig", "malformed token"),
        (b64([1, 2]) + "." + b64({}) + ".sig", "malformed token"),
        (b64(b"[" * 3000) + "." + b64({}) + ".x", "malformed token"),
    ],
)
def test_garbage_is_rejected(token: str, reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        verify(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_case_is_rejected(alg: str) -> None:
    token = b64({"alg": alg, "typ": "JWT"}) + "." + b64(claims()) + "."
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verify(token)


def test_hs256_signed_with_the_rsa_public_key_is_rejected(rsa_key: tuple[Any, bytes]) -> None:
    _, public_pem = rsa_key
    key = load_keys(
        AuthSettings(keys=(KeySettings(kind="public", pem=public_pem.decode(), algorithms=("RS256",)),))
    )
    # The classic confusion: sign HS256 with the public key's PEM bytes as the secret.
    signing_input = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(claims())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + b64(mac)
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verify(forged, verifier(*key))


@pytest.mark.parametrize("fixture", ["rsa_key", "ec_key", "ed_key"])
def test_public_keys_verify_their_algorithm(fixture: str, request: pytest.FixtureRequest) -> None:
    private, public_pem = request.getfixturevalue(fixture)
    alg = {"rsa_key": "RS256", "ec_key": "ES256", "ed_key": "EdDSA"}[fixture]
    keys = load_keys(
        AuthSettings(keys=(KeySettings(kind="public", pem=public_pem.decode(), algorithms=(alg,)),))
    )
    v = verifier(*keys)
    assert verify(jwt.encode(claims(), private, algorithm=alg), v).subject == "alice"
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verify(hs(claims()), v)


def test_key_refused_for_algorithm_of_another_family(rsa_key: tuple[Any, bytes]) -> None:
    _, public_pem = rsa_key
    with pytest.raises(ConfigError, match=r"auth.keys\[0\]: algorithm ES256 does not fit"):
        load_keys(
            AuthSettings(keys=(KeySettings(kind="public", pem=public_pem.decode(), algorithms=("ES256",)),))
        )


def test_algorithm_not_on_the_list_is_rejected() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    with pytest.raises(TokenRejected, match="algorithm not allowed"):
        verify(token)


def test_wrong_key_is_bad_signature() -> None:
    with pytest.raises(TokenRejected, match="bad signature"):
        verify(hs(claims(), secret=b"x" * 40))


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"iss": "https://issuer.example.evil"}, "wrong issuer"),
        ({"iss": "https://issuer.exampl"}, "wrong issuer"),
        ({"iss": "issuer.example"}, "wrong issuer"),
        ({"iss": None}, "missing claim iss"),
        ({"aud": "other"}, "wrong audience"),
        ({"aud": ["other", "another"]}, "wrong audience"),
        ({"aud": "wsgate2"}, "wrong audience"),
        ({"aud": None}, "missing claim aud"),
        ({"sub": None}, "missing claim sub"),
        ({"exp": None}, "missing claim exp"),
        ({"sub": 42}, "malformed token|claim sub"),
        ({"sub": ""}, "missing claim sub|claim sub"),
        ({"exp": "1900000000"}, "claim exp must be a number"),
        ({"exp": True}, "claim exp must be a number"),
        ({"nbf": "0"}, "claim nbf must be a number"),
        ({"iat": [1]}, "claim iat must be a number"),
        ({"exp": NOW - 1}, "token expired"),
        ({"nbf": NOW + 60}, "token not yet valid"),
        ({"iat": NOW + 60}, "token issued in the future"),
        ({"tenant": 7}, "claim tenant must be a string"),
        ({"scope": 7}, "claim scope"),
        ({"jti": 7}, "malformed token|claim jti"),
    ],
)
def test_claim_rejections(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        verify(hs(claims(**over)))


def test_audience_list_containing_ours_is_accepted() -> None:
    assert verify(hs(claims(aud=["other", AUD]))).subject == "alice"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"crit": ["exp"]}, "unsupported critical header"),
        ({"jku": "https://evil.example/jwks"}, "remote key references"),
        ({"x5u": "https://evil.example/cert"}, "remote key references"),
        ({"typ": "refresh+jwt"}, "wrong token type"),
        ({"kid": 5}, "malformed token"),
        ({"alg": ["HS256"]}, "algorithm not allowed"),
    ],
)
def test_header_rejections(headers: dict[str, Any], reason: str) -> None:
    token = hs(claims())
    header = {"alg": "HS256", "typ": "JWT", **headers}
    forged = b64(header) + "." + token.split(".", 1)[1]
    with pytest.raises(TokenRejected, match=reason):
        verify(forged)


def test_kid_selects_the_named_key() -> None:
    a = VerificationKey(b"a" * 40, frozenset({"HS256"}), kid="a")
    b = VerificationKey(b"b" * 40, frozenset({"HS256"}), kid="b")
    v = verifier(a, b)
    assert verify(hs(claims(sub="bob"), secret=b"b" * 40, kid="b"), v).subject == "bob"
    with pytest.raises(TokenRejected, match="bad signature"):
        verify(hs(claims(), secret=b"a" * 40, kid="b"), v)
    # A kid that names nothing is tried against every key, never an injection point.
    assert verify(hs(claims(), secret=b"a" * 40, kid="../../etc/passwd"), v).subject == "alice"


def test_oversized_token_rejected_before_parsing() -> None:
    v = verifier(max_token_bytes=1024)
    token = hs(claims(pad="x" * 2000))
    with pytest.raises(TokenRejected, match="token too large"):
        verify(token, v)
    with pytest.raises(TokenRejected, match="token too large"):
        verify("x" * 5000, v)


def test_leeway_boundaries() -> None:
    token = hs(claims(exp=NOW + 100, nbf=NOW + 50))
    v = verifier(leeway=30)
    assert verify(token, v, now=NOW + 20).subject == "alice"  # nbf - 30
    with pytest.raises(TokenRejected, match="not yet valid"):
        verify(token, v, now=NOW + 19.9)
    assert verify(token, v, now=NOW + 130).subject == "alice"  # exp + 30
    with pytest.raises(TokenRejected, match="expired"):
        verify(token, v, now=NOW + 130.1)


def test_no_keys_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier([])


def test_short_hmac_secret_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        load_keys(AuthSettings(keys=(KeySettings(kind="hmac", secret="short"),)))


def test_a_public_key_given_as_hmac_secret_is_refused_at_load(rsa_key: tuple[Any, bytes]) -> None:
    _, public_pem = rsa_key
    with pytest.raises(ConfigError, match=r"auth\.hmac_secret: not usable as an HMAC secret"):
        load_keys(AuthSettings(hmac_secret=public_pem.decode()))
    with pytest.raises(ConfigError, match=r"auth\.keys\[0\]: not usable as an HMAC secret"):
        load_keys(AuthSettings(keys=(KeySettings(kind="hmac", secret=public_pem.decode()),)))


def test_keys_are_prepared_without_touching_pyjwt_globals() -> None:
    """Our PyJWT instance takes prepared secrets; the module-level jwt.decode is left as it was."""
    token = hs(claims(iat=None))
    assert verify(token).subject == "alice"
    with pytest.raises(TokenRejected, match="bad signature"):
        verify(hs(claims(), secret=b"t" * 64))
    assert type(jwt.api_jws._jws_global_obj._algorithms["HS256"]) is jwt.algorithms.HMACAlgorithm
    assert jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUD, issuer=ISS)["sub"] == "alice"


_SEGMENT_BYTES = st.sampled_from(list(b"ABCXYZabcxyz0189-_=+/.!\x00 \xff"))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_SEGMENT_BYTES, max_size=12).map(bytes) | st.binary(max_size=9).map(base64.urlsafe_b64encode))
def test_segment_decoding_matches_pyjwt(segment: bytes) -> None:
    """Our C-speed alphabet check accepts and refuses exactly what PyJWT's loop does."""

    def outcome(decode: Callable[[bytes, str], bytes]) -> bytes | str:
        try:
            return decode(segment, "payload")
        except jwt.DecodeError as exc:
            return str(exc)

    assert outcome(_JWS._decode_base64url_segment) == outcome(PyJWS._decode_base64url_segment)


def test_tokens_are_verified_through_our_segment_decoding() -> None:
    assert isinstance(keys.JWT._jws, _JWS)
    with pytest.raises(TokenRejected, match="malformed token"):
        verify(hs(claims()).replace(".", "!.", 1))
