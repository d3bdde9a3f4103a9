"""The Redis broker: the nodes of one gateway meeting in Redis (see :mod:`.broker`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import secrets
from collections import Counter
from typing import Any

import anyio
import trio

from ..auth.authenticator import SUBJECT_REVOCATION_TTL
from ..breaker import BreakerConfig, CircuitBreaker, Outcome
from ..breaker_actor import BreakerActor
from ..errors import TooManyRequests, leaves
from ..registry import UserKey
from .broker import FANOUT, REVOCATIONS, Audience, BrokerUnavailable, Node, Reach, Revocation, user_channel

log = logging.getLogger("wsgate.broker")

#: A place among a user's connections on every node, if there is one: the user's leases
#: are a sorted set scored by when each expires (on Redis' clock, so no node's skew counts).
CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
#: A node's leases of one user, renewed.
RENEW = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


def lease_key(key: UserKey) -> str:
    return "wsgate:leases:" + json.dumps(list(key))


def node_key(node_id: str) -> str:
    return f"wsgate:node:{node_id}"


class RedisBroker:
    """The nodes of one gateway, meeting in Redis (coredis, on anyio: it runs under Trio)."""

    def __init__(
        self,
        url: str,
        *,
        call_timeout: float = 1.0,
        subject_ttl: float = SUBJECT_REVOCATION_TTL,
        reconnect_max: float = 5.0,
        lease_ttl: float = 30.0,
        node_id: str | None = None,
        rng: random.Random | None = None,
        breaker: BreakerActor | None = None,
    ) -> None:
        self._url = url
        # Redis answers in a fraction of a millisecond: a breaker with room for many calls at
        # once, opening when half of the last 20 failed or took most of their deadline.
        config = BreakerConfig(slow_call_duration=0.9 * call_timeout, max_concurrent_calls=1000)
        self._breaker = breaker or BreakerActor(CircuitBreaker(config), name="broker (Redis)")
        self._lease_ttl = lease_ttl
        self._claims: dict[UserKey, set[str]] = {}  # this node's leases in Redis, by user
        self._claimed = 0
        self._fell_back = False  # logged once an outage
        self._releases_send, self._releases = trio.open_memory_channel[tuple[UserKey, str]](math.inf)
        #: fallback: connections admitted on the node's own limit while Redis was away.
        self.stats: Counter[str] = Counter()
        self._call_timeout = call_timeout
        self._subject_ttl = subject_ttl
        self._reconnect_max = reconnect_max
        self.node_id = node_id or secrets.token_hex(6)
        self._rng = rng or random.Random()
        self._client: Any = None  # a connected coredis.Redis, while connected
        self._watched: set[UserKey] = set()  # users with a connection here
        self._changes_send, self._changes = trio.open_memory_channel[tuple[bool, str]](math.inf)
        self._pending: list[Revocation] = []  # made while Redis was away: stored once it is back
        self._state = "connecting"

    @property
    def state(self) -> str:
        """``connecting``, ``connected`` or ``disconnected`` (reconnecting)."""
        return self._state

    # -- this node's users ------------------------------------------------------------

    def watch(self, key: UserKey) -> None:
        """The node's first connection of this user (the registry says when): take the
        user's pushes from now on."""
        self._watched.add(key)
        self._changes_send.send_nowait((True, user_channel(key)))

    def unwatch(self, key: UserKey) -> None:
        """The node's last connection of this user is gone."""
        self._watched.discard(key)
        self._changes_send.send_nowait((False, user_channel(key)))

    # -- calls ---------------------------------------------------------------------------

    async def publish(self, audience: Audience, events: list[Any]) -> Reach:
        """One user's pushes on its channel (the nodes with its connections follow it, in
        order); several users' or everyone's on the fan-out channel every node follows."""
        key = audience.user
        if key is not None:
            channel, mine = user_channel(key), key in self._watched
            payload = json.dumps({"origin": self.node_id, "events": events})
        else:
            channel, mine = FANOUT, True
            payload = json.dumps({"origin": self.node_id, "audience": audience.to_json(), "events": events})
        try:
            receivers = await self.call("publish", channel, payload)
        except BrokerUnavailable as exc:
            return Reach(None, exc.reason)
        # Redis counts this node's own subscription too, if it has one.
        return Reach(max(0, int(receivers) - (1 if mine else 0)))

    async def revoke(self, revocation: Revocation) -> bool:
        """Store and announce ``revocation``; False when Redis is away (it is done once back)."""
        try:
            await self._store(revocation)
        except BrokerUnavailable:
            self._pending.append(revocation)
            return False
        return True

    async def claim(self, key: UserKey, limit: int) -> str | None:
        """A place among the user's connections on every node (its id), or
        :class:`~wsgate.errors.TooManyRequests`; None while Redis is away: then only this
        node's own limit holds (logged, and counted as ``limit_fallback``)."""
        self._claimed += 1
        claim = f"{self.node_id}:{self._claimed}"
        try:
            granted = await self.call(
                "eval", CLAIM, keys=[lease_key(key)], args=[limit, self._lease_ttl, claim]
            )
        except BrokerUnavailable as exc:
            if not self._fell_back:
                self._fell_back = True
                log.warning(
                    "per-user limits are per node: %s", exc.reason, extra={"event": "broker.fallback"}
                )
            self.stats["limit_fallback"] += 1
            return None
        if not granted:
            raise TooManyRequests("too many connections for this user", retry_after=1.0)
        self._claims.setdefault(key, set()).add(claim)
        return claim

    def release(self, key: UserKey, claim: str) -> None:
        """The connection is gone: its place is given back (or expires with its lease)."""
        claims = self._claims.get(key)
        if claims is not None:
            claims.discard(claim)
            if not claims:
                del self._claims[key]
        self._releases_send.send_nowait((key, claim))

    async def _give_back(self) -> None:
        async for key, claim in self._releases:
            with contextlib.suppress(BrokerUnavailable):  # if not, it expires with its lease
                await self.call("zrem", lease_key(key), [claim])

    async def _renew(self) -> None:
        """Keep this node's leases alive: a node that dies stops renewing, and its users'
        places come back within ``cluster.lease_ttl``."""
        while True:
            # This node is alive as long as this key is: what a node resuming a session whose
            # runs are here waits on (``node_lost`` once it is gone).
            await self.call("set", node_key(self.node_id), "1", px=int(self._lease_ttl * 1000))
            await trio.sleep(self._lease_ttl / 3)
            for key, claims in list(self._claims.items()):
                await self.call("eval", RENEW, keys=[lease_key(key)], args=[self._lease_ttl, *claims])

    async def _store(self, revocation: Revocation) -> None:
        if revocation.kind == "jti":
            await self.call(
                "set", revocation.key, revocation.to_json(), exat=max(1, math.ceil(revocation.at))
            )
        else:
            await self.call(
                "set", revocation.key, revocation.to_json(), ex=max(1, math.ceil(self._subject_ttl))
            )
        await self.call("publish", REVOCATIONS, revocation.to_json())

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command under ``call_timeout``, through the broker's breaker: while
        Redis keeps failing, calls fail at once instead of each waiting out its deadline."""
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected to the broker (Redis)")
        permit = await self._breaker.acquire()
        if permit is None:
            raise BrokerUnavailable("the broker's breaker is open (Redis keeps failing)")
        outcome = Outcome.ABANDONED
        try:
            with trio.move_on_after(self._call_timeout):
                try:
                    result = await getattr(client, method)(*args, **kwargs)
                except Exception as exc:  # coredis' connection and protocol errors
                    outcome = Outcome.FAILURE
                    raise BrokerUnavailable(f"the broker (Redis) failed: {type(exc).__name__}") from None
                outcome = Outcome.SUCCESS
                return result
            outcome = Outcome.FAILURE
            raise BrokerUnavailable(f"the broker (Redis) did not answer within {self._call_timeout:g} s")
        finally:
            self._breaker.report(permit, outcome)

    # -- upkeep ----------------------------------------------------------------------------

    async def run(self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) and relay what other nodes say."""
        import coredis  # imported here: a gateway without a cluster never loads it

        async with trio.open_nursery() as nursery:
            await nursery.start(self._breaker.run)
            task_status.started()  # serve at once: Redis being away is not an outage of ours
            await self._keep_connected(coredis, node)

    async def _keep_connected(self, coredis: Any, node: Node) -> None:
        attempt = 0
        while True:
            try:
                client = coredis.Redis.from_url(
                    self._url, stream_timeout=None, connect_timeout=self._call_timeout
                )
                async with client:
                    with trio.fail_after(self._call_timeout):
                        await client.ping()
                    self._client = client
                    attempt = 0
                    await self._relay(client, node)
            except Exception as exc:
                if self._state == "connected" or attempt == 0:
                    first = next(iter(leaves(exc)), exc)
                    why = first.reason if isinstance(first, BrokerUnavailable) else type(first).__name__
                    log.warning(
                        "broker (Redis) unavailable: %s; local connections go on, retrying",
                        why,
                        extra={"event": "broker.disconnected"},
                    )
            finally:
                self._client = None
            self._state = "disconnected"
            attempt += 1
            await trio.sleep(self._rng.uniform(0, min(self._reconnect_max, 0.1 * 2**attempt)))

    async def _catch_up(self, client: Any, node: Node) -> None:
        """What happened while this node was away: every stored revocation, applied; the
        revocations made here meanwhile, stored and announced."""
        while self._pending:  # each forgotten only once stored
            await self._store(self._pending[0])
            del self._pending[0]
        async for key in client.scan_iter(match="wsgate:revoked:*"):
            text = await client.get(key)
            if text is not None:
                node.apply(Revocation.from_json(text))

    async def _relay(self, client: Any, node: Node) -> None:
        """Subscribed to revocations and this node's users, relay what other nodes say, until
        Redis stops answering this node's pings."""
        channels = [REVOCATIONS, FANOUT, *map(user_channel, self._watched)]
        try:
            async with client.pubsub(channels=channels) as pubsub, trio.open_nursery() as nursery:
                # Subscribed first, then caught up: a revocation announced meanwhile is in
                # both, and applying one twice is harmless; one announced before is stored.
                await self._catch_up(client, node)
                nursery.start_soon(self._follow_watches, pubsub)
                nursery.start_soon(self._check, client)
                nursery.start_soon(self._give_back)
                nursery.start_soon(self._renew)
                self._state = "connected"
                self._fell_back = False
                log.info("broker (Redis) connected", extra={"event": "broker.connected"})
                async for message in pubsub:
                    if message["type"] == "message":
                        self._dispatch(node, message["channel"], message["data"])
        except* anyio.ClosedResourceError:
            # coredis' pubsub, torn down while cancelled, writes its UNSUBSCRIBE to the
            # connection it has just closed; nothing is lost, and the cancellation goes on.
            pass

    async def _check(self, client: Any) -> None:
        """Ask Redis every ``call_timeout`` which server it is: a subscription alone notices
        neither that the server is gone nor that it restarted (coredis reconnects quietly,
        without the subscriptions), and this node would miss what the others say."""
        first = await self._server_run(client)
        while True:
            await trio.sleep(self._call_timeout)
            if await self._server_run(client) != first:
                raise BrokerUnavailable("Redis restarted")

    async def _server_run(self, client: Any) -> str:
        with trio.move_on_after(self._call_timeout):
            try:
                info = await client.info("server")
            except Exception as exc:
                raise BrokerUnavailable(f"INFO failed: {type(exc).__name__}") from None
            return str(info.get("run_id"))
        raise BrokerUnavailable(f"no answer within {self._call_timeout:g} s")

    async def _follow_watches(self, pubsub: Any) -> None:
        async for subscribe, channel in self._changes:
            if subscribe:
                await pubsub.subscribe(channel)
            else:
                await pubsub.unsubscribe(channel)

    def _dispatch(self, node: Node, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        try:
            if name == REVOCATIONS:
                node.apply(Revocation.from_json(data))
                return
            message = json.loads(data)
            if message.get("origin") == self.node_id:
                return  # delivered here already, as it was published
            events = message["events"]
            if not isinstance(events, list):
                raise TypeError("events must be a list")
            if name == FANOUT:
                node.deliver(Audience.from_json(message["audience"]), events)
            else:
                tenant, subject = json.loads(name.removeprefix("wsgate:user:"))
                node.deliver(Audience((subject,), tenant), events)
        except (ValueError, KeyError, TypeError):
            log.warning(
                "broker: a message that is not wsgate's on %s", name, extra={"event": "broker.garbage"}
            )
