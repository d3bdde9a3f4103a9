from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def _pem(private: Any) -> tuple[Any, bytes]:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(scope="session")
def rsa_key() -> tuple[Any, bytes]:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def ec_key() -> tuple[Any, bytes]:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="session")
def ed_key() -> tuple[Any, bytes]:
    return _pem(ed25519.Ed25519PrivateKey.generate())
