"""The demo page, opened in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from conftest import start_process, start_server, stop

CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: .ci/run installs Debian's chromium when apt-get can"
)
AGENT_EVENTS = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]


def start_chromium(profile: Path) -> tuple[subprocess.Popen[str], str]:
    assert CHROMIUM is not None
    command = [
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
    ]
    proc, match = start_process(
        command, r"DevTools listening on ws://([^/]+)/", what="Chromium", stream="stderr"
    )
    return proc, match.group(1)


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


WAIT_FOR_LOG = """new Promise((resolve) => {
  const log = document.getElementById("log");
  const check = () => {
    const lines = [...log.querySelectorAll("li")].map((li) => li.textContent);
    if (lines.some((line) => line.includes(%s))) { resolve(JSON.stringify(lines)); return true; }
    return false;
  };
  if (!check()) new MutationObserver((_, observer) => check() && observer.disconnect())
    .observe(log, { childList: true });
})"""


class Page:
    """One Chromium page, driven over the DevTools protocol."""

    def __init__(self, cdp: Any) -> None:
        self._cdp = cdp
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        await self._cdp.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._cdp.recv())
            if reply.get("id") == number:
                result: dict[str, Any] = reply.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression``; a promise is awaited in the page."""
        evaluated = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return evaluated.get("result", {}).get("value")

    async def wait_for_log(self, fragment: str) -> list[str]:
        """The page's log lines once one holds ``fragment`` (the page says when: no polling)."""
        async with asyncio.timeout(30):
            lines: list[str] = json.loads(await self.evaluate(WAIT_FOR_LOG % json.dumps(fragment)))
        return lines


@asynccontextmanager
async def open_page(devtools: str, url: str) -> AsyncIterator[Page]:
    async with httpx.AsyncClient() as http:
        targets = (await http.get(f"http://{devtools}/json/list")).json()
    target = next(t for t in targets if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as cdp:
        page = Page(cdp)
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        async with asyncio.timeout(30):
            while (await cdp_event(cdp))["method"] != "Page.loadEventFired":
                pass
            await page.evaluate("window.ready")  # the page's own set-up, done
        yield page


async def cdp_event(cdp: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await cdp.recv())
    return message if "method" in message else {"method": ""}


def test_demo_refresh_keeps_the_pasted_tokens_subject_and_a_refusal_says_why(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--admin-port", "0", env={"WSGATE_ADMIN__API_KEY": "demo-page-test-api-key"}
    )
    chromium, devtools = start_chromium(tmp_path / "profile")
    pasted = server.token("--sub", "carol", "--tenant", "acme")
    try:

        async def scenario() -> tuple[list[str], list[str]]:
            async with open_page(devtools, f"{server.admin}/demo") as page:
                await page.evaluate(f"document.getElementById('token').value = {json.dumps(pasted)}")
                await page.evaluate("document.getElementById('connect').click()")
                await page.wait_for_log("session.ready")
                await page.evaluate("document.getElementById('refresh').click()")
                refreshed = await page.wait_for_log("auth.refreshed")
                await page.evaluate("document.getElementById('close').click()")
                await page.wait_for_log("closed 1000")
                await page.evaluate("document.getElementById('token').value = 'not-a-token'")
                await page.evaluate("document.getElementById('connect').click()")
                refused = await page.wait_for_log("refused:")
                return refreshed, refused

        refreshed, refused = asyncio.run(scenario())
    finally:
        chromium.kill()
        chromium.wait(10)
        stop(server)
    assert not any("4403" in line for line in refreshed)  # the same subject and tenant: refreshed
    assert "closed 1006 " in refused  # all a browser is told about a refused handshake
    assert "refused: 401 malformed token" in refused  # what /auth/check tells it


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
