"""wsgate.client and ``wsgate connect`` over real sockets against ``wsgate serve``: a run cut
off by a dropped connection resumes; a server killed mid-run and started again on the same
port: the run is reported interrupted, the client reconnects by itself and the next run works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_home, free_port, start_server, stop, until
from wsgate import client as wsclient

pytestmark = pytest.mark.slow

RUN = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


async def test_a_server_killed_mid_run_and_started_again(tmp_path: Path) -> None:
    port = free_port()
    env = {"WSGATE_AGENT__STEP_DELAY": "0.5"}
    server = start_server(tmp_path, "--port", str(port), env=env)
    try:
        url = server.url.replace(":0/", f":{port}/")
        states: list[wsclient.State] = []
        async with wsclient.connect(
            url,
            token=lambda: server.token("--sub", "alice"),
            on_state=lambda s, d: states.append(s),
            backoff_max=1,
        ) as client:
            with pytest.raises(wsclient.RunInterrupted):
                async for event in client.run("first"):
                    if event.type == "agent_thinking":
                        server.proc.kill()  # no drain, no close frame: the process is gone
                        server.proc.wait()
                        server = start_server(tmp_path, "--port", str(port), env=env)
            await until(lambda: client.state is wsclient.State.OPEN, "reconnected")
            assert [e.type async for e in client.run("second")] == RUN
        assert wsclient.State.RECONNECTING in states
    finally:
        stop(server)


def test_wsgate_connect_runs_what_is_typed_and_quits(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"WSGATE_AGENT__STEP_DELAY": "0"})
    try:
        token = server.token("--sub", "operator")
        done = subprocess.run(
            [sys.executable, "-m", "wsgate", "connect", server.url, "--token", token],
            input="hello there\n/ping\n/nonsense\n",
            capture_output=True,
            text=True,
            timeout=30,
            env={**data_home(tmp_path), "PATH": "/usr/bin:/bin"},
        )
        out, err = done.stdout, done.stderr
        assert done.returncode == 0, err
        lines = [line for line in out.splitlines() if line.startswith("< ")]
        kinds = [line.split('"type": "')[1].split('"')[0] for line in lines]
        assert [k for k in kinds if k != "pong"] == RUN and "pong" in kinds
        assert "* open: session s-" in err and "/refresh" in err
        assert token not in out + err  # the token is never printed
    finally:
        stop(server)
