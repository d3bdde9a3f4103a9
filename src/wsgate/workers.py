"""``wsgate serve --workers N``: N worker processes on one port, and a parent that keeps them.

The parent forks each worker after the settings are loaded (nothing is parsed
twice, and nothing has started yet: no thread, no Trio run). Every worker is a
full gateway listening on the same port with SO_REUSEPORT, so the kernel
spreads connections among them; they meet through the broker (Redis), which is
why more than one worker needs ``cluster.redis_url``. Each has its own admin
listener, on ``admin.port`` plus its number (0, 1, ...), so each can be asked
about itself.

The parent restarts a worker that dies (after a backoff that grows while
workers keep dying; one that refuses to start stops them all, exit status 2),
forwards SIGTERM and SIGINT once to every worker (each drains, clients get
1001), and exits 0 once all have exited 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import attrs
import trio

from .config import Settings

log = logging.getLogger("wsgate.workers")

RESTART_BACKOFF_MAX = 10.0


def worker_settings(settings: Settings, number: int, port: int) -> Settings:
    """A worker's settings: one process, the shared port, its own admin port."""
    admin = settings.admin
    if admin.port:
        admin = attrs.evolve(admin, port=admin.port + number)
    server = attrs.evolve(settings.server, workers=1, port=port, reuse_port=True)
    return attrs.evolve(settings, server=server, admin=admin)


def _port_sharer(host: str) -> socket.socket:
    """A TCP socket for ``host`` whose port other processes may bind too (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _shared_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket holding the port for the workers (so ``--port 0`` picks one for all)."""
    holder = _port_sharer(host)
    holder.bind((host, port))  # bound, never listening: it takes no connection
    return holder, holder.getsockname()[1]


def supervise(settings: Settings, serve: Callable[[Settings], int]) -> int:
    """Run ``serve(worker settings)`` in ``server.workers`` processes until told to stop."""
    holder, port = _shared_port(settings.server.host, settings.server.port)
    stopping = False
    workers: dict[int, int] = {}  # pid: number

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            holder.close()
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent, which forwards it once
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = serve(worker_settings(settings, number, port))
            finally:
                os._exit(code)
        workers[pid] = number

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.warning("%s received: draining every worker", signal.Signals(signum).name)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    failures = 0
    status = 0
    try:
        for number in range(settings.server.workers):
            spawn(number)
        log.info(
            "%d workers on port %d (pids %s)",
            len(workers),
            port,
            " ".join(map(str, workers)),
            extra={"event": "workers.started"},
        )
        while workers:
            pid, wait_status = os.wait()
            number = workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                status = status or (0 if code == 0 else 1)
                continue
            if code == 2:  # it refused to start (and said why): so would every other
                forward(signal.SIGTERM, None)
                status = 2
                continue
            failures += 1
            backoff = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** min(failures, 10))
            log.warning(
                "worker %d (pid %d) exited with %d; restarting in %.1f s",
                number,
                pid,
                code,
                backoff,
                extra={"event": "workers.restart"},
            )
            time.sleep(backoff)
            if not stopping:
                spawn(number)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        holder.close()
    return status


async def reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listener on ``host:port`` that other processes (the other workers) may share."""
    sock = trio.socket.from_stdlib_socket(_port_sharer(host))
    try:
        await sock.bind((host, port))
        sock.listen(trio.socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)
