"""DeviceTurns: one device's state changes one at a time, devices independent, no leftovers."""

from __future__ import annotations

import asyncio

import pytest

from otaplane.devices.batching import DeviceTurns


def test_one_device_waits_for_its_turn_while_another_device_does_not():
    async def main():
        turns = DeviceTurns()
        log = []

        async def work(device_id, name, delay):
            async with turns(device_id):
                log.append(f"{name} in")
                await asyncio.sleep(delay)
                log.append(f"{name} out")

        await asyncio.gather(work(1, "a", 0.05), work(1, "b", 0), work(2, "c", 0))
        return log, turns._turns  # noqa: SLF001

    log, left = asyncio.run(main())
    assert log.index("b in") > log.index("a out")  # same device: after a
    assert log.index("c out") < log.index("a out")  # other device: not held up by a
    assert left == {}


def test_a_waiter_cancelled_or_an_error_inside_leaves_no_lock_behind():
    async def main():
        turns = DeviceTurns()
        holder_in = asyncio.Event()
        release = asyncio.Event()

        async def holder():
            async with turns(7):
                holder_in.set()
                await release.wait()

        async def waiter():
            async with turns(7):
                pass

        held = asyncio.ensure_future(holder())
        await holder_in.wait()
        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await held
        with pytest.raises(RuntimeError):
            async with turns(8):
                raise RuntimeError("boom")
        return turns._turns  # noqa: SLF001

    assert asyncio.run(main()) == {}
