"""Plain DB-API access for the provider's hottest SQLite writes.

Building, compiling and wrapping a SQLAlchemy statement per call costs more CPU than
SQLite itself for the control hub's and the nonce ledger's small writes, so their writer
threads send plain SQL on a connection of their own, taken once from the engine's pool
(its connect hooks ran: WAL, synchronous, foreign keys)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine


class ThreadConnections:
    """One raw connection per calling thread, kept for good; ``close`` closes them all."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._all: list[Any] = []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """A cursor of this thread's connection, committed at the end (rolled back on an
        exception)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._engine.raw_connection()
            self._all.append(conn)
        raw: Any = conn.dbapi_connection
        cur = raw.cursor()
        try:
            yield cur
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cur.close()

    def close(self) -> None:
        for conn in self._all:
            with contextlib.suppress(Exception):
                conn.close()
        self._all = []
