"""What a session keeps for a resume: the last messages it sent, bounded, and its resume
token's digest (never the token)."""

from __future__ import annotations

import hashlib
import hmac
from collections import deque


def resume_hash(token: str) -> bytes:
    """What is kept of a resume token (random, so a plain digest suffices)."""
    return hashlib.sha256(token.encode()).digest()


class ResumeKey:
    """The digest of a session's current resume token; each one issued replaces the last."""

    __slots__ = ("digest",)

    def __init__(self) -> None:
        self.digest = b""

    def issue(self, token: str | None) -> str | None:
        if token is not None:
            self.digest = resume_hash(token)
        return token

    def matches(self, token: str) -> bool:
        return bool(self.digest) and hmac.compare_digest(self.digest, resume_hash(token))


class MessageLog:
    """The last numbered messages of a session (``seq`` ``first`` to ``last``), at most
    ``max_events`` of them and ``max_bytes`` (the oldest go first; the newest always stays)."""

    __slots__ = ("_bytes", "_frames", "_max_bytes", "_max_events", "last")

    def __init__(self, max_events: int, max_bytes: int, *, last: int = 0) -> None:
        self._frames: (
            deque[str] | tuple[()]
        ) = ()  # a deque from the first message: most idle sessions have none
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        #: The ``seq`` of the newest message (0: none yet).
        self.last = last

    @classmethod
    def of(cls, frames: list[str], last: int, max_events: int, max_bytes: int) -> MessageLog:
        """A log holding ``frames``, the messages up to ``last`` (a session stored elsewhere)."""
        log = cls(max_events, max_bytes, last=last - len(frames))
        for frame in frames:
            log.append(frame)
        return log

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def first(self) -> int:
        """The ``seq`` of the oldest message kept."""
        return self.last - len(self._frames) + 1

    def append(self, frame: str) -> None:
        """``frame`` is message ``last + 1``."""
        frames = self._frames
        if not isinstance(frames, deque):
            frames = self._frames = deque()
        frames.append(frame)
        self.last += 1
        self._bytes += len(frame)
        while len(frames) > self._max_events or (self._bytes > self._max_bytes and len(frames) > 1):
            self._bytes -= len(frames.popleft())

    def frames(self) -> list[str]:
        """Every message kept, oldest first."""
        return list(self._frames)

    def after(self, last_seq: int) -> list[str] | None:
        """Every message after ``last_seq``, in order; None when the log does not reach
        back to it, or ``last_seq`` is ahead of it: a replay is whole or nothing."""
        if not self.first - 1 <= last_seq <= self.last:
            return None
        skip = last_seq - self.first + 1
        return [frame for i, frame in enumerate(self._frames) if i >= skip]
