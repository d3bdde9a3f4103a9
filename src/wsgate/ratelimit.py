"""Token buckets per key (client address), as a plain object: time passed in."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._max_keys = max_keys

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if it has one."""
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)  # the longest idle keys go first
        return allowed

    def retry_after(self, key: str) -> float:
        tokens, _ = self._buckets.get(key, (self._burst, 0.0))
        return max(0.0, (1.0 - tokens) / self._rate)
