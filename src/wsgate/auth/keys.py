"""Verification keys: the ones configured, the dev key, and PyJWT prepared to use them.

Keys are prepared once, when loaded, not on every token. ``JWT`` is the one
PyJWT instance wsgate decodes with (:mod:`wsgate.auth.tokens` uses it).
"""

from __future__ import annotations

import binascii
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS
from jwt.utils import base64url_decode, base64url_encode

from ..config import AuthSettings, KeySettings
from ..errors import ConfigError

_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


@attrs.frozen
class VerificationKey:
    """A prepared key bound to the algorithms it may verify."""

    key: Any = attrs.field(repr=False)
    algorithms: frozenset[str]
    kid: str | None = None
    #: What the algorithm verifies with, checked and converted once, here, instead of
    #: by PyJWT on every token (for an HMAC secret that is a JSON parse and regexes).
    prepared: Any = attrs.field(init=False, repr=False, eq=False)

    @prepared.default
    def _prepare(self) -> Any:
        if not isinstance(self.key, bytes | str):
            return self.key  # public keys are loaded into key objects already
        try:
            return _PreparedSecret(HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(self.key))
        except jwt.InvalidKeyError as exc:
            raise ValueError(f"not usable as an HMAC secret: {exc}") from None


class _PreparedSecret:
    __slots__ = ("secret",)

    def __init__(self, secret: bytes) -> None:
        self.secret = secret


class _PreparedHMAC(HMACAlgorithm):
    """HMAC that takes a secret prepared at load time as it is."""

    def prepare_key(self, key: Any) -> bytes:
        if isinstance(key, _PreparedSecret):
            return key.secret
        return super().prepare_key(key)


_BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class _JWS(PyJWS):
    """PyJWS, with the alphabet check of each token segment done in C.

    PyJWT checks every character of a segment against the base64url alphabet in a
    Python generator: a third of a token's verification time. ``bytes.translate``
    deletes the alphabet's characters in C; anything left over is junk. Otherwise
    this is PyJWT's own ``_decode_base64url_segment`` step for step, and a property
    test holds the two to the same answer for the same input.
    """

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if padding > 2 or (padding and len(segment) % 4 != 0):
            raise jwt.DecodeError(f"Invalid {name} padding")
        if len(stripped) % 4 == 1 or stripped.translate(None, _BASE64URL_ALPHABET):
            raise jwt.DecodeError(f"Invalid {name} padding")
        try:
            decoded = base64url_decode(stripped)
        except (TypeError, binascii.Error) as err:
            raise jwt.DecodeError(f"Invalid {name} padding") from err
        if base64url_encode(decoded) != stripped:
            raise jwt.DecodeError(f"Invalid {name} padding")
        return decoded


def _pyjwt() -> jwt.PyJWT:
    """A PyJWT of our own (the module's global one stays untouched) with the PyJWS and
    the HMAC algorithms above. ``_jws`` is the PyJWS a PyJWT instance verifies with
    (PyJWT 2.x)."""
    instance = jwt.PyJWT()
    instance._jws = _JWS(options=instance._jws.options)
    for name, hash_alg in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        instance._jws.unregister_algorithm(name)
        instance._jws.register_algorithm(name, _PreparedHMAC(hash_alg))
    return instance


JWT = _pyjwt()


def load_keys(settings: AuthSettings, dev_secret: bytes | None = None) -> list[VerificationKey]:
    """Prepare every configured key once; refuse keys that do not fit their algorithms."""
    keys: list[VerificationKey] = []
    problems: list[str] = []
    if dev_secret is not None:
        keys.append(VerificationKey(dev_secret, frozenset({"HS256"})))
    if settings.hmac_secret is not None:
        try:
            keys.append(VerificationKey(settings.hmac_secret.encode(), frozenset({"HS256"})))
        except ValueError as exc:
            problems.append(f"auth.hmac_secret: {exc}")
    for i, spec in enumerate(settings.keys):
        try:
            keys.append(_load_key(spec))
        except (OSError, ValueError, TypeError) as exc:
            problems.append(f"auth.keys[{i}]: {exc}")
    if problems:
        raise ConfigError(problems)
    return keys


def _load_key(spec: KeySettings) -> VerificationKey:
    if spec.kind == "hmac":
        secret = (
            spec.secret.encode()
            if spec.secret is not None
            else Path(str(spec.secret_file)).read_bytes().strip()
        )
        if len(secret) < 32:
            raise ValueError("an HMAC secret must be at least 32 bytes")
        return VerificationKey(secret, frozenset(spec.algorithms or ("HS256",)), spec.kid)
    pem = spec.pem.encode() if spec.pem is not None else Path(str(spec.pem_file)).read_bytes()
    public = serialization.load_pem_public_key(pem)
    for alg in spec.algorithms:
        expected = next((t for p, t in _KEY_TYPES.items() if alg.startswith(p)), None)
        if expected is None or not isinstance(public, expected):
            raise ValueError(f"algorithm {alg} does not fit a {type(public).__name__}")
    return VerificationKey(public, frozenset(spec.algorithms), spec.kid)
