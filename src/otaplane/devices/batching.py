"""What both device channels (broker.py, external.py) need for concurrency: group commit of
small database calls (`Batched`) and one state change at a time per device (`DeviceTurns`)."""

from __future__ import annotations

import asyncio
from typing import Any


class Batched:
    """`await batched(item)`: `function(items) -> results` runs in a worker thread with every item
    submitted while the previous call ran (group commit: no added latency when idle, one query or
    transaction per batch under load). A result that is an Exception is raised to its own caller.
    `channel` supplies `_db(function, *args)` (a worker thread) and `_spawn(coroutine)`."""

    def __init__(self, channel, function, limit: int = 500):
        self._channel = channel
        self._function = function
        self._limit = limit
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._batch: list[tuple[Any, asyncio.Future]] = []  # the one in the worker thread
        self._busy = False

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._busy:
            self._busy = True
            self._channel._spawn(self._drain()).add_done_callback(self._drained)  # noqa: SLF001
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                self._batch, self._waiting = self._waiting[:self._limit], self._waiting[self._limit:]
                try:
                    results = await self._channel._db(self._function, [item for item, _ in self._batch])  # noqa: SLF001
                except asyncio.CancelledError:
                    raise
                except Exception as problem:
                    for _, future in self._batch:
                        if not future.done():
                            future.set_exception(problem)
                    continue
                for (_, future), result in zip(self._batch, results):
                    if future.done():
                        continue
                    if isinstance(result, Exception):  # that item failed alone (the others did not)
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._give_up()

    def _drained(self, task: asyncio.Task) -> None:
        # A drain cancelled before its first step (the channel stops at once) never ran its
        # `finally`: without this its callers would wait forever.
        if task.cancelled():
            self._give_up()

    def _give_up(self) -> None:
        self._busy = False
        for _, future in self._batch + self._waiting:  # cancelled (the channel stops): nobody waits forever
            if not future.done():
                future.cancel()
        self._batch, self._waiting = [], []


class DeviceTurns:
    """`async with turns(device_id):` one device's state changes and reports run one at a time
    (connect, disconnect and messages update the same rows). A device's lock lives only while
    someone holds or waits for it. (A plain class, not @asynccontextmanager: every device
    message takes a turn, and a generator per message was a few percent of a busy server.)"""

    def __init__(self) -> None:
        self._turns: dict[int, list] = {}  # device_id -> [Lock, users]

    def __call__(self, device_id: int) -> "_Turn":
        return _Turn(self._turns, device_id)


class _Turn:
    __slots__ = ("_turns", "_device_id", "_entry")

    def __init__(self, turns: dict[int, list], device_id: int):
        self._turns = turns
        self._device_id = device_id

    async def __aenter__(self) -> None:
        entry = self._turns.get(self._device_id)
        if entry is None:
            entry = self._turns[self._device_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        self._entry = entry
        try:
            await entry[0].acquire()
        except BaseException:  # cancelled while waiting: not a user any more
            self._leave()
            raise

    async def __aexit__(self, *exc_info) -> None:
        self._entry[0].release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry[1] -= 1
        if entry[1] == 0:
            del self._turns[self._device_id]
