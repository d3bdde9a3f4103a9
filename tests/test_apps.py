"""Your own agent: ``--app module:attribute``, each refusal's one line, and ``wsgate.run``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import WSGATE, data_home, run_once, start_process, start_server, stop
from test_snippets import blocks
from wsgate.apps import load_agent
from wsgate.errors import StartupError

AGENTS = """
class Shout:
    async def run(self, ctx, message, emit):
        await emit("agent_started")
        await emit("agent_completed", status="ok", output=message.upper())


shout = Shout()


def make():
    return Shout()


def broken():
    raise RuntimeError("no model configured")


not_an_agent = 42


class NoRun:
    pass
"""


@pytest.fixture
def agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_agents.py").write_text(AGENTS)
    (tmp_path / "explodes.py").write_text("raise ImportError('a dependency is missing')\n")
    (tmp_path / "fails.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_agents", raising=False)
    return tmp_path


@pytest.mark.parametrize("reference", ["my_agents:shout", "my_agents:Shout", "my_agents:make"])
def test_an_agent_a_class_or_a_factory_is_loaded(agents: Path, reference: str) -> None:
    agent = load_agent(reference)
    assert type(agent).__name__ == "Shout"


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module:x", "agent.app: cannot import 'no_such_module' (No module named 'no_such_module')"),
        ("explodes:x", "agent.app: cannot import 'explodes' (a dependency is missing)"),
        ("fails:x", "agent.app: importing 'fails' failed: ZeroDivisionError: division by zero"),
        ("my_agents:missing", "agent.app: module 'my_agents' has no attribute 'missing'"),
        (
            "my_agents:not_an_agent",
            "agent.app: my_agents:not_an_agent is not an agent (an object with async def run(ctx,"
            " message, emit), or a class or factory that returns one)",
        ),
        (
            "my_agents:NoRun",
            "agent.app: my_agents:NoRun is not an agent (an object with async def run(ctx,"
            " message, emit), or a class or factory that returns one)",
        ),
        (
            "my_agents:broken",
            "agent.app: my_agents:broken is not an agent, and calling it with no arguments failed:"
            " RuntimeError: no model configured",
        ),
    ],
)
def test_each_bad_reference_is_refused_naming_the_setting(agents: Path, reference: str, message: str) -> None:
    with pytest.raises(StartupError) as refused:
        load_agent(reference)
    assert str(refused.value) == message


@pytest.mark.slow
def test_wsgate_serve_app_serves_your_agent_and_refuses_a_bad_one_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "my_agents.py").write_text(AGENTS)
    server = start_server(tmp_path, "--app", "my_agents:Shout")
    try:
        events = run_once(server, "hi")
    finally:
        stop(server)
    assert events[-1]["output"] == "HI"
    env = {**os.environ, **data_home(tmp_path)}
    for app, line in [
        ("my_agents:missing", "wsgate: agent.app: module 'my_agents' has no attribute 'missing'"),
        (
            "not a reference",
            "wsgate: config: agent.app: must be demo, echo, noop or a module:attribute reference"
            " (got 'not a reference')",
        ),
    ]:
        run = subprocess.run(
            [*WSGATE, "serve", "--port", "0", "--app", app],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert run.returncode == 2
        assert run.stderr.strip().splitlines() == [line]


@pytest.mark.slow
@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_wsgate_run_logs_drains_on_a_signal_and_exits_cleanly(
    tmp_path: Path, stop_with: signal.Signals
) -> None:
    """docs/operations.md's embedding example, as written."""
    (embed,) = (code for where, code in blocks("python") if where.startswith("docs/operations"))
    (tmp_path / "embed.py").write_text(embed)
    proc, match = start_process(
        [sys.executable, "embed.py"],
        r"listening on (ws://\S+)",
        what="the embedded gateway",
        cwd=tmp_path,
        env={**os.environ, **data_home(tmp_path), "WSGATE_SERVER__PORT": "0"},
    )
    assert proc.stdout is not None
    token = next(line.strip() for line in proc.stdout if line.count(".") == 2 and " " not in line.strip())

    async def main() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with websockets.connect(match.group(1), additional_headers=headers) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "user_message", "text": "embedded"}))
            done: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            proc.send_signal(stop_with)
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.draining"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # drained
            return done

    done = asyncio.run(main())
    _, err = proc.communicate(timeout=30)
    assert done["output"] == "EMBEDDED"
    assert proc.returncode == 0
    assert f"{stop_with.name} received: draining" in err  # it logs, as wsgate serve does
    assert "session opened" in err
    assert "Traceback" not in err
