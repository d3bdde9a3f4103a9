"""The dev-mode HMAC key: generated once, kept in a file only its owner can read.

Its place does not depend on where a command runs: ``dev.key_file`` when set, else
``$XDG_DATA_HOME/wsgate/dev.key`` (``~/.local/share/wsgate/dev.key``), so that
``wsgate token`` run anywhere signs with the key ``wsgate serve`` uses.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .tokens import mint_token


def dev_key_path(key_file: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Where the dev key is: ``key_file``, or the per-user default."""
    if key_file:
        return Path(key_file).expanduser()
    env = os.environ if env is None else env
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "wsgate" / "dev.key"


def load_dev_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the dev key at ``path``, creating it (mode 0600) on first use."""
    key_path = Path(path)
    try:
        secret = key_path.read_bytes().strip()
    except FileNotFoundError:
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = secrets.token_hex(32).encode()
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_dev_secret(key_path)
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
    if len(secret) < 32:
        raise ValueError(f"dev.key_file: {key_path} holds a key shorter than 32 bytes")
    return secret


@attrs.frozen
class DevTokens:
    """Mints tokens that a dev-mode gateway accepts, signed with its dev key."""

    secret: bytes = attrs.field(repr=False)
    path: Path
    issuer: str
    audience: str
    now: Callable[[], float]

    def mint(self, subject: str, ttl: float = 900.0, scopes: tuple[str, ...] = (), **claims: Any) -> str:
        """A token for ``subject`` (with a random ``jti``)."""
        return mint_token(
            self.secret,
            subject,
            now=self.now(),
            ttl=ttl,
            issuer=self.issuer,
            audience=self.audience,
            scopes=scopes,
            jti=secrets.token_hex(8),
            **claims,
        )
