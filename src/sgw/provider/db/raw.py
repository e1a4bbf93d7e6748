"""Plain DB-API access for the provider's hottest SQLite writes.

Building, compiling and wrapping a SQLAlchemy statement per call costs more CPU than
SQLite itself for the control hub's and the nonce ledger's small writes, so they send
plain SQL on a connection of the calling thread, taken once from the engine's pool (its
connect hooks ran: WAL, synchronous, foreign keys).

``transaction_now`` is for the event loop's own thread: a transaction that begins only if
it can begin at once (``WouldBlock`` otherwise, and the caller hands the work to a
thread). A group of small writes costs the loop a fraction of a millisecond, less than
handing it to a thread: Python's sqlite3 lets go of the GIL for every step of every
statement, and a worker thread takes it back only when the loop's thread gives it up, so
each statement in a worker waited behind the loop, and the loop behind the worker. The
loop's connection never waits for a lock (``busy_timeout`` 0, ``BEGIN IMMEDIATE``); no
connection checkpoints the write-ahead log when it commits (``sgw.provider.db.schema``):
``checkpoint`` does that from a thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine


class WouldBlock(Exception):  # noqa: N818 - a signal to the caller, not an error
    """The write cannot begin without waiting (a lock is taken, or the work needs a path
    that may wait): do it in a thread instead. Nothing was written."""


class ThreadConnections:
    """One raw connection per calling thread, kept for good; ``close`` closes them all."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._all: list[Any] = []

    def _raw(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._engine.raw_connection()
            self._all.append(conn)
        return conn.dbapi_connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """A cursor of this thread's connection, committed at the end (rolled back on an
        exception)."""
        raw = self._raw()
        cur = raw.cursor()
        try:
            yield cur
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cur.close()

    @contextlib.contextmanager
    def transaction_now(self, lock: Any) -> Iterator[sqlite3.Cursor]:
        """``transaction`` if it can begin without waiting: ``lock`` (the process's write
        lock) free and SQLite's write lock free; WouldBlock otherwise. This thread's
        connection is then one that never waits for a lock."""
        if not lock.acquire(blocking=False):
            raise WouldBlock
        try:
            raw = self._raw()
            if not getattr(self._local, "now", False):
                raw.execute("PRAGMA busy_timeout = 0")
                self._local.now = True
            try:
                raw.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if raw.in_transaction:
                    raw.rollback()
                raise WouldBlock from exc  # locked by another connection or process
            with self.transaction() as cur:
                yield cur
        finally:
            lock.release()

    @contextlib.contextmanager
    def write(self, lock: Any, nowait: bool) -> Iterator[sqlite3.Cursor]:
        """A write transaction under the process's write ``lock``: with ``nowait``,
        ``transaction_now``; otherwise waiting for the lock as long as it takes."""
        if nowait:
            with self.transaction_now(lock) as cur:
                yield cur
        else:
            with lock, self.transaction() as cur:
                yield cur

    def checkpoint(self) -> None:
        """Copies the write-ahead log into the database file as far as no reader needs it
        (PASSIVE: waits for nobody), on this thread's connection."""
        raw = self._raw()
        raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        for conn in self._all:
            with contextlib.suppress(Exception):
                conn.close()
        self._all = []
