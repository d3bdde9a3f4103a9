"""The Redis broker's calls under MockClock, with a stand-in for the coredis client: each
call's deadline, and the breaker that makes calls fail at once while Redis keeps failing."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from wsgate.cluster.broker import Audience, Reach
from wsgate.cluster.redis import CLAIM, RENEW, RedisBroker
from wsgate.errors import TooManyRequests


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
            reach = await broker.publish(Audience(("u",)), [{"n": 1}])
            assert reach == Reach(None, "the broker (Redis) did not answer within 0.5 s")
            assert trio.current_time() - start == 0.5
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        reach = await broker.publish(Audience(("u",)), [{"n": 2}])
        assert reach == Reach(None, "the broker's breaker is open (Redis keeps failing)")
        assert trio.current_time() == start and stuck.calls == 10  # no call made, no wait
        nursery.cancel_scope.cancel()


async def test_without_a_connection_a_call_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    broker = RedisBroker("redis://unused")
    start = trio.current_time()
    assert await broker.publish(Audience(("u",)), [{}]) == Reach(None, "not connected to the broker (Redis)")
    assert await broker.claim((None, "u"), 3) is None  # the node's own limit holds
    assert broker.stats["limit_fallback"] == 1
    assert trio.current_time() == start


class Leases:
    """Redis' side of the lease scripts, on Trio's clock: each user's places, by expiry."""

    def __init__(self) -> None:
        self.places: dict[str, dict[str, float]] = {}

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> int:
        now = trio.current_time()
        places = self.places.setdefault(keys[0], {})
        for member, expiry in list(places.items()):
            if expiry <= now:
                del places[member]
        if script == CLAIM:
            if len(places) >= int(args[0]):
                return 0
            places[str(args[2])] = now + float(args[1])
        else:
            assert script == RENEW
            for member in args[1:]:
                if member in places:
                    places[member] = now + float(args[0])
        return 1

    async def zrem(self, key: str, members: list[str]) -> int:
        places = self.places.get(key, {})
        return sum(places.pop(m, None) is not None for m in members)

    async def set(self, key: str, value: str, *, px: int) -> bool:
        self.places.setdefault("nodes", {})[key] = trio.current_time() + px / 1000
        return True


async def test_a_nodes_leases_live_while_it_renews_them_and_expire_when_it_dies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    redis = Leases()
    alive, other = RedisBroker("redis://unused", lease_ttl=3.0), RedisBroker("redis://unused", lease_ttl=3.0)
    alive._client = other._client = redis
    key = (None, "one-place")
    async with trio.open_nursery() as nursery:
        await nursery.start(alive._breaker.run)
        await nursery.start(other._breaker.run)
        async with trio.open_nursery() as node:
            node.start_soon(alive._renew)
            assert await alive.claim(key, 1) is not None
            await trio.sleep(30)  # ten lease lifetimes: renewed all along
            with pytest.raises(TooManyRequests):
                await other.claim(key, 1)
            # The node's own key lives as long as its leases: a node resuming its sessions waits on it.
            assert redis.places["nodes"][f"wsgate:node:{alive.node_id}"] > trio.current_time()
            node.cancel_scope.cancel()  # the node dies: no renewal, nothing given back
        died = trio.current_time()
        with pytest.raises(TooManyRequests):
            await other.claim(key, 1)
        await trio.sleep(3.0 - (trio.current_time() - died))
        assert await other.claim(key, 1) is not None  # back within lease_ttl
        nursery.cancel_scope.cancel()
