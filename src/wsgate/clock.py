"""Wall-clock time derived from Trio's clock."""

from __future__ import annotations

import time

import trio


class WallClock:
    """Epoch seconds derived from Trio's clock, so ``MockClock`` drives token expiry too.

    ``start`` is the wall-clock time to report now (default: ``time.time()``).
    """

    def __init__(self, start: float | None = None) -> None:
        self._offset = (time.time() if start is None else start) - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()

    def to_trio(self, wall: float) -> float:
        """The Trio time at which the wall clock will read ``wall``."""
        return wall - self._offset
