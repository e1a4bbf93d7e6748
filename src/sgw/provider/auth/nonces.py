"""The nonces of signed requests seen inside the clock-skew window, shared by every provider
process through the database, so that a replayed request is refused by any of them.

A nonce is first looked up in this process's memory (a replay to the same process is
refused without the database), then written to the table ``request_nonces``, whose
primary key refuses a nonce any process wrote before. ``first_use_async`` (every signed
request is checked on the event loop) queues the nonce for one writer thread that
inserts many in one statement (``INSERT ... ON CONFLICT DO NOTHING``, one transaction per
group; on SQLite on the loop's own thread when that need not wait) and answers each once
its group is committed, so a request is never acted on before its nonce is in the
database.

A nonce is kept until ``KEEP_S`` after its request's timestamp (``expiry``): twice the
clock-skew window and a margin. A request is accepted while its timestamp is within the
window of the clock of the process that checks it, and expired nonces are deleted by
whichever process writes next, by its own clock: kept only one window long, a nonce
deleted by a process whose clock runs ahead could be replayed, still in time, to one
whose clock runs behind. Kept this long, the processes' clocks may differ by up to the
window and the margin.

A nonce is written without waiting for the disk (SQLite ``synchronous=NORMAL`` in WAL
mode, PostgreSQL ``synchronous_commit=off``): losing the last few after a power cut only
reopens a replay window of the requests of those seconds, which are then also refused
by their timestamp within five minutes, while an fsync per request would serialise every
gateway's uploads behind the disk.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table, delete, event, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from sgw.common.signing import CLOCK_SKEW_S
from sgw.provider.db.batching import GroupRunner
from sgw.provider.db.models import RequestNonce
from sgw.provider.db.raw import ThreadConnections, WouldBlock
from sgw.provider.db.schema import make_engine, write_lock

LOG = logging.getLogger(__name__)

# Seconds beyond twice the clock-skew window a nonce is kept: room for the provider
# processes' clocks to differ by more than the window (NTP keeps them far closer).
MARGIN_S = 60
# Seconds a nonce is kept after its request's timestamp (see the module's text).
KEEP_S = 2 * CLOCK_SKEW_S + MARGIN_S
# Expired nonces are deleted at most this often (seconds), at most PURGE_ROWS at a time:
# a delete of a minute's nonces at once held the database's writers up for a second.
PURGE_EVERY_S = 1.0
PURGE_ROWS = 5000
# Nonces remembered in memory are grouped by expiry in buckets of this many seconds.
_BUCKET_S = 30
# Rows per INSERT statement (three variables each; SQLite allows 32,766).
_ROWS_PER_INSERT = 1000
# (key id, nonce, expires)
Item = tuple[str, str, datetime]
T = TypeVar("T")


class NonceLedger:
    """Remembers (key id, nonce) pairs until they expire; ``first_use_async`` says if
    new."""

    def __init__(self, db_url: str, clock: Callable[[], float] = time.time) -> None:
        """``clock``: the wall clock (Unix seconds) that says which nonces expired."""
        self._engine = make_engine(db_url)
        self._clock = clock
        self._postgres = self._engine.dialect.name == "postgresql"
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_no_fsync)
        self._last_purge = 0.0
        self._lock = threading.Lock()
        # Request threads queue for SQLite's one writer here, not in its busy sleeps.
        self._write_lock = write_lock(db_url)
        # Seen in this process: expiry bucket -> hashes of "key id nonce" (64-bit,
        # randomised per process: a collision refuses one request, which the gateway
        # signs anew; about 1 in 10^9 with 200,000 remembered).
        self._seen: dict[int, set[int]] = {}
        self._seen_lock = threading.Lock()
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._groups: GroupRunner[Item, bool] | None = None
        self._conns = ThreadConnections(self._engine)  # the writer thread's (SQLite)
        to_db = RequestNonce.expires.type.dialect_impl(self._engine.dialect).bind_processor(
            self._engine.dialect
        )
        self._to_db: Callable[[datetime], Any] = to_db or (lambda v: v)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        self._conns.close()
        self._engine.dispose()

    @property
    def groups(self) -> tuple[int, int]:
        """Groups written by ``first_use_async`` and nonces in them (statistics)."""
        return (0, 0) if self._groups is None else (self._groups.batches, self._groups.items)

    async def first_use_async(self, key_id: str, nonce: str, expires: datetime) -> bool:
        """Records the nonce; False if it was recorded before (a replay), by this process
        (known at once) or another. Answered once the nonce's group is committed."""
        if not self._remember(key_id, nonce, expires):
            return False
        if self._groups is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nonce-w")
            self._groups = GroupRunner(
                self._insert_many,
                self._writer,
                # SQLite: on the loop's thread when it can be done at once (db.raw).
                run_now=None if self._postgres else self._insert_many_now,
            )
        return await self._groups.submit((key_id, nonce, expires))

    def _remember(self, key_id: str, nonce: str, expires: datetime) -> bool:
        """False if this process saw the nonce before; else remembers it."""
        h = hash(key_id + " " + nonce)
        bucket = int(expires.timestamp()) // _BUCKET_S
        with self._seen_lock:
            for seen in self._seen.values():
                if h in seen:
                    return False
            keys = self._seen.get(bucket)
            if keys is None:
                now = int(self._clock()) // _BUCKET_S
                for old in [b for b in self._seen if b < now]:
                    del self._seen[old]
                keys = self._seen[bucket] = set()
            keys.add(h)
        return True

    def _insert_many(self, items: list[Item]) -> list[bool | BaseException]:
        """Writes the nonces in one transaction; True for each that was new."""
        self._maybe_purge()
        if not self._postgres:
            return self._insert_many_sqlite(items)
        table: Table = RequestNonce.__table__  # type: ignore[assignment]
        rows = [{"key_id": k, "nonce": n, "expires": e} for k, n, e in items]
        stmt = (
            pg_insert(table)
            .values(rows)
            .on_conflict_do_nothing()
            .returning(table.c.key_id, table.c.nonce)
        )
        with self._write_lock, self._engine.begin() as c:
            c.execute(text("SET LOCAL synchronous_commit TO OFF"))
            written = {tuple(r) for r in c.execute(stmt)}
        out: list[bool | BaseException] = []
        for key_id, nonce, _expires in items:
            new = (key_id, nonce) in written
            written.discard((key_id, nonce))  # the same nonce twice in a group: once
            out.append(new)
        return out

    def _insert_many_now(self, items: list[Item]) -> list[bool | BaseException]:
        """``_insert_many`` if it can be done without waiting (WouldBlock otherwise)."""
        return self._insert_many_sqlite(items, nowait=True)

    def _insert_many_sqlite(
        self, items: list[Item], nowait: bool = False
    ) -> list[bool | BaseException]:
        """``_insert_many`` as plain SQL on the writer thread's own connection (SQLite):
        no statement to build and compile per group, and as few statements as can be.
        Python's sqlite3 lets go of the GIL for every step of every statement, and takes
        it back only when the event loop's thread gives it up (a switch interval at
        worst): a group of nonces is one INSERT (the rare group holding a nonce written
        before is written again row by row, to say which)."""
        unique = list(dict.fromkeys((k, n) for k, n, _e in items))
        expires = {(k, n): e for k, n, e in items}
        try:
            with self._conns.write(self._write_lock, nowait) as cur:
                for chunk in _batches(unique, _ROWS_PER_INSERT):
                    cur.execute(
                        "INSERT INTO request_nonces (key_id, nonce, expires) VALUES "
                        + ", ".join(["(?, ?, ?)"] * len(chunk))
                        + " ON CONFLICT DO NOTHING",
                        [v for k, n in chunk for v in (k, n, self._to_db(expires[k, n]))],
                    )
                    if cur.rowcount != len(chunk):
                        raise _SeenBeforeError
                self._delete_expired(cur, len(items))
        except _SeenBeforeError:
            if nowait:  # the slow path, in the writer thread
                raise WouldBlock from None
            return self._insert_each_sqlite(items)
        out: list[bool | BaseException] = []
        first: set[tuple[str, str]] = set()
        for key_id, nonce, _expires in items:  # the same nonce twice in a group: once
            out.append((key_id, nonce) not in first)
            first.add((key_id, nonce))
        return out

    def _insert_each_sqlite(self, items: list[Item]) -> list[bool | BaseException]:
        """``_insert_many_sqlite`` a row at a time, saying which were new."""
        out: list[bool | BaseException] = []
        with self._conns.write(self._write_lock, nowait=False) as cur:
            for key_id, nonce, expires in items:
                cur.execute(
                    "INSERT INTO request_nonces (key_id, nonce, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (key_id, nonce, self._to_db(expires)),
                )
                out.append(cur.rowcount == 1)
            self._delete_expired(cur, len(items))
        return out

    def _delete_expired(self, cur: sqlite3.Cursor, written: int) -> None:
        """Expired ones go as new ones come: twice as many at most, so the table keeps its
        size without a large delete ever holding up the writers."""
        cur.execute(
            "DELETE FROM request_nonces WHERE rowid IN (SELECT rowid FROM "
            "request_nonces WHERE expires < ? LIMIT ?)",
            (self._to_db(self._now()), 2 * written + 8),
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_purge < PURGE_EVERY_S:
                return
            self._last_purge = now
        cutoff = self._now()
        table: Table = RequestNonce.__table__  # type: ignore[assignment]
        expired = (
            select(table.c.key_id, table.c.nonce).where(table.c.expires < cutoff).limit(PURGE_ROWS)
        )
        with self._write_lock, self._engine.begin() as c:
            gone = c.execute(
                delete(table).where(tuple_(table.c.key_id, table.c.nonce).in_(expired))
            )
        LOG.debug("expired nonces purged", extra={"rows": getattr(gone, "rowcount", None)})


def expiry(timestamp: int) -> datetime:
    """When the nonce of a request signed at ``timestamp`` (Unix seconds) may go."""
    return datetime.fromtimestamp(timestamp + KEEP_S, UTC)


class _SeenBeforeError(Exception):
    """A group holds a nonce that was written before: it is written row by row."""


def _batches(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sqlite_no_fsync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
