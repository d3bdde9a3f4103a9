"""The Redis broker's calls under MockClock, with a stand-in for the coredis client: each
call's deadline, and the breaker that makes calls fail at once while Redis keeps failing."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from wsgate.cluster.broker import Reach
from wsgate.cluster.redis import RedisBroker


class Stuck:
    """A client whose every command waits forever (Redis alive but not answering)."""

    def __init__(self) -> None:
        self.calls = 0

    async def publish(self, *args: Any) -> int:
        self.calls += 1
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover


async def test_each_call_has_its_deadline_and_the_breaker_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = RedisBroker("redis://unused", call_timeout=0.5)
    stuck = Stuck()
    broker._client = stuck
    async with trio.open_nursery() as nursery:
        await nursery.start(broker._breaker.run)
        for _ in range(10):  # the breaker's window needs ten calls to judge
            start = trio.current_time()
            reach = await broker.publish((None, "u"), {"n": 1})
            assert reach == Reach(None, "the broker (Redis) did not answer within 0.5 s")
            assert trio.current_time() - start == 0.5
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        reach = await broker.publish((None, "u"), {"n": 2})
        assert reach == Reach(None, "the broker's breaker is open (Redis keeps failing)")
        assert trio.current_time() == start and stuck.calls == 10  # no call made, no wait
        nursery.cancel_scope.cancel()


async def test_without_a_connection_a_call_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    broker = RedisBroker("redis://unused")
    start = trio.current_time()
    assert await broker.publish((None, "u"), {}) == Reach(None, "not connected to the broker (Redis)")
    assert await broker.claim((None, "u"), 3) is None  # the node's own limit holds
    assert broker.stats["limit_fallback"] == 1
    assert trio.current_time() == start
