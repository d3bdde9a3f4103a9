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
from typing import Any, Literal, Protocol

import attrs
import trio

from ..auth.tokens import Identity
from ..registry import UserKey

log = logging.getLogger("wsgate.broker")

REVOCATIONS = "wsgate:revocations"
#: Pushes to several users or everyone: every node follows it (one user's have its own channel).
FANOUT = "wsgate:fanout"


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

    def covers(self, identity: Identity) -> bool:
        """Whether a session of ``identity`` ends by this revocation."""
        if self.kind == "jti":
            return identity.token_id == self.name
        if identity.user_key != (self.tenant, self.name):
            return False
        return identity.issued_at is None or identity.issued_at <= self.at

    @property
    def key(self) -> str:
        """Where Redis keeps it."""
        scope = self.name if self.kind == "jti" else json.dumps([self.tenant, self.name])
        return f"wsgate:revoked:{self.kind}:{scope}"


@attrs.frozen
class Audience:
    """Some users (``subjects``) or everyone (``subjects`` None), of ``tenant``: for named users
    the tenant they belong to (None: no tenant); for everyone, None means every tenant."""

    subjects: tuple[str, ...] | None
    tenant: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"subjects": None if self.subjects is None else list(self.subjects), "tenant": self.tenant}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Audience:
        subjects = fields.get("subjects")
        tenant = fields.get("tenant")
        if subjects is not None and not (
            isinstance(subjects, list) and all(isinstance(s, str) for s in subjects)
        ):
            raise ValueError("subjects must be a list of strings")
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError("tenant must be a string")
        return cls(None if subjects is None else tuple(subjects), tenant)

    @property
    def user(self) -> UserKey | None:
        """The one user this is, if it is one."""
        return (
            (self.tenant, self.subjects[0]) if self.subjects is not None and len(self.subjects) == 1 else None
        )


@attrs.frozen
class Reach:
    """Where a push got to besides this node: ``nodes`` that took it, or ``problem``."""

    nodes: int | None
    problem: str | None = None


class Node(Protocol):
    """What the broker tells this node: a push (to some of its users), a revocation."""

    def deliver(self, audience: Audience, events: list[Any]) -> None: ...

    def apply(self, revocation: Revocation) -> None: ...


class Broker(Protocol):
    @property
    def state(self) -> str: ...

    async def run(
        self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def watch(self, key: UserKey) -> None: ...

    def unwatch(self, key: UserKey) -> None: ...

    async def publish(self, audience: Audience, events: list[Any]) -> Reach: ...

    async def revoke(self, revocation: Revocation) -> bool: ...

    async def claim(self, key: UserKey, limit: int) -> str | None: ...

    def release(self, key: UserKey, claim: str) -> None: ...


class LocalBroker:
    """One node: nothing to tell anyone."""

    state = "local"

    async def run(self, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def watch(self, key: UserKey) -> None:
        pass

    def unwatch(self, key: UserKey) -> None:
        pass

    async def publish(self, audience: Audience, events: list[Any]) -> Reach:
        return Reach(0)

    async def revoke(self, revocation: Revocation) -> bool:
        return True

    async def claim(self, key: UserKey, limit: int) -> str | None:
        return None  # the node's own limit is the only one

    def release(self, key: UserKey, claim: str) -> None:
        pass


def user_channel(key: UserKey) -> str:
    return "wsgate:user:" + json.dumps(list(key))


class BrokerUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
