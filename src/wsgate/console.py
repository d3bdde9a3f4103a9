"""``wsgate connect URL --token T``: an interactive client for operators, on :mod:`wsgate.client`.

Each line typed is sent as a ``user_message``; every event is printed as it comes,
one JSON object a line, prefixed with ``<``. Commands: ``/refresh`` (send
``auth.refresh`` with a token from ``--token`` or ``--token-file``, read again),
``/cancel [RUN_ID]`` (the latest run by default), ``/ping``, ``/quit``. At the
end of the input, the runs under way finish first. The connection's state
changes (reconnecting, resumed) go to standard error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from . import client as wsclient

HELP = "type a message to run it; /refresh, /cancel [RUN_ID], /ping, /quit"


def token_source(token: str | None, token_file: str | None) -> Callable[[], str]:
    """A token for every connect and refresh: the given one, or the file's current content."""
    if token_file is not None:
        path = Path(token_file)
        return lambda: path.read_text().strip()
    assert token is not None
    return lambda: token


class Console:
    def __init__(self, client: wsclient.Client, out: TextIO, err: TextIO) -> None:
        self._client = client
        self._out = out
        self._err = err
        self.last_run: str | None = None

    def show(self, event: wsclient.Event) -> None:
        if event.run_id is not None:
            self.last_run = event.run_id
        print("<", json.dumps(event.fields, ensure_ascii=False), file=self._out, flush=True)

    async def run(self, text: str) -> None:
        try:
            async for event in self._client.run(text):
                self.show(event)
        except wsclient.RunInterrupted as exc:
            print(f"* run interrupted: {exc}", file=self._err, flush=True)

    async def pushes(self) -> None:
        async for event in self._client.events():
            self.show(event)

    async def line(self, line: str, nursery: trio.Nursery) -> bool:
        """Act on one typed line; False to quit."""
        line = line.strip()
        if not line:
            return True
        if line == "/quit":
            return False
        if line == "/refresh":
            await self._client.refresh()
        elif line == "/ping":
            await self._client.send({"type": "ping", "id": "console"})
        elif line.startswith("/cancel"):
            run_id = line.removeprefix("/cancel").strip() or self.last_run
            if run_id is None:
                print("* no run to cancel", file=self._err, flush=True)
            else:
                await self._client.cancel(run_id)
        elif line.startswith("/"):
            print(f"* {HELP}", file=self._err, flush=True)
        else:
            nursery.start_soon(self.run, line)
        return True


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while chunk := await stream.receive_some(65536):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")
    if buffer:
        yield buffer.decode(errors="replace")


async def console(
    url: str, token: Callable[[], str], *, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    def state(new: wsclient.State, detail: dict[str, Any]) -> None:
        if new is wsclient.State.RECONNECTING:
            print(f"* reconnecting in {detail['delay']:.1f} s", file=err, flush=True)
        elif new is wsclient.State.OPEN:
            resumed = " (resumed)" if detail.get("resumed") else ""
            print(f"* open: session {detail.get('session_id')}{resumed}; {HELP}", file=err, flush=True)
        else:
            print(f"* closed: {detail.get('reason')}", file=err, flush=True)

    try:
        async with (
            wsclient.connect(url, token=token, on_state=state) as client,
            trio.open_nursery() as nursery,
        ):
            shell = Console(client, out, err)
            nursery.start_soon(shell.pushes)
            async with trio.open_nursery() as runs:  # at the end of the input, runs finish first
                async for line in _lines(trio.lowlevel.FdStream(sys.stdin.fileno())):
                    if not await shell.line(line, runs):
                        runs.cancel_scope.cancel()
                        break
            nursery.cancel_scope.cancel()
    except wsclient.ClientClosed as closed:
        print(f"wsgate connect: {closed}", file=err, flush=True)
        return 1
    return 0
