"""Helpers for deterministic tests of wsgate and of applications built on it.

Everything here runs client and server over in-memory streams in one Trio run,
so ``trio.testing.MockClock(autojump_threshold=0)`` drives every deadline::

    async def test_golden_path(autojump_clock):
        async with open_harness() as h, h.connect(h.token("alice")) as client:
            ready = await client.receive_json()
            events = await client.run("hi")
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import trio
import trio.testing
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)

from ..agent import Agent
from ..auth.tokens import mint_token
from ..clock import WallClock
from ..cluster.sessions import SessionStore
from ..config import Settings
from ..configfile import load_settings
from ..errors import leaves
from ..server import Gateway, open_gateway
from ..wsconn import wrap_client_stream
from .fakeauth import FakeAuthService
from .store import MemorySessions, SharedSessions

TEST_SECRET = b"wsgate-testing-secret-not-for-production-use"
TEST_ISSUER = "https://issuer.test"
TEST_AUDIENCE = "wsgate"
#: The wall-clock time a test gateway starts at, so tokens are reproducible.
TEST_EPOCH = 1_800_000_000.0

__all__ = [
    "TEST_AUDIENCE",
    "TEST_EPOCH",
    "TEST_ISSUER",
    "TEST_SECRET",
    "Client",
    "ConnectionRejected",
    "FakeAuthService",
    "GatewayHarness",
    "MemorySessions",
    "SharedSessions",
    "open_harness",
    "settings_for_tests",
]


def settings_for_tests(**overrides: Any) -> Settings:
    """Settings with a test HMAC key, issuer and audience; ``overrides`` use dotted names.

    ``settings_for_tests(**{"server.handshake_timeout": 2})``
    """
    base: dict[str, Any] = {
        "auth.hmac_secret": TEST_SECRET.decode(),
        "auth.issuer": TEST_ISSUER,
        "auth.audience": TEST_AUDIENCE,
        "auth.leeway": 0.0,
        "dev.enabled": False,
        "agent.step_delay": 0.1,
        # Every in-memory client shares one "address"; tests of the rate limit set their own.
        "server.handshake_rate": 1e9,
        "server.handshake_burst": 1_000_000,
        "server.max_pending_handshakes_per_address": 1_000_000,
        "server.max_pending_handshakes": 1_000_000,
    }
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


class Client:
    """The client side of one in-memory WebSocket, speaking JSON."""

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream | None = None) -> None:
        self.ws = ws
        self._stream = stream

    async def drop(self) -> None:
        """Cut the connection as a network does: no close frame, the stream just ends."""
        assert self._stream is not None, "a client of GatewayHarness.connect"
        await trio.aclose_forcefully(self._stream)

    async def resume(self, ready: Mapping[str, Any], last_seq: int) -> dict[str, Any]:
        """Ask to resume the session of ``ready`` (a ``session.ready`` or ``session.resumed``);
        the ``session.resumed`` answer."""
        await self.send_json(
            {
                "type": "session.resume",
                "session_id": ready["session_id"],
                "resume_token": ready["resume_token"],
                "last_seq": last_seq,
            }
        )
        return await self.receive_json()

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def send_json(self, message: Mapping[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def send_text(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def receive_json(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.ws.get_message())
        return message

    async def receive_until(self, *types: str) -> list[dict[str, Any]]:
        """Receive messages up to and including the first whose type is one of ``types``."""
        received = []
        while True:
            message = await self.receive_json()
            received.append(message)
            if message["type"] in types:
                return received

    async def run(self, text: str) -> list[dict[str, Any]]:
        """Send a ``user_message`` and return everything up to its ``agent_completed``."""
        await self.send_json({"type": "user_message", "text": text})
        return await self.receive_until("agent_completed")

    async def wait_closed(self) -> tuple[list[dict[str, Any]], CloseReason]:
        """Receive until the server closes; return what arrived and the close reason."""
        received = []
        while True:
            try:
                received.append(await self.receive_json())
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return received, closed.reason


def _unwrap(group: BaseExceptionGroup[Any]) -> BaseException:
    errors = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
    return errors[0] if len(errors) == 1 else group


class GatewayHarness:
    """A running gateway plus ways to reach it over in-memory streams."""

    def __init__(self, gateway: Gateway, nursery: trio.Nursery, secret: bytes) -> None:
        self._streams: dict[WebSocketConnection, trio.abc.Stream] = {}
        self.gateway = gateway
        self.nursery = nursery
        self.secret = secret

    def now(self) -> float:
        return self.gateway.clock.now()

    def token(
        self, subject: str = "alice", *, ttl: float = 900.0, scopes: Sequence[str] = (), **claims: Any
    ) -> str:
        """A token the gateway accepts (unless ``claims`` say otherwise)."""
        claims.setdefault("iss", TEST_ISSUER)
        claims.setdefault("aud", TEST_AUDIENCE)
        return mint_token(self.secret, subject, now=self.now(), ttl=ttl, scopes=scopes, **claims)

    def open_stream(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A raw client stream whose other end the gateway serves.

        ``lockstep``: no buffering, so a client that stops reading blocks the server's writes
        (as a full TCP window does).
        """
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self.nursery.start_soon(self.gateway.handle_stream, server)
        return client

    @asynccontextmanager
    async def connect(self, token: str | None = None, **options: Any) -> AsyncIterator[Client]:
        """Open a WebSocket to the gateway (``options``: :meth:`websocket`'s), as a JSON
        :class:`Client`; a refusal raises ``ConnectionRejected``."""
        async with self.websocket(token, **options) as ws:
            yield Client(ws, self._streams[ws])

    @asynccontextmanager
    async def websocket(
        self,
        token: str | None = None,
        *,
        via: str = "header",
        path: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        subprotocols: Sequence[str] | None = None,
        lockstep: bool = False,
    ) -> AsyncIterator[WebSocketConnection]:
        """A WebSocket to the gateway, over an in-memory stream (:meth:`cut` drops it): the
        token ``via`` the header or the subprotocol, extra ``headers``, ``lockstep`` for a
        stream with no buffer (a client that stops reading blocks the server's writes)."""
        extra = list(headers)
        protocols = list(subprotocols) if subprotocols is not None else []
        if token is not None and via == "header":
            extra.append((b"Authorization", f"Bearer {token}".encode()))
        elif token is not None and via == "subprotocol":
            protocols += ["wsgate.v1", f"bearer.{token}"]
        stream = self.open_stream(lockstep=lockstep)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(60):  # a test must never hang on a silent gateway
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        "wsgate.test",
                        path or self.gateway.settings.server.path,
                        subprotocols=protocols,
                        extra_headers=extra,
                        max_message_size=1 << 22,
                    )
                self._streams[ws] = stream
                try:
                    yield ws
                finally:
                    del self._streams[ws]
                    with trio.move_on_after(5) as cleanup:
                        cleanup.shield = True
                        await ws.aclose()
                    # Let the reader finish the close handshake (another task may be
                    # closing too), but never wait long for it.
                    nursery.cancel_scope.deadline = min(
                        nursery.cancel_scope.deadline, trio.current_time() + 5
                    )
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            await trio.aclose_forcefully(stream)

    def opener(self, url: str, token: str) -> AbstractAsyncContextManager[WebSocketConnection]:
        """For :func:`wsgate.client.connect`: its connections, to this gateway in memory."""
        return self.websocket(token)

    async def cut(self) -> None:
        """Drop every open connection of this harness's clients, as a network does."""
        for stream in list(self._streams.values()):
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_harness(
    settings: Settings | None = None,
    *,
    agent: Agent | None = None,
    secret: bytes = TEST_SECRET,
    epoch: float = TEST_EPOCH,
    http: httpx.AsyncClient | None = None,
    seed: int = 0,
    session_store: SessionStore | None = None,
) -> AsyncIterator[GatewayHarness]:
    """Run a gateway for the duration of the block (see :func:`settings_for_tests`).

    Its randomness (session ids, retry jitter, reconnect hints) is seeded with ``seed``, so a run under
    ``MockClock`` is reproduced exactly. ``session_store``: detached sessions kept beyond this
    gateway (:class:`SharedSessions`), so another harness can resume them, as with Redis.
    """
    async with (
        trio.open_nursery() as nursery,
        open_gateway(
            settings or settings_for_tests(),
            agent=agent,
            clock=WallClock(epoch),
            http=http,
            rng=random.Random(seed),
            session_store=session_store,
        ) as gateway,
    ):
        yield GatewayHarness(gateway, nursery, secret)
        nursery.cancel_scope.cancel()
