"""Engines, sessions and schema upgrades for the provider's database.

SQLite (the embedded default) and PostgreSQL (``postgresql+psycopg://``; a plain
``postgresql://`` URL is given that driver). Every process that opens the database may call
``upgrade`` at start: on PostgreSQL an advisory lock makes concurrent upgrades wait for
each other.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

LOG = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")
# How long a SQLite connection waits for another writer before failing (seconds). Provider
# transactions are short; this only has to outlast a burst of concurrent commits.
_SQLITE_BUSY_TIMEOUT_S = 30.0
# Connections an engine keeps open: as many as request threads use at once (anyio's
# default of 40 worker threads), so that a burst of requests does not open and close a
# connection each (PRAGMAs on SQLite, a new server process on PostgreSQL).
_POOL_SIZE = 40
_POOL_OVERFLOW = 10
# pg_advisory_xact_lock key serialising schema upgrades ("sgw-mig" in ASCII).
_MIGRATION_LOCK_KEY = 0x7367772D6D6967


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the connection settings this schema relies on.

    SQLite: foreign keys on (segment rows must not be deleted while named, deletes
    cascade), WAL journal (readers do not block the writer) with full fsync (a commit the
    provider acknowledged must survive power loss: the gateway frees its log after it).
    ``kwargs`` go to ``sqlalchemy.create_engine``.
    """
    parsed = make_url(url)
    if "poolclass" not in kwargs and parsed.database not in (None, "", ":memory:"):
        kwargs.setdefault("pool_size", _POOL_SIZE)
        kwargs.setdefault("max_overflow", _POOL_OVERFLOW)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", _SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        # No commit copies the write-ahead log back into the database file (which also
        # syncs it): one that did, inside a writer's lock, stood every other writer still
        # for as long. The provider's control hub checkpoints from a thread instead
        # (ControlHub, every sweep), and SQLite does when the last connection closes.
        cursor.execute("PRAGMA wal_autocheckpoint = 0")
    finally:
        cursor.close()


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(url: str) -> AbstractContextManager[object]:
    """A lock for frequent small writes to the database at ``url``, shared in the process.

    SQLite takes one writer at a time, and a writer that finds the database locked sleeps
    in growing steps (up to 100 ms each) before it tries again: writers that take this
    lock first queue in the process instead and follow each other at once. A no-op for
    other databases (PostgreSQL locks rows).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return contextlib.nullcontext()
    key = parsed.database or ""
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def upsert_insert(dialect: str) -> Any:
    """The INSERT of ``dialect`` ("postgresql" or "sqlite") that takes ON CONFLICT clauses
    (both have one; SQLAlchemy's generic INSERT does not)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def bound_engine(sessions: sessionmaker[Session]) -> Engine | None:
    """The engine a session factory is bound to (None: bound to something else)."""
    bind = sessions.kw.get("bind")
    return bind if isinstance(bind, Engine) else None


def alembic_config() -> Config:
    """The Alembic configuration of the packaged migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {_MIGRATIONS}; the package is incomplete")
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; None before the first upgrade."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str) -> None:
    """Brings the database at ``url`` (empty or older) to the newest schema revision."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            before = MigrationContext.configure(conn).get_current_revision()
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            after = MigrationContext.configure(conn).get_current_revision()
        if before != after:
            LOG.info(
                "database schema upgraded",
                extra={
                    "url": engine.url.render_as_string(hide_password=True),
                    "from_revision": before,
                    "to_revision": after,
                },
            )
    finally:
        engine.dispose()
