"""Batched (group commit for the device channels): batches, per-item failures, and a stop that
never leaves a caller waiting."""

from __future__ import annotations

import asyncio

import pytest

from otaplane.devices.batching import Batched


class FakeChannel:
    """What Batched asks of a channel: `_db` (here: run at once) and `_spawn` (a tracked task)."""

    def __init__(self):
        self.tasks: set[asyncio.Task] = set()
        self.calls: list[list] = []

    async def _db(self, function, *args):
        await asyncio.sleep(0)
        return function(*args)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def test_items_submitted_together_share_one_call_and_get_their_own_results():
    async def scenario():
        channel = FakeChannel()

        def double(items):
            channel.calls.append(list(items))
            return [ValueError(item) if item == 3 else item * 2 for item in items]

        batched = Batched(channel, double)
        results = await asyncio.gather(*(batched(i) for i in range(5)), return_exceptions=True)
        return channel.calls, results

    calls, results = asyncio.run(scenario())
    assert calls == [[0, 1, 2, 3, 4]]  # all five were waiting when the drain took its first batch
    assert results[:3] == [0, 2, 4] and results[4] == 8
    assert isinstance(results[3], ValueError)


def test_a_drain_cancelled_before_it_started_cancels_its_callers():
    """The channel stops (cancels every task) right after a caller submitted: the caller must
    not wait forever (this once hung the broker's shutdown)."""
    async def scenario():
        channel = FakeChannel()
        batched = Batched(channel, lambda items: items)
        caller = asyncio.ensure_future(batched("x"))
        await asyncio.sleep(0)  # the caller has spawned the drain; the drain has not run a step
        for task in list(channel.tasks):
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 2)
        # and the next caller is served by a fresh drain
        return await asyncio.wait_for(batched("y"), 2)

    assert asyncio.run(scenario()) == "y"
