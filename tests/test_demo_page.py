"""The demo page, opened in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from conftest import start_server, stop

CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: .ci/run installs Debian's chromium when apt-get can"
)
AGENT_EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


def start_chromium(profile: Path) -> tuple[subprocess.Popen[str], str]:
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1000,800",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    pytest.fail("Chromium did not start its DevTools endpoint")


LOG_TYPES = "JSON.stringify([...document.querySelectorAll('#log li')].map(li => li.dataset.type))"


async def drive(devtools: str, page_url: str) -> tuple[list[str], bytes]:
    async with httpx.AsyncClient() as http:
        targets = (await http.get(f"http://{devtools}/json/list")).json()
    page = next(t for t in targets if t["type"] == "page")
    ids = itertools.count(1)
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**26) as cdp:

        async def call(method: str, **params: Any) -> dict[str, Any]:
            number = next(ids)
            await cdp.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                reply = json.loads(await cdp.recv())
                if reply.get("id") == number:
                    result: dict[str, Any] = reply.get("result", {})
                    return result

        await call("Page.navigate", url=page_url)
        types: list[str] = []
        async with asyncio.timeout(30):
            while "agent_completed" not in types:
                await asyncio.sleep(0.2)
                evaluated = await call(
                    "Runtime.evaluate",
                    expression=LOG_TYPES,
                    returnByValue=True,
                )
                types = json.loads(evaluated.get("result", {}).get("value") or "[]")
        shot = await call("Page.captureScreenshot", format="png")
        return types, base64.b64decode(shot["data"])


def test_demo_page_shows_the_five_events(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--admin-port", "0", env={"WSGATE_ADMIN__API_KEY": "demo-page-test-api-key"}
    )
    chromium, devtools = start_chromium(tmp_path / "profile")
    try:
        types, png = asyncio.run(drive(devtools, f"{server.admin}/demo?auto=1"))
        (tmp_path / "demo.png").write_bytes(png)
    finally:
        chromium.kill()
        chromium.wait(10)
        stop(server)
    assert types[0] == "session.ready"
    assert [t for t in types if t in AGENT_EVENTS] == AGENT_EVENTS
    assert (tmp_path / "demo.png").stat().st_size > 1000
