"""The nonces of signed requests seen inside the clock-skew window, shared by every provider
process through the database, so that a replayed request is refused by any of them.

A nonce is written without waiting for the disk (SQLite ``synchronous=NORMAL`` in WAL
mode, PostgreSQL ``synchronous_commit=off``): losing the last few after a power cut only
reopens a replay window of the requests of those seconds, which are then also refused
by their timestamp within five minutes, while an fsync per request would serialise every
gateway's uploads behind the disk.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.provider.db.models import RequestNonce
from sgw.provider.db.schema import make_engine, session_factory, write_lock

LOG = logging.getLogger(__name__)

# Expired nonces are deleted at most this often (seconds).
PURGE_EVERY_S = 60.0


class NonceLedger:
    """Remembers (key id, nonce) pairs until they expire; ``first_use`` says if new."""

    def __init__(self, db_url: str) -> None:
        self._engine = make_engine(db_url)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_no_fsync)
        self._sessions: sessionmaker[Session] = session_factory(self._engine)
        self._last_purge = 0.0
        self._lock = threading.Lock()
        # Request threads queue for SQLite's one writer here, not in its busy sleeps.
        self._write_lock = write_lock(db_url)

    def close(self) -> None:
        self._engine.dispose()

    def first_use(self, key_id: str, nonce: str, expires: datetime) -> bool:
        """Records the nonce; False if it was recorded before (a replay)."""
        self._maybe_purge()
        try:
            with self._write_lock, self._sessions.begin() as s:
                if self._engine.dialect.name == "postgresql":
                    s.execute(text("SET LOCAL synchronous_commit TO OFF"))
                s.add(RequestNonce(key_id=key_id, nonce=nonce, expires=expires))
        except IntegrityError:
            return False
        return True

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_purge < PURGE_EVERY_S:
                return
            self._last_purge = now
        cutoff = datetime.now(UTC) - timedelta(seconds=1)
        with self._sessions.begin() as s:
            gone = s.execute(delete(RequestNonce).where(RequestNonce.expires < cutoff))
        LOG.debug("expired nonces purged", extra={"rows": getattr(gone, "rowcount", None)})


def _sqlite_no_fsync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
