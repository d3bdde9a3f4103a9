"""The demo page, opened in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from benchmarks.proxy import Proxy

from conftest import start_process, start_server, stop

CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: .ci/run installs Debian's chromium when apt-get can"
)


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


CHAT_AGENT = """
import trio


class StreamingAgent:
    async def run(self, ctx, message, emit):
        await emit("agent_started")
        await emit("tool_executing", tool="lookup", args={"q": message})
        await trio.sleep(1.5)
        await emit("tool_completed", tool="lookup", result={"hits": 2})
        for word in ["Hello", " from", " the", " agent."]:
            await emit("agent_delta", text=word)
            await trio.sleep(0.1)
        await emit("agent_completed", status="ok")
"""
CHAT_EVENTS = ["agent_started", "tool_executing", "tool_completed", *["agent_delta"] * 4, "agent_completed"]
CHAT = "JSON.stringify([...document.querySelectorAll('#chat li')].map(li => [li.className, li.innerText]))"
SEQS = """JSON.stringify([...document.querySelectorAll('#log li')]
  .map(li => [li.dataset.type, li.textContent]).filter(([, text]) => text.startsWith('#')))"""


def chat_server(tmp_path: Path) -> Any:
    (tmp_path / "chat_agent.py").write_text(CHAT_AGENT)
    return start_server(
        tmp_path,
        "--admin-port",
        "0",
        "--app",
        "chat_agent:StreamingAgent",
        env={"WSGATE_ADMIN__API_KEY": "demo-page-test-api-key"},
    )


def numbered(pairs: list[list[str]]) -> tuple[list[str], list[int]]:
    """The agent events of the page's message log, and their seq, in the order shown."""
    events = [(kind, int(text.split()[0][1:])) for kind, text in pairs if kind in set(CHAT_EVENTS)]
    return [kind for kind, _ in events], [seq for _, seq in events]


def test_the_chat_streams_the_answer_and_shows_the_tool_call(tmp_path: Path) -> None:
    server = chat_server(tmp_path)
    chromium, devtools = start_chromium(tmp_path / "profile")
    try:

        async def scenario() -> tuple[Any, Any, bytes]:
            async with open_page(devtools, f"{server.admin}/demo?auto=1") as page:
                running = await page.wait_for_log("tool_executing")
                chat = json.loads(await page.evaluate(CHAT))
                assert chat[1][0] == "assistant" and "tool lookup" in chat[1][1], running
                await page.wait_for_log("agent_completed")
                shot = await page.call("Page.captureScreenshot", format="png")
                return (
                    json.loads(await page.evaluate(CHAT)),
                    json.loads(await page.evaluate(SEQS)),
                    base64.b64decode(shot["data"]),
                )

        chat, pairs, png = asyncio.run(scenario())
    finally:
        chromium.kill()
        chromium.wait(10)
        stop(server)
    (tmp_path / "chat.png").write_bytes(png)
    screenshot = os.environ.get("CHAT_SCREENSHOT")  # docs/chat.png is made this way
    if screenshot:
        Path(screenshot).write_bytes(png)
    assert chat[0] == ["user", "hello from the browser"]
    assert chat[1][0] == "assistant"
    assert 'tool lookup({"q":"hello from the browser"}) → {"hits":2}' in chat[1][1]
    assert chat[1][1].endswith("Hello from the agent.")  # the deltas, as they came
    kinds, seqs = numbered(pairs)
    assert kinds == CHAT_EVENTS and seqs == list(range(1, len(CHAT_EVENTS) + 1))
    assert len(png) > 1000


def test_a_run_cut_off_by_a_dropped_connection_is_resumed_in_the_page_with_every_event_once(
    tmp_path: Path,
) -> None:
    server = chat_server(tmp_path)
    chromium, devtools = start_chromium(tmp_path / "profile")
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    try:

        async def scenario() -> tuple[Any, Any, str]:
            proxy = Proxy(port)
            await proxy.start()
            url = f"ws://127.0.0.1:{proxy.port}/ws"
            async with open_page(devtools, f"{server.admin}/demo?auto=1&url={url}") as page:
                await page.wait_for_log("tool_executing")
                proxy.cut()  # mid-tool: the browser sees 1006, the gateway a dropped connection
                await page.wait_for_log("resumed")
                await page.wait_for_log("agent_completed")
                status = await page.evaluate("document.getElementById('status').textContent")
                return json.loads(await page.evaluate(CHAT)), json.loads(await page.evaluate(SEQS)), status

        chat, pairs, status = asyncio.run(scenario())
    finally:
        chromium.kill()
        chromium.wait(10)
        stop(server)
    kinds, seqs = numbered(pairs)
    assert kinds == CHAT_EVENTS and seqs == list(range(1, len(CHAT_EVENTS) + 1))  # once each, in order
    assert chat[1][1].endswith("Hello from the agent.") and status == "open (resumed)"
