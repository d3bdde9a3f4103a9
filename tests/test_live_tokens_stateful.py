"""A hypothesis state machine over connect / refresh / advance time / revoke / service down / up.

Invariants: nothing is delivered after ``exp + grace`` unless refreshed, a
connection never changes subject, and no acknowledged event is lost (``seq``
is contiguous). The gateway runs in one Trio run (in a helper thread) on a
``MockClock`` whose time moves only in the ``advance`` rule, deadline by
deadline, so every interleaving is reproducible.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from wsgate.testing import (
    Client,
    ConnectionRejected,
    FakeAuthService,
    GatewayHarness,
    open_harness,
    settings_for_tests,
)

T = TypeVar("T")
GRACE = 2.0
USERS = ["alice", "bob", "carol"]


class TrioThread:
    """One Trio run in a thread, driven step by step from the test thread."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self.harness: GatewayHarness | None = None
        self.fake = FakeAuthService()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(30)
        assert self.harness is not None, self.error

    def _main(self) -> None:
        try:
            trio.run(self._serve, clock=self.clock)
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = settings_for_tests(
            **{
                "auth.expiry_grace": GRACE,
                "auth.introspection_url": self.fake.introspection_url,
                "auth.client_auth": "none",
                "auth.policy": "tolerant",
                "agent.step_delay": 1.0,
            }
        )
        async with (
            self.fake.httpx_client() as http,
            open_harness(config, http=http) as harness,
            trio.open_nursery() as nursery,
        ):
            self.harness, self._nursery = harness, nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def step() -> T:
            result = await fn()
            await trio.testing.wait_all_tasks_blocked()
            return result

        return trio.from_thread.run(step, trio_token=self._token)

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.start_soon, fn, trio_token=self._token)

    def advance(self, seconds: float) -> None:
        async def sleep() -> None:
            await trio.sleep(seconds)

        self.run_with_time(sleep)

    def run_with_time(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Like :meth:`run`, letting time pass (deadline by deadline, in order) meanwhile."""

        async def step() -> T:
            self.clock.autojump_threshold = 0
            try:
                with trio.fail_after(3600):  # a step that never ends is a failure, not a hang
                    return await fn()
            finally:
                self.clock.autojump_threshold = float("inf")

        return self.run(step)

    def close(self) -> None:
        if self._stop is not None and self._token is not None:

            def stop() -> None:
                self.clock.autojump_threshold = 0  # let shutdown's own timeouts elapse
                assert self._stop is not None
                self._stop.set()

            trio.from_thread.run_sync(stop, trio_token=self._token)
        self._thread.join(30)


class Connection:
    """A client whose messages are recorded with the Trio time they arrived."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.client: Client | None = None
        self.log: list[tuple[float, dict[str, Any]]] = []
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.connected = trio.Event()
        self.finished = trio.Event()
        self.rejected = False

    async def run(self, harness: GatewayHarness, token: str) -> None:
        try:
            async with harness.connect(token) as client:
                self.client = client
                self.connected.set()
                _, reason = await self._record(client)
                self.closed_at = trio.current_time()
                self.close_code = reason.code
        except ConnectionRejected:
            self.rejected = True
        finally:
            self.connected.set()
            self.finished.set()

    async def _record(self, client: Client) -> tuple[None, Any]:
        from trio_websocket import ConnectionClosed

        while True:
            try:
                message = await client.receive_json()
            except ConnectionClosed as closed:
                return None, closed.reason
            self.log.append((trio.current_time(), message))

    @property
    def open(self) -> bool:
        return self.client is not None and not self.finished.is_set()


class LiveTokens(RuleBasedStateMachine):
    connections = Bundle("connections")

    def __init__(self) -> None:
        super().__init__()
        self.trio = TrioThread()
        assert self.trio.harness is not None
        self.h: GatewayHarness = self.trio.harness
        self.all: list[Connection] = []
        self.disconnect_times: list[float] = []

    def teardown(self) -> None:
        self.trio.close()

    def _mint(self, user: str, ttl: int) -> str:
        async def mint() -> str:
            return self.h.token(user, ttl=ttl)

        return self.trio.run(mint)

    def _to_trio(self, wall: float) -> float:
        return self.h.gateway.clock.to_trio(wall)

    @rule(target=connections, user=st.sampled_from(USERS), ttl=st.integers(3, 60))
    def connect(self, user: str, ttl: int) -> Any:
        connection = Connection(user)
        token = self._mint(user, ttl)
        self.trio.start_soon(lambda: connection.run(self.h, token))
        self.trio.run_with_time(connection.connected.wait)  # a hanging auth service takes time
        if not connection.rejected and connection.client is not None:
            self.all.append(connection)
        # Into the bundle either way (the other rules skip a connection that is not open):
        # its size must not depend on how the run went, or Hypothesis cannot replay the
        # draws when equal deadlines fire in another order (Trio breaks such ties by id).
        return connection

    @rule(connection=connections, ttl=st.integers(-5, 60), same_subject=st.booleans())
    def refresh(self, connection: Connection, ttl: int, same_subject: bool) -> None:
        if not connection.open or connection.client is None:
            return
        user = connection.user if same_subject else "mallory"
        token = self._mint(user, ttl)
        client = connection.client

        async def send() -> None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await client.send_json({"type": "auth.refresh", "token": token})

        self.trio.run(send)

    @rule(connection=connections)
    def message(self, connection: Connection) -> None:
        if not connection.open or connection.client is None:
            return
        client = connection.client

        async def send() -> None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await client.send_json({"type": "user_message", "text": "hello"})

        self.trio.run(send)

    @rule(seconds=st.floats(0.1, 20))
    def advance(self, seconds: float) -> None:
        self.trio.advance(seconds)

    @rule(user=st.sampled_from(USERS))
    def revoke(self, user: str) -> None:
        async def revoke() -> None:
            self.h.gateway.revoke(subject=user)

        self.trio.run(revoke)

    @rule(mode=st.sampled_from(["up", "down", "hang"]))
    def service(self, mode: str) -> None:
        self.trio.fake.mode = mode

    @rule(connection=consumes(connections))
    def disconnect(self, connection: Connection) -> None:
        if connection.client is None or not connection.open:
            return
        ws = connection.client.ws

        async def close() -> None:
            start = trio.current_time()
            await ws.aclose()
            self.disconnect_times.append(trio.current_time() - start)

        self.trio.run_with_time(close)

    @invariant()
    def nothing_delivered_after_expiry_unless_refreshed(self) -> None:
        now = self.trio.clock.current_time()
        for connection in self.all:
            deadline = None
            for at, message in connection.log:
                if deadline is not None:
                    assert at <= deadline + 1e-9, (connection.user, at, deadline, message)
                if message["type"] in ("session.ready", "auth.refreshed"):
                    deadline = self._to_trio(message["expires_at"]) + GRACE
            if connection.open and deadline is not None:
                assert now <= deadline + 1e-9, "still open after exp + grace"
            if connection.close_code == 4401:
                assert deadline is not None and connection.closed_at is not None
                assert abs(connection.closed_at - deadline) < 1e-6

    @invariant()
    def disconnects_are_prompt(self) -> None:
        assert all(t == 0 for t in self.disconnect_times), self.disconnect_times

    @invariant()
    def a_connection_never_changes_subject(self) -> None:
        sessions = {s.id: s for s in self.h.gateway.registry.all_sessions()}
        for connection in self.all:
            ready = [m for _, m in connection.log if m["type"] == "session.ready"]
            assert [m["subject"] for m in ready] == [connection.user]
            session = sessions.get(ready[0]["session_id"])
            if session is not None:
                assert session.identity.subject == connection.user

    @invariant()
    def no_acknowledged_event_is_lost(self) -> None:
        for connection in self.all:
            seqs = [m["seq"] for _, m in connection.log if m["type"] != "session.ready"]
            assert seqs == list(range(1, len(seqs) + 1))

    @invariant()
    def closed_connections_have_left_the_registry(self) -> None:
        open_connections = sum(1 for c in self.all if c.open)
        assert len(list(self.h.gateway.registry.all_sessions())) == open_connections
        assert len(self.h.gateway.registry) == open_connections


LiveTokens.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLiveTokens = LiveTokens.TestCase
