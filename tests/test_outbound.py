"""The outbound queue: order, bounds, and its one parked writer."""

from __future__ import annotations

from collections import deque

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from wsgate.session.outbound import OutboundQueue


@given(st.lists(st.one_of(st.text(max_size=5), st.none()), max_size=400))
def test_fifo_against_a_deque(ops: list[str | None]) -> None:
    """Any mix of puts (text) and gets (None) behaves like a bounded deque, across compactions."""
    queue = OutboundQueue(max_messages=200, max_bytes=10**9)
    model: deque[str] = deque()
    for op in ops:
        if op is None:
            assert queue.take_nowait() == ([model.popleft()] if model else [])
        else:
            accepted = queue.put_nowait(op)
            assert accepted == (len(model) < 200)
            if accepted:
                model.append(op)
        assert len(queue) == len(model)
    assert [queue.take_nowait() for _ in range(len(model))] == [[text] for text in model]
    assert queue.take_nowait() == []


def test_bounded_by_bytes_as_well_as_count() -> None:
    queue = OutboundQueue(max_messages=100, max_bytes=10)
    assert queue.put_nowait("x" * 6)
    assert queue.put_nowait("y" * 6)  # 12 bytes: now full
    assert queue.full
    assert not queue.put_nowait("z")
    assert queue.take_nowait() == ["x" * 6]
    assert not queue.full
    assert queue.put_nowait("z")


async def test_get_waits_for_a_put() -> None:
    queue = OutboundQueue(10, 1000)
    got: list[str] = []

    async def writer() -> None:
        got.extend(await queue.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        queue.put_nowait("hello")
    assert got == ["hello"]


async def test_a_cancelled_get_leaves_the_queue_usable() -> None:
    queue = OutboundQueue(10, 1000)
    with trio.move_on_after(1):
        await queue.take()
    queue.put_nowait("after")
    assert await queue.take() == ["after"]


async def test_only_one_task_may_wait() -> None:
    queue = OutboundQueue(10, 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.take)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await queue.take()
        queue.put_nowait("for the first")


async def test_put_waits_while_full_and_close_releases_it() -> None:
    queue = OutboundQueue(1, 1000)
    assert queue.put_nowait("a")
    results: list[bool] = []

    async def putter(text: str) -> None:
        results.append(await queue.put(text))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        assert queue.take_nowait() == ["a"]  # room again: the putter goes on
    assert results == [True]
    assert queue.take_nowait() == ["b"]
    queue.put_nowait("c")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter, "d")
        await trio.testing.wait_all_tasks_blocked()
        queue.close()
    assert results == [True, False]
    assert queue.take_nowait() == ["c"]  # what was queued can still be taken
    assert not queue.put_nowait("e")


@given(
    st.lists(st.text(max_size=8), max_size=300),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=0, max_value=60),
)
def test_take_keeps_order_and_bounds(texts: list[str], max_items: int, max_bytes: int) -> None:
    """Batches come out in order, each within its bounds (or a single message), none lost."""
    queue = OutboundQueue(max_messages=1000, max_bytes=10**9)
    for text in texts:
        assert queue.put_nowait(text)
    out: list[str] = []
    while batch := queue.take_nowait(max_items, max_bytes):
        assert len(batch) <= max_items
        assert len(batch) == 1 or sum(map(len, batch)) <= max_bytes
        out.extend(batch)
    assert out == texts
    assert len(queue) == 0 and not queue.full


async def test_stop_taking_releases_the_waiting_taker_after_the_queue_is_empty() -> None:
    queue = OutboundQueue(max_messages=8, max_bytes=1000)
    taken: list[list[str]] = []

    async def taker() -> None:
        while texts := await queue.take(8, 1000):
            taken.append(texts)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        queue.put_nowait("a")
        await trio.testing.wait_all_tasks_blocked()
        queue.put_nowait("b")
        queue.put_nowait("c")
        queue.stop_taking()  # what is queued is still taken, then take() returns []
    assert taken == [["a"], ["b", "c"]]
    assert await queue.take() == []  # and never waits again
