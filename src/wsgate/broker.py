"""What one gateway node tells the others: server pushes and revocations.

A :class:`Broker` carries a push to the user's connections on other nodes and a
revocation to every node. :class:`LocalBroker` (the default) has no other node
to tell. :class:`RedisBroker` (``cluster.redis_url``) uses Redis:

- a push goes to the user's channel, ``wsgate:user:<tenant, subject>``, which a
  node subscribes to while it holds a connection of that user; one channel per
  user keeps a user's pushes in order;
- a revocation is stored with its time to live (``wsgate:revoked:...``), so a
  node that starts later or was cut off still refuses the token, and is
  announced on ``wsgate:revocations`` so every node closes its sessions at once.

Redis down or slow is not an outage of the gateway's: every call has a deadline
(``cluster.call_timeout``), local connections keep working, a push says what it
could not reach, revocations made meanwhile are stored and announced once Redis
is back, and the node reconnects with jittered backoff.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
from typing import Any, Literal, Protocol

import anyio
import attrs
import trio

from .errors import leaves

log = logging.getLogger("wsgate.broker")

UserKey = tuple[str | None, str]
REVOCATIONS = "wsgate:revocations"


@attrs.frozen
class Revocation:
    """A token (``jti``, refused until ``at``: its expiry) or a subject (its tokens issued
    up to ``at`` refused)."""

    kind: Literal["jti", "subject"]
    name: str  # the jti, or the subject
    at: float
    tenant: str | None = None

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "name": self.name, "at": self.at, "tenant": self.tenant})

    @classmethod
    def from_json(cls, text: str | bytes) -> Revocation:
        fields = json.loads(text)
        kind = fields["kind"]
        if kind not in ("jti", "subject"):
            raise ValueError(f"not a revocation: {kind!r}")
        return cls(kind, str(fields["name"]), float(fields["at"]), fields.get("tenant"))

    @property
    def key(self) -> str:
        """Where Redis keeps it."""
        scope = self.name if self.kind == "jti" else json.dumps([self.tenant, self.name])
        return f"wsgate:revoked:{self.kind}:{scope}"


@attrs.frozen
class Reach:
    """Where a push got to besides this node: ``nodes`` that took it, or ``problem``."""

    nodes: int | None
    problem: str | None = None


class Node(Protocol):
    """What the broker tells this node: a push for one of its users, a revocation."""

    def deliver(self, key: UserKey, event: Any) -> None: ...

    def apply(self, revocation: Revocation) -> None: ...


class Broker(Protocol):
    @property
    def state(self) -> str: ...

    async def run(
        self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def watch(self, key: UserKey) -> None: ...

    def unwatch(self, key: UserKey) -> None: ...

    async def publish(self, key: UserKey, event: Any) -> Reach: ...

    async def revoke(self, revocation: Revocation) -> bool: ...


class LocalBroker:
    """One node: nothing to tell anyone."""

    state = "local"

    async def run(self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def watch(self, key: UserKey) -> None:
        pass

    def unwatch(self, key: UserKey) -> None:
        pass

    async def publish(self, key: UserKey, event: Any) -> Reach:
        return Reach(0)

    async def revoke(self, revocation: Revocation) -> bool:
        return True


def user_channel(key: UserKey) -> str:
    return "wsgate:user:" + json.dumps(list(key))


class RedisBroker:
    """The nodes of one gateway, meeting in Redis (coredis, on anyio: it runs under Trio)."""

    def __init__(
        self,
        url: str,
        *,
        call_timeout: float = 1.0,
        subject_ttl: float = 86400.0,
        reconnect_max: float = 5.0,
        node_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._url = url
        self._call_timeout = call_timeout
        self._subject_ttl = subject_ttl
        self._reconnect_max = reconnect_max
        self.node_id = node_id or secrets.token_hex(6)
        self._rng = rng or random.Random()
        self._client: Any = None  # a connected coredis.Redis, while connected
        self._watched: dict[UserKey, int] = {}
        self._changes_send, self._changes = trio.open_memory_channel[tuple[bool, str]](math.inf)
        self._pending: list[Revocation] = []  # made while Redis was away: stored once it is back
        self._state = "connecting"

    @property
    def state(self) -> str:
        """``connecting``, ``connected`` or ``disconnected`` (reconnecting)."""
        return self._state

    # -- this node's users ------------------------------------------------------------

    def watch(self, key: UserKey) -> None:
        """The node's first connection of this user: take the user's pushes from now on."""
        self._watched[key] = self._watched.get(key, 0) + 1
        if self._watched[key] == 1:
            self._changes_send.send_nowait((True, user_channel(key)))

    def unwatch(self, key: UserKey) -> None:
        self._watched[key] -= 1
        if not self._watched[key]:
            del self._watched[key]
            self._changes_send.send_nowait((False, user_channel(key)))

    # -- calls ---------------------------------------------------------------------------

    async def publish(self, key: UserKey, event: Any) -> Reach:
        payload = json.dumps({"origin": self.node_id, "event": event})
        try:
            receivers = await self._call("publish", user_channel(key), payload)
        except BrokerUnavailable as exc:
            return Reach(None, exc.reason)
        # Redis counts this node's own subscription too, if it has one.
        return Reach(max(0, int(receivers) - (1 if key in self._watched else 0)))

    async def revoke(self, revocation: Revocation) -> bool:
        """Store and announce ``revocation``; False when Redis is away (it is done once back)."""
        try:
            await self._store(revocation)
        except BrokerUnavailable:
            self._pending.append(revocation)
            return False
        return True

    async def _store(self, revocation: Revocation) -> None:
        if revocation.kind == "jti":
            await self._call(
                "set", revocation.key, revocation.to_json(), exat=max(1, math.ceil(revocation.at))
            )
        else:
            await self._call(
                "set", revocation.key, revocation.to_json(), ex=max(1, math.ceil(self._subject_ttl))
            )
        await self._call("publish", REVOCATIONS, revocation.to_json())

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._client
        if client is None:
            raise BrokerUnavailable("not connected to the broker (Redis)")
        with trio.move_on_after(self._call_timeout):
            try:
                return await getattr(client, method)(*args, **kwargs)
            except Exception as exc:  # coredis' connection and protocol errors
                raise BrokerUnavailable(f"the broker (Redis) failed: {type(exc).__name__}") from None
        raise BrokerUnavailable(f"the broker (Redis) did not answer within {self._call_timeout:g} s")

    # -- upkeep ----------------------------------------------------------------------------

    async def run(self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) and relay what other nodes say."""
        import coredis  # imported here: a gateway without a cluster never loads it

        task_status.started()  # serve at once: Redis being away is not an outage of ours
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
        channels = [REVOCATIONS, *map(user_channel, self._watched)]
        try:
            async with client.pubsub(channels=channels) as pubsub, trio.open_nursery() as nursery:
                # Subscribed first, then caught up: a revocation announced meanwhile is in
                # both, and applying one twice is harmless; one announced before is stored.
                await self._catch_up(client, node)
                nursery.start_soon(self._follow_watches, pubsub)
                nursery.start_soon(self._check, client)
                self._state = "connected"
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
            tenant, subject = json.loads(name.removeprefix("wsgate:user:"))
            node.deliver((tenant, subject), message["event"])
        except (ValueError, KeyError, TypeError):
            log.warning(
                "broker: a message that is not wsgate's on %s", name, extra={"event": "broker.garbage"}
            )


class BrokerUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
