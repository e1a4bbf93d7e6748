"""Group commits for the control hub: many small database writes become one transaction.

Every poll, acknowledgement, reply and new command is a small write. Written one by one
from many threads, SQLite serialises them behind its database lock (and a writer that
finds it taken sleeps in growing steps), and PostgreSQL pays a commit each. A
``GroupRunner`` instead queues the items of one kind; while one batch is in the
database the next ones gather, and each batch is a single call of ``run_many`` on the
hub's one writer thread. An idle server runs each item at once (no added delay); a busy
one commits hundreds per transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result

# Most items per batch: bounds one transaction's time and the size of its IN lists.
MAX_BATCH = 256


class GroupRunner(Generic[I, R]):
    """Runs ``run_many(items)`` (blocking, in ``executor``) for queued items; each
    result, or an exception instance in its place, goes to the item's caller."""

    def __init__(
        self,
        run_many: Callable[[list[I]], list[R | BaseException]],
        executor: concurrent.futures.Executor,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._run_many = run_many
        self._executor = executor
        self._max = max_batch
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: I) -> R:
        """The item's result once its batch is written (its exception raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            items = [item for item, _f in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._run_many, items)
            except Exception as exc:
                for _item, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_item, future), result in zip(batch, results, strict=True):
                if future.done():  # the caller went away (a dropped poll)
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
