"""Server pushes to many at once: who gets them (an :class:`Audience`) and what (events,
each encoded once for everyone; every connection only adds its ``seq``).

A connection takes a push's events one after another without waiting, so its
writer sends them in one batch. A connection whose queue is full drops what
does not fit, is told how many it missed once it reads again, and is closed
(1008) if it stays full: a slow client never delays the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from .cluster.broker import Audience
from .registry import UserKey
from .session.messages import Pushed, encode_message

#: At most this many events in one push, and this many named users.
MAX_EVENTS = 1000
MAX_SUBJECTS = 10_000


class Pushable(Protocol):
    @property
    def identity(self) -> Any: ...

    def offer(self, text: str) -> bool: ...


class Sessions(Protocol):
    def sessions_of(self, key: UserKey) -> list[Any]: ...

    def all_sessions(self) -> Iterable[Any]: ...


def audience_of_request(body: dict[str, Any]) -> Audience:
    """The audience ``/publish`` names: exactly one of ``subject``, ``subjects`` and
    ``everyone: true``, each within ``tenant`` if given."""
    subject, subjects, everyone, tenant = (body.get(k) for k in ("subject", "subjects", "everyone", "tenant"))
    if tenant is not None and not isinstance(tenant, str):
        raise ValueError("'tenant' must be a string")
    if sum(x is not None for x in (subject, subjects, everyone)) != 1:
        raise ValueError("name the audience with exactly one of 'subject', 'subjects' or 'everyone'")
    if subject is not None:
        if not isinstance(subject, str) or not subject:
            raise ValueError("'subject' must be a non-empty string")
        return Audience((subject,), tenant)
    if subjects is not None:
        if (
            not isinstance(subjects, list)
            or not subjects
            or not all(isinstance(s, str) and s for s in subjects)
        ):
            raise ValueError("'subjects' must be a non-empty list of non-empty strings")
        if len(subjects) > MAX_SUBJECTS:
            raise ValueError(f"'subjects' may name at most {MAX_SUBJECTS} users")
        return Audience(tuple(subjects), tenant)
    if everyone is not True:
        raise ValueError("'everyone' must be true")
    return Audience(None, tenant)


def events_of_request(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events ``/publish`` carries: ``event`` (one object) or ``events`` (a list of them)."""
    event, events = body.get("event"), body.get("events")
    if (event is None) == (events is None):
        raise ValueError("give exactly one of 'event' (an object) and 'events' (a list of objects)")
    if event is not None:
        events = [event]
    if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
        raise ValueError(
            "'events' must be a non-empty list of JSON objects"
            if event is None
            else "'event' must be a JSON object"
        )
    if len(events) > MAX_EVENTS:
        raise ValueError(f"at most {MAX_EVENTS} events in one push")
    return events


def sessions_of(registry: Sessions, audience: Audience) -> list[Pushable]:
    """The connections of ``audience`` on this node."""
    if audience.subjects is None:
        every = registry.all_sessions()
        return (
            list(every)
            if audience.tenant is None
            else [s for s in every if s.identity.tenant == audience.tenant]
        )
    users = dict.fromkeys(audience.subjects)  # each named once, however often it is given
    return [s for subject in users for s in registry.sessions_of((audience.tenant, subject))]


def deliver(
    registry: Sessions, audience: Audience, events: Sequence[Any], stats: Counter[str]
) -> tuple[int, int]:
    """Queue ``events`` on every connection of ``audience`` here: (events queued, connections)."""
    texts = [encode_message(Pushed(event)) for event in events]
    sessions = sessions_of(registry, audience)
    delivered = 0
    for session in sessions:
        for text in texts:
            delivered += session.offer(text)
    stats["published"] += delivered
    return delivered, len(sessions)
