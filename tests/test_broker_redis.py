"""RedisBroker in process, against a real redis-server: coredis under Trio's cancellation."""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import trio

from conftest import Redis, until
from wsgate.cluster.broker import Audience, Reach, Revocation
from wsgate.cluster.redis import RedisBroker
from wsgate.errors import TooManyRequests

pytestmark = pytest.mark.slow


@attrs.define
class Recorder:
    """A node that notes what the broker tells it."""

    delivered: list[tuple[Any, Any]] = attrs.Factory(list)
    applied: list[Revocation] = attrs.Factory(list)

    def deliver(self, audience: Audience, events: list[Any]) -> None:
        self.delivered.extend((audience, event) for event in events)

    def apply(self, revocation: Revocation) -> None:
        self.applied.append(revocation)


async def connected(broker: RedisBroker) -> None:
    await until(lambda: broker.state == "connected", "the broker connected")


async def test_calls_cancelled_midway_leave_the_broker_working(redis: Redis) -> None:
    broker, other = RedisBroker(redis.url), RedisBroker(redis.url)
    here, there = Recorder(), Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run, here)
        await nursery.start(other.run, there)
        other.watch(("acme", "u"))
        await connected(broker)
        await connected(other)
        await until(lambda: redis.subscribers(("acme", "u")), "the other node follows the user")
        for n in range(30):  # cancelled at every point a call can be, in turn
            with trio.move_on_after(n * 0.0002):
                await broker.publish(Audience(("u",), "acme"), [{"n": n}])
        assert await broker.publish(Audience(("u",), "acme"), [{"n": "after"}]) == Reach(1)
        await until(lambda: there.delivered and there.delivered[-1][1] == {"n": "after"}, "the push arrived")
        assert there.delivered[-1] == (Audience(("u",), "acme"), {"n": "after"})
        revocation = Revocation("jti", "j-1", time.time() + 60)
        assert await broker.revoke(revocation)
        await until(lambda: revocation in there.applied, "the revocation arrived")
        nursery.cancel_scope.cancel()  # the gateway stopping: no exception escapes


async def test_claims_count_every_node_and_are_given_back(redis: Redis) -> None:
    a, b = RedisBroker(redis.url, lease_ttl=60), RedisBroker(redis.url, lease_ttl=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run, Recorder())
        await nursery.start(b.run, Recorder())
        await connected(a)
        await connected(b)
        key = (None, "limited")
        first = await a.claim(key, 2)
        second = await b.claim(key, 2)
        assert first is not None and second is not None
        with pytest.raises(TooManyRequests):
            await a.claim(key, 2)
        b.release(key, second)

        async def one_held() -> bool:
            return await redis.places(key) == 1

        await until(one_held, "b's place given back")
        assert await a.claim(key, 2) is not None
        nursery.cancel_scope.cancel()


async def test_every_script_of_the_cluster_is_lua_redis_runs(redis: Redis) -> None:
    """Each script, loaded into a real Redis: a syntax error (``until`` is Lua's) is caught here,
    not after a lease lifetime in production."""
    from wsgate.cluster import redis as leases
    from wsgate.cluster import sessions

    scripts = {
        f"{module.__name__}.{name}": value
        for module in (leases, sessions)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and "redis.call" in value
    }
    assert len(scripts) == 7
    for name, script in scripts.items():
        try:
            await redis.query("script_load", script)
        except Exception as exc:
            pytest.fail(f"{name} does not load: {exc}")
