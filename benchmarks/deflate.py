"""Bytes on the wire for a typical agent run, with permessage-deflate and without.

The run (:class:`TypicalAgent`): a thought, a tool call with its arguments and a
result of a few search hits, sixty streamed chunks of an answer, and the
completed answer. A counting TCP proxy between client and server measures what
the server sends; the server's CPU is read around the runs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import websockets

from .proxy import Proxy
from .servers import token

WORDS = [
    "The",
    "gateway",
    "keeps",
    "each",
    "session's",
    "log",
    "bounded,",
    "so",
    "a",
    "client",
    "that",
    "resumes",
    "gets",
    "every",
    "event",
    "once,",
    "in",
    "order,",
    "and",
    "a",
    "run",
    "that",
    "outlives",
    "its",
    "socket",
    "is",
    "never",
    "lost",
    "while",
    "the",
    "window",
    "lasts.",
]


class TypicalAgent:
    async def run(self, ctx: Any, message: str, emit: Any) -> None:
        await emit("agent_started", input=message)
        await emit("agent_thinking", text="Looking up what the documentation says about resuming sessions.")
        await emit("tool_executing", tool="search", args={"query": message, "limit": 5})
        hits = [
            {
                "title": f"Resuming a session, part {i}",
                "url": f"https://docs.example/resume/{i}",
                "snippet": " ".join(WORDS),
            }
            for i in range(5)
        ]
        await emit("tool_completed", tool="search", result={"hits": hits})
        answer = []
        for i in range(60):
            chunk = WORDS[i % len(WORDS)] + " "
            answer.append(chunk)
            await emit("agent_delta", text=chunk)
        await emit("agent_completed", status="ok", output="".join(answer))


async def wire_bytes(server: Any, runs: int) -> dict[str, dict[str, float]]:
    """Per run, with and without compression offered: bytes sent and server CPU µs."""
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    out: dict[str, dict[str, float]] = {}
    for name, compression in (("deflate", "deflate"), ("none", None)):
        proxy = Proxy(port)
        await proxy.start()
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        auth = {"Authorization": f"Bearer {token('deflate-bench')}"}
        cpu = server.cpu_seconds()
        async with websockets.connect(url, additional_headers=auth, compression=compression) as ws:
            await ws.recv()
            before = proxy.down
            for _ in range(runs):
                await ws.send(json.dumps({"type": "user_message", "text": "how do sessions resume?"}))
                while json.loads(await ws.recv())["type"] != "agent_completed":
                    pass
            sent = proxy.down - before
        out[name] = {
            "bytes_per_run": round(sent / runs),
            "cpu_us_per_run": round((server.cpu_seconds() - cpu) / runs * 1e6, 1),
        }
    return out


if __name__ == "__main__":  # pragma: no cover - a manual look
    print("use python -m benchmarks --only deflate", file=sys.stderr)
