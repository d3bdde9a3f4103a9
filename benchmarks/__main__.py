"""``python -m benchmarks [--quick]``: wsgate against the bare stack and a peer, in one run.

Servers run in their own processes on 127.0.0.1; this process is the client
(the ``websockets`` asyncio client for all three, so the client's cost is the
same on every side of a ratio). Results are printed as a table and written to
``benchmarks/results/latest.json``. Absolute numbers depend on the machine;
the ratios are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

from .auth import ADMIN_API_KEY, FakeAuth, auth_path, outage
from .deflate import wire_bytes
from .fanout import bare_trigger, fanout, publish_trigger
from .inprocess import measure_inprocess
from .plot import plot_outage
from .resume import measure_resume
from .server_instructions import as_results as server_instructions
from .servers import AUDIENCE, ISSUER, SECRET, token
from .storm import storm

ROOT = Path(__file__).resolve().parent.parent
WSGATE_ENV = {
    "WSGATE_AUTH__HMAC_SECRET": SECRET,
    "WSGATE_AUTH__ISSUER": ISSUER,
    "WSGATE_AUTH__AUDIENCE": AUDIENCE,
    "WSGATE_AUTH__POLICY": "local",
    "WSGATE_SERVER__HANDSHAKE_RATE": "1000000",
    "WSGATE_SERVER__HANDSHAKE_BURST": "1000000",
    "WSGATE_SERVER__MAX_PENDING_HANDSHAKES": "1000000",
    "WSGATE_SERVER__MAX_PENDING_HANDSHAKES_PER_ADDRESS": "1000000",
    "WSGATE_SERVER__MESSAGE_RATE": "1000000",
    "WSGATE_SERVER__MESSAGE_BURST": "1000000",
    "WSGATE_SERVER__MAX_CONNECTIONS": "100000",
    "WSGATE_SERVER__MAX_CONNECTIONS_PER_USER": "100000",
    "WSGATE_LOG__LEVEL": "warning",
}


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        port = None
        while port is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} did not start")
            match = re.search(r"port (\d+)|listening on ws://[^:]+:(\d+)", line)
            if match:
                port = int(match.group(1) or match.group(2))
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.admin = ""

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) if match else 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_all() -> dict[str, Server]:
    return {
        "wsgate": Server(
            "wsgate",
            [sys.executable, "-m", "wsgate", "serve", "--port", "0", "--app", "noop"],
            WSGATE_ENV,
        ),
        "bare trio-websocket": Server("bare", [sys.executable, "-m", "benchmarks.servers", "bare"]),
        "websockets + pyjwt": Server("peer", [sys.executable, "-m", "benchmarks.servers", "peer"]),
    }


def headers(subject: str = "bench") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject)}"}


def progress(label: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        if sys.stdout.isatty() or done >= total:
            print(
                f"\r  {label:<42} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                end=end,
                flush=True,
            )

    return show


@dataclass
class Rate:
    """Operations per second, and how many operations that was (for the server's CPU per operation)."""

    per_s: float
    ops: int


async def handshakes(url: str, seconds: float, concurrency: int, show: Callable[[int, int], None]) -> Rate:
    """Handshakes per second: connect, admit, ready message, close."""
    auth = headers()
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with websockets.connect(url, additional_headers=auth, compression=None) as ws:
                await ws.recv()
            done += 1

    start = time.monotonic()
    ticker = asyncio.create_task(_tick(lambda: int(time.monotonic() - start), int(seconds), show))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ticker.cancel()
    show(int(seconds), int(seconds))
    return Rate(done / (time.monotonic() - start), done)


async def _tick(now: Callable[[], int], total: int, show: Callable[[int, int], None]) -> None:
    while True:
        show(min(now(), total), total)
        await asyncio.sleep(0.5)


async def latency(
    url: str, rounds: int, message: str, until: str | None, show: Callable[[int, int], None]
) -> dict[str, float]:
    """Round-trip times in ms: one request, everything up to the terminal reply."""
    samples = []
    async with websockets.connect(url, additional_headers=headers(), compression=None) as ws:
        await ws.recv()
        for i in range(rounds):
            start = time.perf_counter()
            await ws.send(message)
            while True:
                reply = await ws.recv()
                if until is None or until in str(reply):
                    break
            samples.append((time.perf_counter() - start) * 1000)
            if i % 100 == 0:
                show(i, rounds)
    show(rounds, rounds)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1]}


async def throughput(
    url: str, connections: int, messages: int, message: str, show: Callable[[int, int], None]
) -> Rate:
    """Messages per second through request/reply, pipelined per connection."""
    done = 0

    async def one() -> None:
        nonlocal done
        async with websockets.connect(
            url, additional_headers=headers(), compression=None, max_queue=None
        ) as ws:
            await ws.recv()

            async def send() -> None:
                for _ in range(messages):
                    await ws.send(message)

            sender = asyncio.create_task(send())
            for _ in range(messages):
                await ws.recv()
                done += 1
            await sender

    start = time.monotonic()
    ticker = asyncio.create_task(_tick(lambda: done, connections * messages, show))
    await asyncio.gather(*(one() for _ in range(connections)))
    ticker.cancel()
    show(connections * messages, connections * messages)
    return Rate(connections * messages / (time.monotonic() - start), connections * messages)


async def idle_memory(server: Server, count: int, show: Callable[[int, int], None]) -> float:
    """Resident memory per idle authenticated connection, in KiB."""
    before = server.rss_kib()
    held = []
    auth = headers()
    for i in range(count):
        ws = await websockets.connect(
            server.url, additional_headers=auth, compression=None, ping_interval=None
        )
        await ws.recv()
        held.append(ws)
        if i % 200 == 0:
            show(i, count)
    show(count, count)
    await asyncio.sleep(1)
    after = server.rss_kib()
    await asyncio.gather(*(ws.close() for ws in held))
    return (after - before) / count


def breaker_decisions(seconds: float) -> float:
    """Permit + report pairs per second through the breaker actor."""
    import trio

    from wsgate.breaker import Outcome
    from wsgate.breaker_actor import BreakerActor

    async def run() -> float:
        actor = BreakerActor()
        count = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            start = trio.current_time()
            while trio.current_time() - start < seconds:
                permit = await actor.acquire()
                assert permit is not None
                actor.report(permit, Outcome.SUCCESS)
                count += 1
            nursery.cancel_scope.cancel()
        return count / seconds

    return float(trio.run(run))


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def median(values: list[Any]) -> Any:
    """The median of numbers, or of each field of dicts of numbers (latency percentiles)."""
    if isinstance(values[0], dict):
        return {key: statistics.median(v[key] for v in values) for key in values[0]}
    return statistics.median(values)


async def measure(quick: bool, only: list[str], rounds: int) -> dict[str, Any]:
    servers = start_all()
    results: dict[str, Any] = {}
    ping = json.dumps({"type": "ping"})
    run_message = json.dumps({"type": "user_message", "text": "hi"})
    plan: list[tuple[str, Callable[[str, Server], Awaitable[Any]]]] = [
        (
            "handshakes_per_s",
            lambda name, s: handshakes(s.url, 3 if quick else 10, 8, progress(f"handshakes  {name}")),
        ),
        (
            "round_trip",
            lambda name, s: latency(
                s.url,
                300 if quick else 3000,
                run_message if name == "wsgate" else ping,
                "agent_completed" if name == "wsgate" else None,
                progress(f"round trip  {name}"),
            ),
        ),
        (
            "msgs_per_s_1_conn",
            lambda name, s: throughput(
                s.url, 1, 2000 if quick else 20000, ping, progress(f"1 conn      {name}")
            ),
        ),
        (
            "msgs_per_s_100_conns",
            lambda name, s: throughput(
                s.url, 100, 50 if quick else 400, ping, progress(f"100 conns   {name}")
            ),
        ),
        (
            "idle_kib_per_conn_1000",
            lambda name, s: idle_memory(s, 1000, progress(f"1,000 idle  {name}")),
        ),
    ]
    if not quick:
        plan.append(
            (
                "idle_kib_per_conn_10000",
                lambda name, s: idle_memory(s, 10000, progress(f"10,000 idle {name}")),
            )
        )
    plan = [(metric, run) for metric, run in plan if not only or any(o in metric for o in only)]
    samples: dict[str, dict[str, list[Any]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    try:
        # One short untimed pass through each server first: the first round otherwise
        # pays for lazy imports, caches and the allocator's first arenas, on one side more
        # than the other.
        for server in servers.values():
            await handshakes(server.url, 0.5, 8, lambda done, total: None)
            await throughput(server.url, 1, 500, ping, lambda done, total: None)
        for metric, run in plan:
            # Rounds interleave the servers, so a slow spell of the machine hits all of them;
            # the median of each is reported. Idle memory is measured once: a server's RSS
            # does not go back down between rounds.
            for _ in range(1 if metric.startswith("idle") else rounds):
                for name, server in servers.items():
                    before = server.cpu_seconds()
                    value = await run(name, server)
                    if isinstance(value, Rate):
                        per_op = 1e6 * (server.cpu_seconds() - before) / value.ops
                        cpu.setdefault(metric, {}).setdefault(name, []).append(per_op)
                        value = value.per_s
                    samples.setdefault(metric, {}).setdefault(name, []).append(value)
                note_load(metric)
    finally:
        for server in servers.values():
            server.stop()
    for metric, by in samples.items():
        results[metric] = {name: median(values) for name, values in by.items()}
    for metric, by_cpu in cpu.items():
        results[f"cpu_us_per_op_{metric.replace('_per_s', '')}"] = {
            name: median(values) for name, values in by_cpu.items()
        }
    results["samples"] = samples
    if not only or any(o in "breaker_decisions_per_s" for o in only):
        results["breaker_decisions_per_s"] = {"wsgate": breaker_decisions(1 if quick else 5)}
    if not only or any(o in "auth outage" for o in only):
        results.update(await measure_auth(quick))
    if not only or any(o in "upstream" for o in only):
        results.update(await measure_upstream(quick, rounds))
    if (not only or any(o in "cluster workers" for o in only)) and shutil.which("redis-server"):
        results.update(await measure_cluster(quick, rounds))
    if not only or any(o in "resume" for o in only):
        results["resume"] = await resume_wave(200 if quick else 1000)
        note_load("resume")
    if not only or any(o in "storm" for o in only):
        storm_result = results["storm"] = await reconnect_storm(300 if quick else 3000)
        results["storm_failures"] = {"wsgate": storm_result["storm_failures"]}
        results["storm_t99_s"] = {"wsgate": storm_result["storm_t99_s"]}
        note_load("storm")
    if not only or any(o in "deflate" for o in only):
        deflated = results["deflate"] = await deflate_run(50 if quick else 300)
        results["deflate_wire_ratio"] = {"wsgate": deflated["deflate_wire_ratio"]}
        note_load("deflate")
    if not only or any(o in "fanout" for o in only):
        results.update(await measure_fanout(300 if quick else 1000, 10 if quick else 20, rounds))
        note_load("fanout_events_per_s")
        note_load("cpu_us_per_fanout_event")
    if not only or any(o in "instructions" for o in only):
        results.update(await asyncio.to_thread(server_instructions, 50 if quick else 200))
    results["load_average"] = dict(LOADS)
    return results


#: The 1-minute load average as each timed figure was taken (``os.getloadavg``): on a shared
#: machine, a figure taken under load is read with it.
LOADS: dict[str, float] = {}


def note_load(metric: str) -> None:
    LOADS[metric] = max(LOADS.get(metric, 0.0), round(os.getloadavg()[0], 2))


async def reconnect_storm(clients: int) -> dict[str, Any]:
    """Drain one process into the next on the same port (``benchmarks/storm.py``)."""
    port = free_port()
    command = wsgate_command("--app", "noop", port=port)
    old = Server("wsgate (old)", command, WSGATE_ENV)
    return await storm(old, lambda: Server("wsgate (new)", command, WSGATE_ENV), clients, headers())


def wsgate_command(*args: str, port: int = 0) -> list[str]:
    return [sys.executable, "-m", "wsgate", "serve", "--port", str(port), *args]


async def deflate_run(runs: int) -> dict[str, Any]:
    """A typical agent run's bytes on the wire, compressed and not (``benchmarks/deflate.py``)."""
    command = wsgate_command("--app", "benchmarks.deflate:TypicalAgent")
    got: dict[str, Any] = {}
    for name, takeover in (("deflate", "false"), ("deflate, context takeover", "true")):
        server = Server(
            "wsgate", command, {**WSGATE_ENV, "WSGATE_SERVER__DEFLATE_CONTEXT_TAKEOVER": takeover}
        )
        try:
            measured = await wire_bytes(server, runs)
        finally:
            server.stop()
        got[name] = measured["deflate"]
        got["none"] = measured["none"]
    plain = got["none"]["bytes_per_run"]
    return {
        **got,
        "deflate_wire_ratio": round(got["deflate"]["bytes_per_run"] / plain, 3),
        "deflate_takeover_wire_ratio": round(got["deflate, context takeover"]["bytes_per_run"] / plain, 3),
    }


async def measure_fanout(users: int, events: int, rounds: int) -> dict[str, Any]:
    """One push of ``events`` events to ``users`` idle users (``benchmarks/fanout.py``)."""
    admin_port = free_port()
    env = {**WSGATE_ENV, "WSGATE_ADMIN__API_KEY": ADMIN_API_KEY, "WSGATE_SERVER__SEND_QUEUE_MESSAGES": "4096"}
    servers = {
        "wsgate": Server(
            "wsgate",
            wsgate_command("--app", "noop", "--admin-port", str(admin_port)),
            env,
        ),
        "bare trio-websocket": Server("bare", [sys.executable, "-m", "benchmarks.servers", "bare-fanout"]),
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(rounds):
            for name, server in servers.items():
                trigger = (
                    publish_trigger(admin_port, ADMIN_API_KEY, events)
                    if name == "wsgate"
                    else bare_trigger(server.url, events)
                )
                got = await fanout(server, users, events, trigger)
                progress(f"fan-out {users} users  {name}")(1, 1)
                rates[name].append(got["events_per_s"])
                cpu[name].append(got["cpu_us_per_event"])
    finally:
        for server in servers.values():
            server.stop()
    return {
        "fanout_events_per_s": {name: median(values) for name, values in rates.items()},
        "cpu_us_per_fanout_event": {name: median(values) for name, values in cpu.items()},
    }


async def resume_wave(count: int) -> dict[str, Any]:
    """Every session mid-run cut off at once, then resumed (``benchmarks/resume.py``)."""
    server = Server(
        "wsgate",
        [sys.executable, "-m", "wsgate", "serve", "--port", "0"],
        {**WSGATE_ENV, "WSGATE_AGENT__STEP_DELAY": "10"},
    )
    try:
        return await measure_resume(server, count)
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def start_redis() -> tuple[subprocess.Popen[str], int]:
    """A redis-server on 127.0.0.1 and a free port, once it accepts connections."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    redis = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert redis.stdout is not None
    for line in redis.stdout:
        if "Ready to accept" in line:
            break
    return redis, port


async def measure_cluster(quick: bool, rounds: int) -> dict[str, Any]:
    """On one redis-server: handshakes per second with 1 and 2 workers, side by side; and a
    push's latency from one node's /publish to a client of another node."""
    redis, redis_port = start_redis()
    cluster_env = {**WSGATE_ENV, "WSGATE_CLUSTER__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    serve = [sys.executable, "-m", "wsgate", "serve", "--port", "0"]
    out: dict[str, Any] = {}
    try:
        admin_env = {**cluster_env, "WSGATE_ADMIN__API_KEY": ADMIN_API_KEY}
        admins = {1: free_port(), 2: free_port()}
        workers = {
            n: Server(
                f"{n} workers", [*serve, "--workers", str(n), "--admin-port", str(admins[n])], admin_env
            )
            for n in (1, 2)
        }
        try:
            rates: dict[int, list[float]] = {1: [], 2: []}
            pushes: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(rounds):
                for n, server in workers.items():
                    pushes[n].append(await push_rate(server.url, admins[n], 300 if quick else 3000))
                    rate = await handshakes(
                        server.url, 3 if quick else 10, 16, progress(f"handshakes, {n} workers")
                    )
                    rates[n].append(rate.per_s)
            out["cluster_handshakes_per_s"] = {f"{n} workers": median(r) for n, r in rates.items()}
            out["cluster_pushes_per_s"] = {f"{n} workers": median(r) for n, r in pushes.items()}
        finally:
            for server in workers.values():
                server.stop()
        admin_port = free_port()
        a = Server("node a", [*serve, "--admin-port", str(admin_port)], admin_env)
        b = Server("node b", serve, cluster_env)
        try:
            out["cross_node_push"] = await cross_node_push(a, admin_port, b, 200 if quick else 2000)
        finally:
            a.stop()
            b.stop()
    finally:
        redis.terminate()
        redis.wait(15)
    return out


async def push_rate(url: str, admin_port: int, count: int) -> float:
    """Pushes per second from the first worker's /publish (8 at a time) to 20 users, each
    connected once to whichever worker took the connection, until every push arrived."""
    import httpx

    users = [f"user-{n}" for n in range(20)]
    sockets = [await websockets.connect(url, additional_headers=headers(u), compression=None) for u in users]
    for ws in sockets:
        await ws.recv()
    await asyncio.sleep(0.5)  # every worker subscribes to its users' channels
    auth = {"Authorization": f"Bearer {ADMIN_API_KEY}"}
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as admin:

        async def publish(part: range) -> None:
            for n in part:
                body = {"subject": users[n % len(users)], "event": {"n": n}}
                await admin.post("/publish", json=body, headers=auth)

        async def receive(ws: Any, expected: int) -> None:
            for _ in range(expected):
                await ws.recv()

        per_user = [len(range(i, count, len(users))) for i in range(len(users))]
        await asyncio.gather(
            *(publish(range(i, count, 8)) for i in range(8)),
            *(receive(ws, k) for ws, k in zip(sockets, per_user, strict=True)),
        )
    elapsed = time.monotonic() - start
    for ws in sockets:
        await ws.close()
    return count / elapsed


async def cross_node_push(a: Server, admin_port: int, b: Server, count: int) -> dict[str, float]:
    """ms from POST /publish on node A to the event at a client of node B."""
    import httpx

    samples = []
    async with (
        websockets.connect(b.url, additional_headers=headers("pushed"), compression=None) as ws,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as admin,
    ):
        await ws.recv()
        await asyncio.sleep(0.5)  # node B subscribes to the user's channel
        auth = {"Authorization": f"Bearer {ADMIN_API_KEY}"}
        show = progress("cross-node push")
        for n in range(count):
            start = time.perf_counter()
            await admin.post("/publish", json={"subject": "pushed", "event": {"n": n}}, headers=auth)
            await ws.recv()
            samples.append((time.perf_counter() - start) * 1000)
            if n % 100 == 0:
                show(n, count)
        show(count, count)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1]}


async def measure_upstream(quick: bool, rounds: int) -> dict[str, Any]:
    """A run's round trip through the agent service (a Starlette backend streaming the no-op
    agent's five events) against the same run in process, rounds interleaved; and the
    gateway's CPU per event it relays."""
    secret = "benchmark-upstream-secret-0123456789abcdef"
    backend = Server("backend", [sys.executable, "-m", "benchmarks.backend", secret])
    port = backend.url.split(":")[2].split("/")[0]
    upstream_env = {
        **WSGATE_ENV,
        "WSGATE_AGENT__UPSTREAM_URL": f"http://127.0.0.1:{port}/runs",
        "WSGATE_AGENT__UPSTREAM_SECRET": secret,
    }
    serve = [sys.executable, "-m", "wsgate", "serve", "--port", "0"]
    servers = {
        "upstream": Server("upstream", serve, upstream_env),
        "in process": Server("in process", [*serve, "--app", "noop"], WSGATE_ENV),
    }
    run_message = json.dumps({"type": "user_message", "text": "hi"})
    count = 200 if quick else 2000
    trips: dict[str, list[dict[str, float]]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for server in servers.values():  # untimed: warm caches and the backend's pool
            await latency(server.url, 50, run_message, "agent_completed", lambda done, total: None)
        for _ in range(rounds):
            for name, server in servers.items():
                before = server.cpu_seconds()
                trip = await latency(
                    server.url, count, run_message, "agent_completed", progress(f"run {name}")
                )
                cpu.setdefault(name, []).append(1e6 * (server.cpu_seconds() - before) / (count * 5))
                trips.setdefault(name, []).append(trip)
    finally:
        for server in servers.values():
            server.stop()
        backend.stop()
    return {
        "upstream_round_trip": {name: median(values) for name, values in trips.items()},
        "upstream_cpu_us_per_event": {name: median(values) for name, values in cpu.items()},
    }


def wsgate_with_auth(fake: FakeAuth, policy: str) -> Server:
    env = {
        **WSGATE_ENV,
        "WSGATE_AUTH__POLICY": policy,
        "WSGATE_AUTH__INTROSPECTION_URL": f"{fake.url}/introspect",
        "WSGATE_AUTH__CLIENT_AUTH": "none",
        "WSGATE_ADMIN__API_KEY": ADMIN_API_KEY,
        "WSGATE_ADMIN__PORT": "0",
    }
    server = Server(
        f"wsgate {policy}", [sys.executable, "-m", "wsgate", "serve", "--port", "0", "--app", "noop"], env
    )
    assert server.proc.stdout is not None
    match = re.search(r"admin listener on (http://\S+)", server.proc.stdout.readline())
    server.admin = match.group(1) if match else ""
    return server


async def measure_auth(quick: bool) -> dict[str, Any]:
    """Introspection handshakes (cold and warm cache), then the outage run per policy level."""
    out: dict[str, Any] = {}
    fake = FakeAuth()
    try:
        server = wsgate_with_auth(fake, "strict")
        try:
            print("  auth path: cold and warm cache", flush=True)
            rates = await auth_path(server.url, quick)
            out["introspection_handshakes_per_s"] = {
                "wsgate cold": rates["cold_cache"],
                "wsgate warm": rates["warm_cache"],
            }
        finally:
            server.stop()
        clients, down_for = (300, 4.0) if quick else (2000, 10.0)
        for policy in ("strict", "tolerant"):
            fake.control(mode="up")
            server = wsgate_with_auth(fake, policy)
            try:
                print(f"  outage run: {clients} clients, {policy}, service down {down_for:.0f} s", flush=True)
                out[f"outage_{policy}"] = await outage(server.url, server.admin, fake, clients, down_for)
            finally:
                server.stop()
    finally:
        fake.stop()
    return out


def report_outage(results: dict[str, Any]) -> None:
    for key, run in results.items():
        if not key.startswith("outage_"):
            continue
        print(f"{key}: {run['clients']} clients, outcomes {run['outcomes']}, auth calls {run['auth_calls']},")
        revalidated = run["degraded_revalidated_after_s"]
        after = "-" if revalidated is None else f"{revalidated:.1f} s"
        print(
            f"    1011 closes {run['closed_1011']}, degraded re-validated after {after}, "
            f"handshake p99 {run['handshake_p99_s']:.3f} s,"
        )
        print(
            f"    events acknowledged {run['events_acknowledged']} / received {run['events_received']}, "
            f"runs completed {run['runs_completed']} / {run['runs_started']}, seq gaps {run['seq_gaps']}"
        )


def report(results: dict[str, Any], quick: bool) -> None:
    def value(v: Any) -> float:
        return float(v["p50_ms"]) if isinstance(v, dict) else float(v)

    print(
        f"\nwsgate benchmarks ({'quick' if quick else 'full'}) on {platform.node()}, {os.cpu_count()} cores"
    )
    print(f"{'metric':<30}{'wsgate':>12}{'bare trio-ws':>14}{'ws + pyjwt':>12}{'vs bare':>10}{'vs peer':>10}")
    loads = results.get("load_average", {})
    for metric, by in results.items():
        if metric.startswith("outage_") or metric in ("load_average", "storm_failures", "storm_t99_s"):
            continue
        if metric == "deflate_wire_ratio":
            continue
        if metric in loads:
            print(f"{'  (load average ' + format(loads[metric], '.2f') + ')':<30}", end="")
            print()
        if metric in ("cluster_handshakes_per_s", "cluster_pushes_per_s"):
            one, two = by["1 workers"], by["2 workers"]
            label = metric.removeprefix("cluster_").replace("_per_s", "/s") + ", 1 / 2 workers"
            print(f"{label:<30}{one:>12.1f}{two:>14.1f}{'':>12}{two / one:>10.2f}  (2 vs 1)")
            continue
        if metric.startswith("server_instructions_"):
            floor = by["bare trio-websocket"]
            listed = ", ".join(f"{name} {n / 1000:,.0f} k ({n / floor:.2f})" for name, n in by.items())
            print(f"{metric.removeprefix('server_'):<30}{listed}")
            continue
        if metric == "deflate":
            plain = by["none"]
            for name in ("deflate", "deflate, context takeover"):
                on = by[name]
                print(
                    f"{'a typical run, ' + name:<30}{on['bytes_per_run']} bytes on the wire vs"
                    f" {plain['bytes_per_run']} ({on['bytes_per_run'] / plain['bytes_per_run']:.2f});"
                    f" server CPU {on['cpu_us_per_run']:.0f} vs {plain['cpu_us_per_run']:.0f} µs per run"
                )
            continue
        if metric == "storm":
            print(
                f"{'reconnect storm':<30}{by['storm_clients']} clients drained into a new process:"
                f" {by['storm_refused']} refused, {by['storm_eof']} EOF, {by['storm_503']} answered 503;"
                f" 99 % back in {by['storm_t99_s']} s (largest hint {by['storm_hint_max_s']} s);"
                f" {by['storm_old_cpu_us_per_session']} µs of the old process's CPU per session closed"
            )
            continue
        if metric == "resume":
            print(
                f"{'resume wave':<30}{by['resume_recovered']}/{by['resume_sessions']} recovered in"
                f" {by['resume_all_recovered_s']:.2f} s"
                f" (connects alone: {by['resume_connect_wave_s']:.2f} s);"
                f" server CPU {by['resume_cpu_us_per_resume']:.0f} µs per resume,"
                f" {by['resume_cpu_us_per_connect']:.0f} µs per connect"
                f" ({by['resume_cpu_us_per_resume'] / by['resume_cpu_us_per_connect']:.2f}x);"
                f" {by['resume_detached_kib_per_session']:.1f} KiB per detached session"
            )
            continue
        if metric == "cross_node_push":
            print(f"{'cross-node push ms p50 / p99':<30}{by['p50_ms']:>12.2f}{by['p99_ms']:>14.2f}")
            continue
        if metric.startswith("upstream_"):
            upstream, local = value(by["upstream"]), value(by["in process"])
            print(f"{metric:<30}{upstream:>12.2f}{'':>14}{'':>12}{upstream / local:>10.2f}  (vs in process)")
            continue
        if metric == "introspection_handshakes_per_s":
            print(f"{'introspection hs/s cold':<30}{by['wsgate cold']:>12.1f}")
            print(f"{'introspection hs/s warm':<30}{by['wsgate warm']:>12.1f}")
            continue
        ours = by.get("wsgate")
        bare = by.get("bare trio-websocket")
        peer = by.get("websockets + pyjwt")
        cells = [f"{value(x):>12.1f}" if x is not None else f"{'-':>12}" for x in (ours, bare, peer)]
        ratios = [f"{value(ours) / value(x):>10.2f}" if x and ours else f"{'-':>10}" for x in (bare, peer)]
        print(f"{metric:<30}{cells[0]}{cells[1]:>14}{cells[2]}{ratios[0]}{ratios[1]}")
        if isinstance(ours, dict):
            p99 = [f"{x['p99_ms']:.2f}" for x in (ours, bare, peer) if x]
            print(f"{'  (p99 ms)':<30}" + "".join(f"{p:>12}" for p in p99))
    print(
        "round_trip: wsgate is user_message -> agent_completed (no-op agent, 5 events); the others echo once."
    )
    print(
        "upstream_*: the same run relayed from a Starlette backend (p50 ms; gateway CPU µs per relayed"
        " event), against the no-op agent in process."
    )
    report_outage(results)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per measurement, servers interleaved, median reported (default: 1 quick, 3 full)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only the measurements whose name contains NAME (repeatable), e.g. handshakes, "
        "msgs, idle, round_trip, breaker, auth",
    )
    args = parser.parse_args()
    raise_fd_limit()
    rounds = args.rounds or (1 if args.quick else 3)
    results = asyncio.run(measure(args.quick, args.only, rounds))
    if not args.only or any(o in "inproc" for o in args.only):
        results.update(measure_inprocess(args.quick))
    samples = results.pop("samples", {})
    report(results, args.quick)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick,
        "rounds": rounds,
        "only": args.only,
        "results": results,
        "samples": samples,
    }
    (out / "latest.json").write_text(json.dumps(document, indent=2))
    print(f"written to {out / 'latest.json'}")
    if not any(key.startswith("outage_") for key in results):
        return
    if plot_outage(results, out / "outage.png"):
        print(f"plot: {out / 'outage.png'}")
    else:
        print("plot: skipped (pip install -e '.[plot]' for matplotlib)")


if __name__ == "__main__":
    main()
