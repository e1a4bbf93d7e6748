"""Jobs that every provider process runs periodically, done once however many run them.

Each process runs ``Periodic``'s loop (a worker thread per pass, failures logged); the
job itself decides whether this pass does anything. A job that must run once per period
across the processes sharing the database asks ``claim``: a conditional update of its
row in ``periodic_jobs`` (``WHERE due <= now``), which one process wins (the rollouts'
steps are conditional updates the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.provider.db.models import PeriodicJob

LOG = logging.getLogger(__name__)

T = TypeVar("T")


class Periodic(Generic[T]):
    """Runs ``work`` every ``tick_s`` in this provider process, in a worker thread; a
    failed pass is logged and the next one tries again."""

    def __init__(self, name: str, work: Callable[[], T], failed: T, *, tick_s: float) -> None:
        self.name = name
        self.work = work
        self.failed = failed
        self.tick_s = tick_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> T:
        """One pass, in a worker thread; a failure is logged, not raised."""
        try:
            return await asyncio.to_thread(self.work)
        except Exception as exc:
            LOG.warning("%s: the pass failed, tried again at the next: %s", self.name, exc)
            return self.failed

    async def _loop(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.tick_s)


def claim(
    sessions: sessionmaker[Session], name: str, now: datetime, every: timedelta, holder: str
) -> bool:
    """True if this caller runs job ``name`` now: it was due, and is now due ``every``
    later. Of callers racing (in any process on the database), exactly one gets True."""
    with sessions() as s:
        known = s.scalar(select(PeriodicJob.name).where(PeriodicJob.name == name)) is not None
    if not known:
        # Another process may add it first.
        with contextlib.suppress(IntegrityError), sessions.begin() as s:
            s.add(PeriodicJob(name=name, due=now, holder=None))
    with sessions.begin() as s:
        done = s.execute(
            update(PeriodicJob)
            .where(PeriodicJob.name == name, PeriodicJob.due <= now)
            .values(due=now + every, holder=holder)
            .execution_options(synchronize_session=False)
        )
    return bool(done.rowcount)  # type: ignore[attr-defined]
