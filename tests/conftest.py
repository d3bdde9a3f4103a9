from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
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


def data_home(cwd: Path) -> dict[str, str]:
    """The environment giving a test server in ``cwd`` a per-user data dir of its own (its
    dev key is there), so that no test touches the real one."""
    return {"XDG_DATA_HOME": str(cwd / "data")}


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, cwd: Path, admin: str | None = None) -> None:
        self.proc = proc
        self.url = url
        self.cwd = cwd
        self.admin = admin

    @property
    def dev_key(self) -> Path:
        return self.cwd / "data" / "wsgate" / "dev.key"

    def token(self, *args: str, cwd: Path | None = None) -> str:
        """``wsgate token ARGS``, run in ``cwd`` (default: the server's directory)."""
        out = subprocess.run(
            [sys.executable, "-m", "wsgate", "token", *args],
            cwd=cwd or self.cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, **data_home(self.cwd)},
        )
        return out.stdout.strip()


WSGATE = (sys.executable, "-m", "wsgate")


def start_server(
    cwd: Path, *args: str, env: dict[str, str] | None = None, command: Sequence[str] = WSGATE
) -> Server:
    """Start ``wsgate serve --port 0`` in ``cwd`` and wait for its listening line.

    ``command`` runs instead of ``python -m wsgate`` (it is given ``serve --port 0 ...``).
    """
    proc = subprocess.Popen(
        [*command, "serve", "--port", "0", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **data_home(cwd), **(env or {})},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"listening on (ws://\S+)", line)
        if match:
            admin = None
            if "--admin-port" in args:
                admin_match = re.search(r"admin listener on (http://\S+)", proc.stdout.readline())
                admin = admin_match.group(1) if admin_match else None
            return Server(proc, match.group(1), cwd, admin)
    proc.kill()
    raise AssertionError("server did not start: " + (proc.stderr.read() if proc.stderr else ""))


def stop(server: Server) -> str:
    server.proc.terminate()
    try:
        _, err = server.proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        _, err = server.proc.communicate()
    return err


def start_fake_auth() -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m wsgate.testing.fakeauth`` on 127.0.0.1; returns the process and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsgate.testing.fakeauth"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"on (http://\S+)", line)
    if not match:
        proc.kill()
        raise AssertionError("fake auth service did not start: " + line)
    return proc, match.group(1)


async def recv(ws: Any) -> dict[str, Any]:
    """The next message of a ``websockets`` client, as JSON, within 10 s."""
    async with asyncio.timeout(10):
        message: dict[str, Any] = json.loads(await ws.recv())
    return message
