"""A drain handed over to the next process on the same port (SO_REUSEPORT): every client
drained with 1001 reconnects after its hint and is admitted by the new process; not one
connection refused, not one handshake left unanswered."""

from __future__ import annotations

import asyncio
import sys

import pytest
from benchmarks.__main__ import WSGATE_ENV, Server, free_port, headers, raise_fd_limit
from benchmarks.storm import storm

pytestmark = pytest.mark.slow


def test_a_drain_hands_every_client_over_to_the_next_process() -> None:
    raise_fd_limit()
    port = free_port()
    command = [sys.executable, "-m", "wsgate", "serve", "--port", str(port), "--app", "noop"]
    env = {**WSGATE_ENV, "WSGATE_SERVER__DRAIN_RECONNECT_JITTER": "2"}
    old = Server("old", command, env)
    result = asyncio.run(storm(old, lambda: Server("new", command, env), 300, headers()))
    assert (result["storm_refused"], result["storm_eof"], result["storm_503"]) == (0, 0, 0), result
    assert result["storm_t99_s"] <= result["storm_hint_max_s"] + 3, result
