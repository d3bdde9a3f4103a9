"""One task asleep until another wakes it: the writer on its empty queue, the watchdog
until its next timer.

Every connection has two of these, so it is ``trio.lowlevel`` with one slot
rather than a ``trio.Event`` (made anew for every wait) or a ``ParkingLot``
(a dict of its own). Being woken is not an exception: the sleeper just
returns. Being cancelled (its scope's deadline, or the session closing)
raises ``Cancelled`` as any Trio wait does, and the sleeper is gone.
"""

from __future__ import annotations

import trio


class Sleeper:
    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def sleep(self) -> None:
        """Sleep until :meth:`wake` (or until cancelled); one sleeper at a time."""
        if self._task is not None:
            raise trio.BusyResourceError("another task is already asleep here")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._cancelled)

    def _cancelled(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        """Wake the sleeping task, if there is one."""
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None
