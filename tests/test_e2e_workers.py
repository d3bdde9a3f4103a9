"""``wsgate serve --workers 2`` on a real redis-server: both workers take connections, one
killed is restarted, and SIGTERM drains both (clients see 1001) before the parent exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from conftest import WSGATE, Redis, data_home, free_port, start_process, until
from wsgate.auth.tokens import mint_token

pytestmark = pytest.mark.slow

SECRET = "workers-test-hmac-secret-0123456789abcdef"
API_KEY = "workers-admin-key-0123456789"


def children(parent: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.add(int(stat.parent.name))
    return found


def open_connections(admin_port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).text
    return int(
        sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("wsgate_connections_open{")
        )
    )


def test_two_workers_share_the_port_are_kept_alive_and_drain_together(tmp_path: Path, redis: Redis) -> None:
    admin = free_port()
    proc, match = start_process(
        [
            *WSGATE,
            "serve",
            "--port",
            "0",
            "--workers",
            "2",
            "--redis-url",
            redis.url,
            "--admin-port",
            str(admin),
        ],
        r"listening on (ws://\S+)",
        what="wsgate serve --workers 2",
        cwd=tmp_path,
        env={
            **os.environ,
            **data_home(tmp_path),
            "WSGATE_AUTH__HMAC_SECRET": SECRET,
            "WSGATE_ADMIN__API_KEY": API_KEY,
        },
    )
    url = match.group(1)
    try:

        async def connect(n: int) -> Any:
            bearer = mint_token(SECRET.encode(), f"user-{n}", now=time.time(), ttl=600)
            ws = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {bearer}"})
            assert json.loads(await ws.recv())["type"] == "session.ready"
            return ws

        def answers(admin_port: int) -> bool:
            try:
                open_connections(admin_port)
            except httpx.HTTPError:
                return False
            return True

        async def main() -> None:
            workers = await until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), "two workers")
            clients = [await connect(n) for n in range(20)]
            per_worker = [open_connections(admin), open_connections(admin + 1)]
            assert sum(per_worker) == 20 and min(per_worker) > 0, per_worker  # both take connections
            # One worker killed: its clients drop, the parent starts another in its place.
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            await until(
                lambda: len(now := children(proc.pid)) == 2 and victim not in now, "a worker in its place"
            )
            # The new worker takes its admin port again (worker 0 was started first).
            await until(lambda: answers(admin + sorted(workers).index(victim)), "its admin listener")
            survivors = []
            for ws in clients:
                try:
                    await ws.send(json.dumps({"type": "ping"}))
                    await asyncio.wait_for(ws.recv(), 5)
                    survivors.append(ws)
                except websockets.ConnectionClosed:
                    pass
            assert 0 < len(survivors) < 20
            survivors.append(await connect(99))
            # SIGTERM to the parent: every worker drains, its clients see 1001.
            proc.send_signal(signal.SIGTERM)
            for ws in survivors:
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.draining"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

        asyncio.run(main())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_workers_without_a_broker_are_refused_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [*WSGATE, "serve", "--port", "0", "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **data_home(tmp_path)},
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "wsgate: config: server.workers: 2 workers need cluster.redis_url"
        " (workers cannot see each other's connections without a broker)"
    )
