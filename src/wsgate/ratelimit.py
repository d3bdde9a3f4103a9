"""Token buckets, as plain objects: time passed in."""

from __future__ import annotations

from collections import OrderedDict


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
