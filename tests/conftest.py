from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from wsgate.testing import GatewayHarness


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


def start_process(
    command: Sequence[str],
    pattern: str,
    *,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stream: str = "stdout",
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start ``command`` and read its ``stream`` line by line until ``pattern`` matches
    (within 30 s); the one way the tests start a server of their own. Raises
    AssertionError, with what the process printed, when it does not."""
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = proc.stdout if stream == "stdout" else proc.stderr
    assert lines is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = lines.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return proc, match
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"{what} did not start: {err[-2000:]}")


def start_server(
    cwd: Path, *args: str, env: dict[str, str] | None = None, command: Sequence[str] = WSGATE
) -> Server:
    """Start ``wsgate serve --port 0`` in ``cwd`` and wait for its listening line.

    ``command`` runs instead of ``python -m wsgate`` (it is given ``serve --port 0 ...``).
    """
    proc, match = start_process(
        [*command, "serve", "--port", "0", *args],
        r"listening on (ws://\S+)",
        what="wsgate serve",
        cwd=cwd,
        env={**os.environ, **data_home(cwd), **(env or {})},
    )
    admin = None
    if "--admin-port" in args:
        assert proc.stdout is not None
        admin_match = re.search(r"admin listener on (http://\S+)", proc.stdout.readline())
        admin = admin_match.group(1) if admin_match else None
    return Server(proc, match.group(1), cwd, admin)


def cluster_node(root: Path, name: str, redis: Redis, *args: str, env: dict[str, str]) -> Server:
    """``wsgate serve`` in ``root / name``, a node on ``redis``."""
    (root / name).mkdir(exist_ok=True)
    return start_server(root / name, "--redis-url", redis.url, *args, env=env)


def run_once(server: Server, text: str, subject: str = "alice") -> list[dict[str, Any]]:
    """One run over loopback with the ``websockets`` client: a token for ``subject`` from
    ``wsgate token``, a connection, ``text`` sent, and its events up to ``agent_completed``."""
    import websockets

    token = server.token("--sub", subject)

    async def main() -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with websockets.connect(server.url, additional_headers=headers) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 15))["type"] == "session.ready"
            await ws.send(json.dumps({"type": "user_message", "text": text}))
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] != "agent_completed":
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
            return events

    return asyncio.run(main())


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
    proc, match = start_process(
        [sys.executable, "-m", "wsgate.testing.fakeauth"], r"on (http://\S+)", what="the fake auth service"
    )
    return proc, match.group(1)


def gateway_state(h: GatewayHarness) -> dict[str, Any]:
    """What must be the same before a client comes and after it has gone: leases, users,
    pending handshakes, and the open-connection gauges the metrics report."""
    gauges = [
        line
        for line in h.gateway.metrics.exposition().decode().splitlines()
        if line.startswith("wsgate_connections_open{")
    ]
    return {
        "leases": len(h.gateway.registry),
        "users": h.gateway.registry.users,
        "pending": len(h.gateway.connections.pending),
        "connections_open": gauges,
    }


async def recv(ws: Any) -> dict[str, Any]:
    """The next message of a ``websockets`` client, as JSON, within 10 s."""
    async with asyncio.timeout(10):
        message: dict[str, Any] = json.loads(await ws.recv())
    return message


class Redis:
    """A real ``redis-server`` on 127.0.0.1 and a free port, with a temp dir of its own; it
    can be killed and started again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc, _ = start_process(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)),
                *("--save", "", "--appendonly", "no"),
            ],
            r"Ready to accept connections",
            what="redis-server",
        )

    async def query(self, command: str, *args: Any) -> Any:
        """One command, on a connection of its own (under asyncio or Trio alike)."""
        import coredis

        async with coredis.Redis.from_url(self.url) as client:
            return await getattr(client, command)(*args)

    async def subscribers(self, key: tuple[str | None, str]) -> int:
        """How many nodes follow this user's pushes."""
        from wsgate.cluster.broker import user_channel

        channel = user_channel(key)
        counts = await self.query("pubsub_numsub", channel)
        return int(counts[channel.encode()])

    async def places(self, key: tuple[str | None, str]) -> int:
        """How many of this user's places in the per-user limit are held, on every node."""
        from wsgate.cluster.redis import lease_key

        return int(await self.query("zcard", lease_key(key)))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.communicate(timeout=15)
            self.proc = None


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    """A redis-server of the test's own, stopped at the end (skipped when none is installed)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's package)")
    (tmp_path / "redis").mkdir()
    server = Redis(tmp_path / "redis")
    yield server
    server.stop()


async def until(check: Callable[[], Any], what: str, *, within: float = 10.0) -> Any:
    """``check()`` (awaited, if it is a coroutine) once it is truthy: for the state of another
    process (a node subscribed, a worker restarted, a place given back), which a test cannot
    be told of and asks about again every 50 ms, for at most ``within`` seconds. Runs under
    asyncio and Trio alike."""
    import anyio

    deadline = time.monotonic() + within
    for _ in itertools.count():
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        await anyio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within:g} s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
