"""Token buckets and pending-handshake caps, as plain objects: time passed in."""

from __future__ import annotations

from collections import OrderedDict, deque

from .errors import TooManyRequests, Unavailable


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until a token will be there."""
        return max(0.0, (1.0 - self._tokens) / self._rate)


class SlidingWindow:
    """At most ``limit`` events in any ``window`` seconds (made on first use: most never are)."""

    __slots__ = ("_limit", "_times", "_window")

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Count one event at ``now``; False when that makes more than ``limit``."""
        times = self._times
        while times and times[0] <= now - self._window:
            times.popleft()
        times.append(now)
        return len(times) <= self._limit


class RateLimiter:
    """One :class:`TokenBucket` per key (client address), the longest idle keys dropped first."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if it has one."""
        bucket = self._buckets.pop(key, None) or TokenBucket(self._rate, self._burst, now)
        self._buckets[key] = bucket
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def retry_after(self, key: str) -> float:
        bucket = self._buckets.get(key)
        return bucket.retry_after() if bucket is not None else 0.0


class PendingHandshakes:
    """Handshakes under way (accepted, not yet admitted or refused), per client address
    and in all, each count capped: what a client may hold before it has authenticated.

    :meth:`hold` checks the caps (like ``Registry.lease``); the place it returns counts
    from when it is entered (``with``) until it is left, so nothing can come between
    counting and giving back.
    """

    __slots__ = ("_by_address", "_per_address", "_total", "_total_cap")

    def __init__(self, *, per_address: int, total: int) -> None:
        self._by_address: dict[str, int] = {}
        self._per_address = per_address
        self._total_cap = total
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def hold(self, address: str) -> PendingHandshake:
        """A place for one more handshake from ``address``; raises :class:`TooManyRequests`
        when the address holds its cap, :class:`Unavailable` when all together do."""
        if self._by_address.get(address, 0) >= self._per_address:
            raise TooManyRequests("too many unfinished handshakes from this address", retry_after=1)
        if self._total >= self._total_cap:
            raise Unavailable("too many unfinished handshakes", retry_after=1)
        return PendingHandshake(self, address)

    def _take(self, address: str) -> None:
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._total += 1

    def _release(self, address: str) -> None:
        self._total -= 1
        held = self._by_address[address] - 1
        if held:
            self._by_address[address] = held
        else:
            del self._by_address[address]


class PendingHandshake:
    """One handshake's place; counted while inside its ``with`` block."""

    __slots__ = ("_address", "_owner", "_taken")

    def __init__(self, owner: PendingHandshakes, address: str) -> None:
        self._owner = owner
        self._address = address
        self._taken = False

    def __enter__(self) -> PendingHandshake:
        self._owner._take(self._address)
        self._taken = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._taken:
            self._taken = False
            self._owner._release(self._address)
