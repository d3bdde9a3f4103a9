"""Every snippet in the README and docs/ runs as written.

Each fenced block declares what it is, and each kind has a runner here: Python is
run (the README's client against a real dev server, its harness test under pytest
with ``trio_mode``), TOML is loaded as a configuration, shell lines are run where
that is harmless (``wsgate token``) and otherwise checked against the real CLI and
Makefile, HTTP requests to the admin listener go through the admin app, ``ini`` is
the systemd unit (``tests/test_config.py`` verifies it), and ``text`` is output or a
diagram. A block of any other kind fails the test: nothing goes untested unseen.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import data_home, start_server, stop
from wsgate.admin import AdminApp
from wsgate.cli import _parser
from wsgate.configfile import load_settings
from wsgate.errors import ConfigError
from wsgate.httpserver import Request
from wsgate.testing import open_harness, settings_for_tests

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KINDS = {"python", "toml", "sh", "http", "ini", "text"}
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(kind: str | None = None) -> list[tuple[str, str]]:
    """(where, code) of every block of ``kind`` (all blocks when None)."""
    found = []
    for path in DOCS:
        for number, match in enumerate(BLOCK.finditer(path.read_text()), 1):
            if kind is None or match.group(1) == kind:
                found.append((f"{path.relative_to(ROOT)}#{number}:{match.group(1) or '?'}", match.group(2)))
    return found


@pytest.mark.parametrize(("where", "code"), blocks())
def test_every_block_is_of_a_kind_that_is_run(where: str, code: str) -> None:
    assert where.rsplit(":", 1)[1] in KINDS, f"{where}: give the block a kind this test runs"


@pytest.mark.slow
def test_the_readme_client_runs_against_the_dev_server(tmp_path: Path) -> None:
    """As the README says: make serve, then in a second terminal run client.py with a token."""
    client, _ = (code for where, code in blocks("python") if where.startswith("README"))
    server = start_server(tmp_path)
    try:
        (tmp_path / "client.py").write_text(client.replace("ws://127.0.0.1:8765/ws", server.url))
        (command,) = [line for _, code in blocks("sh") for line in code.splitlines() if "client.py" in line]
        assert command == '.venv/bin/python client.py "$(.venv/bin/wsgate token --sub alice)"'
        token = server.token("--sub", "alice")
        run = subprocess.run(
            [sys.executable, "client.py", token], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    finally:
        stop(server)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert json.loads(lines[0])["type"] == "session.ready"
    assert [line.split()[1] for line in lines[1:]] == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ]


def test_the_readme_agent_test_passes_under_pytest_trio(tmp_path: Path) -> None:
    _, harness = (code for where, code in blocks("python") if where.startswith("README"))
    (tmp_path / "test_my_agent.py").write_text(harness)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_agent.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


@pytest.mark.slow
def test_the_upstream_example_serves_through_wsgate(tmp_path: Path) -> None:
    """docs/upstream.md's backend, on uvicorn, behind ``wsgate serve --upstream``."""
    import socket

    from conftest import run_once, start_process

    (backend,) = (code for where, code in blocks("python") if where.startswith("docs/upstream"))
    (tmp_path / "backend.py").write_text(backend)
    lines = [line for _, code in blocks("sh") for line in code.splitlines() if "UPSTREAM_SECRET=" in line]
    secret = lines[0].split("=", 1)[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WSGATE_AGENT__UPSTREAM_SECRET": secret}
    uvicorn, _ = start_process(
        [sys.executable, "-m", "uvicorn", "backend:app", "--port", str(port)],
        "Uvicorn running",
        what="the example backend",
        cwd=tmp_path,
        env=env,
        stream="stderr",
    )
    server = start_server(tmp_path, "--upstream", f"http://127.0.0.1:{port}/runs", env=env)
    try:
        events = run_once(server, "two words")
    finally:
        stop(server)
        uvicorn.terminate()
        uvicorn.communicate(timeout=15)
    assert [e["type"] for e in events] == ["agent_started", "agent_delta", "agent_delta", "agent_completed"]
    assert events[-1]["output"] == "alice, that was 2 words"


def test_no_python_block_goes_unrun() -> None:
    # The three here, and docs/operations.md's embedding (tests/test_apps.py): a new one needs
    # its runner.
    assert len(blocks("python")) == 4


@pytest.mark.parametrize(("where", "code"), blocks("toml"))
def test_toml_blocks_are_valid_configuration(where: str, code: str, tmp_path: Path) -> None:
    config = tmp_path / "snippet.toml"
    config.write_text(code)
    try:
        load_settings(config, env={})
    except ConfigError as error:
        pytest.fail(f"{where}: {error.problems}")


def shell_lines() -> list[tuple[str, str]]:
    lines = []
    for where, code in blocks("sh"):
        for line in code.replace("\\\n", " ").splitlines():
            command = line.split("  #", 1)[0].strip()
            if command:
                lines.append((where, command))
    return lines


@pytest.mark.parametrize(("where", "command"), shell_lines())
def test_shell_lines_name_real_commands_and_options(where: str, command: str, tmp_path: Path) -> None:
    words = shlex.split(command)
    program = words[0].removeprefix(".venv/bin/")
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"{where}: no make target {words[1]}"
    elif program == "wsgate":
        if words[1] == "token":  # harmless: run it, as written
            run = subprocess.run(
                [sys.executable, "-m", "wsgate", *words[1:]],
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, **data_home(tmp_path)},
            )
            assert run.returncode == 0 and run.stdout.count(".") == 2, run.stderr
        else:
            _parser().parse_args(words[1:])  # exits (SystemExit) on an unknown option
    elif program == "python":
        assert words[1] == "client.py"  # run by test_the_readme_client_runs_against_the_dev_server
    elif program == "export":
        name, _, value = words[1].partition("=")
        assert name == "WSGATE_AGENT__UPSTREAM_SECRET" and len(value) >= 32, where
    elif program == "uvicorn":
        assert words[1] == "backend:app"  # run by test_the_upstream_example_serves_through_wsgate
    elif program == "curl":
        method = words[words.index("-X") + 1]
        url = next(w for w in words if w.startswith("http://"))
        body = words[words.index("-d") + 1]
        answer = admin_request(method, url.split("9090", 1)[1], body)
        assert answer == (200, {"closed": 0}), f"{where}: {answer}"
    else:
        pytest.fail(f"{where}: no runner for {program}")


@pytest.mark.parametrize(("where", "code"), blocks("http"))
def test_http_blocks_are_answered_by_the_admin_listener(where: str, code: str) -> None:
    request_line, *headers = code.strip().splitlines()
    method, target, _ = request_line.split()
    assert headers == ["Authorization: Bearer <token>"]
    status, body = admin_request(method, target, "", authorization="Bearer not-a-token")
    assert (status, body) == (200, {"admitted": False, "status": 401, "reason": "malformed token"}), where


def admin_request(method: str, target: str, body: str, *, authorization: str = "") -> tuple[int, object]:
    """One request through the admin app of a test gateway (in-process)."""
    key = "an-admin-key-for-snippets"
    headers = {"authorization": authorization or f"Bearer {key}"}

    async def ask() -> tuple[int, object]:
        async with open_harness(settings_for_tests()) as h:
            response = await AdminApp(h.gateway, key).handle(Request(method, target, headers, body.encode()))
            return response.status, json.loads(response.body)

    return trio.run(ask)


def test_the_configuration_error_example_is_what_wsgate_says() -> None:
    (example,) = [code for where, code in blocks("text") if "wsgate: config:" in code]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={}, overrides={"server.port": "70000"})
    assert example.strip() == f"wsgate: config: {caught.value.problems[0]}"
