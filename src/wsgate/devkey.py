"""The dev-mode HMAC key: generated once, kept in a file only its owner can read."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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
