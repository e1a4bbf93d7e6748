"""Group commits for the control hub: many small database writes become one transaction.

Every poll, acknowledgement, reply and new command is a small write. Written one by one
from many threads, SQLite serialises them behind its database lock (and a writer that
finds it taken sleeps in growing steps), and PostgreSQL pays a commit each. A
``GroupRunner`` instead queues the items of one kind; while one batch is in the
database the next ones gather, and each batch is a single call of ``run_many`` on the
hub's one writer thread. An idle server runs each item at once (no added delay); a busy
one commits hundreds per transaction.

With ``run_now`` (SQLite), a batch is first tried on the event loop's own thread, where a
group of small writes costs less than the hand-over to a thread (see
``sgw.provider.db.raw``); only a batch that would have to wait for a lock, or take a slow
path, goes to the thread (``run_now`` raises WouldBlock, having written nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

from sgw.provider.db.raw import WouldBlock

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result

# Most items per batch: bounds one transaction's time and the size of its IN lists.
MAX_BATCH = 256
# Pauses between the tries of a batch on the event loop's thread before it goes to the
# thread (seconds): one try more than pauses.
NOW_RETRIES_S = (0.001, 0.002, 0.004)


class GroupRunner(Generic[I, R]):
    """Runs ``run_many(items)`` (blocking, in ``executor``) for queued items; each
    result, or an exception instance in its place, goes to the item's caller."""

    def __init__(
        self,
        run_many: Callable[[list[I]], list[R | BaseException]],
        executor: concurrent.futures.Executor,
        max_batch: int = MAX_BATCH,
        run_now: Callable[[list[I]], list[R | BaseException]] | None = None,
    ) -> None:
        self._run_many = run_many
        self._run_now = run_now
        self._executor = executor
        self._max = max_batch
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0
        self.deferred = 0  # batches run_now handed to the thread

    async def submit(self, item: I) -> R:
        """The item's result once its batch is written (its exception raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _now(self, items: list[I]) -> list[R | BaseException] | None:
        """``run_now``'s results; None if it would still block after a few short tries
        (another writer's transaction is usually over within a millisecond or two)."""
        assert self._run_now is not None
        for delay in (*NOW_RETRIES_S, None):
            try:
                return self._run_now(items)
            except WouldBlock:
                if delay is None:
                    break
                await asyncio.sleep(delay)
        self.deferred += 1
        return None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            items = [item for item, _f in batch]
            try:
                results = await self._now(items) if self._run_now is not None else None
                if results is None:
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
