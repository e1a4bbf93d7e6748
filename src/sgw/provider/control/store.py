"""The control channel's state in the database, shared by every control server.

- ``control_servers``: each running server's id, the URL its peers reach it at, and a
  heartbeat; a server without a recent heartbeat is gone.
- ``gateway_connections`` (the registration table): which server holds which gateway's
  long-poll, since when (``heartbeat``: when it last registered it). An entry is fresh
  while its server's heartbeat is; a server removes the entries of gateways whose
  connection closed or that stopped polling.
- ``control_messages``: commands for gateways and their outcomes (states in
  ``sgw.provider.db.models.ControlMessage``).

Blocking (SQLAlchemy): the hub calls it in worker threads. Writes that only say who is
alive (heartbeats, registrations) and message state changes are written without waiting
for the disk (SQLite ``synchronous=NORMAL`` in WAL mode: durable across a crash of the
process, not of the machine; PostgreSQL ``synchronous_commit=off`` for the heartbeats
only), since an admin waits for every command's reply and retries what got lost.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    case,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import IdempotencyKeyError, NotFoundError
from sgw.provider.db.models import (
    ControlMessage,
    ControlServer,
    GatewayConnection,
    UtcDateTime,
)
from sgw.provider.db.raw import ThreadConnections, WouldBlock
from sgw.provider.db.schema import make_engine, session_factory, upsert_insert, write_lock

QUEUED = "queued"
DELIVERED = "delivered"
ACKNOWLEDGED = "acknowledged"
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
OPEN = (QUEUED, DELIVERED, ACKNOWLEDGED)
TERMINAL = (SUCCEEDED, FAILED, EXPIRED)
# Rows per statement when many gateways are registered or refreshed at once.
_BATCH = 500
_MESSAGES: Table = ControlMessage.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A command for a gateway and what became of it."""

    id: str
    account_id: str
    gateway_id: str
    type: str
    args: dict[str, Any]
    idempotency_key: str
    status: str
    origin_server: str | None
    created: datetime
    expires: datetime
    delivered: datetime | None
    deliveries: int
    acknowledged: datetime | None
    completed: datetime | None
    result: dict[str, Any] | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class Holder:
    """The registration of a gateway: the server holding it, and whether both the entry
    and the server are fresh (heartbeats recent)."""

    gateway_id: str
    server_id: str
    url: str | None
    since: datetime
    heartbeat: datetime
    fresh: bool


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A command to store for a gateway."""

    account_id: str
    gateway_id: str
    type: str
    args: dict[str, Any]
    idempotency_key: str | None
    ttl_s: float
    origin_server: str | None

    def values(self, now: datetime) -> dict[str, Any]:
        """The new row's columns (a new message id)."""
        message_id = str(uuid.uuid4())
        return {
            "id": message_id,
            "account_id": self.account_id,
            "gateway_id": self.gateway_id,
            "type": self.type,
            "args": json.dumps(self.args, sort_keys=True, separators=(",", ":")),
            "idempotency_key": self.idempotency_key or message_id,
            "status": QUEUED,
            "origin_server": self.origin_server,
            "created": now,
            "expires": now + timedelta(seconds=self.ttl_s),
            "delivered": None,
            "deliveries": 0,
            "acknowledged": None,
            "completed": None,
            "result": None,
            "error": None,
        }


@dataclass(frozen=True, slots=True)
class Completion:
    """A gateway's reply to one of its messages."""

    gateway_id: str
    message_id: str
    succeeded: bool
    result: dict[str, Any] | None
    error: str | None


class ControlStore:
    """Messages, registrations and server rows."""

    def __init__(self, db_url: str) -> None:
        self._engine: Engine = make_engine(db_url)
        self.dialect = self._engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self._engine, "connect", _sqlite_normal_sync)
        self._sessions: sessionmaker[Session] = session_factory(self._engine)
        self._write_lock = write_lock(db_url)
        # SQLite: the hot path's statements as plain SQL (see _SqliteHot).
        self._hot = _SqliteHot(self._engine, self._write_lock) if self.dialect == "sqlite" else None

    def close(self) -> None:
        if self._hot is not None:
            self._hot.close()
        self._engine.dispose()

    def _now_hot(self, nowait: bool) -> _SqliteHot | None:
        """The SQLite hot path; with ``nowait`` on another database: WouldBlock (those
        writes go to a thread)."""
        if nowait and self._hot is None:
            raise WouldBlock
        return self._hot

    def checkpoint(self) -> None:
        """SQLite: copies the write-ahead log into the database file (the event loop's
        own writes never do; see sgw.provider.db.raw). A no-op elsewhere."""
        if self._hot is not None:
            self._hot.checkpoint()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Session]:
        """A write transaction, queued behind the process's other frequent writers."""
        with self._write_lock, self._sessions.begin() as s:
            yield s

    @contextlib.contextmanager
    def _core(self) -> Iterator[Connection]:
        """``_writing`` without the ORM (SQL statements on a connection): the hot path's
        writes (polls, replies, new commands), a fraction of the ORM's CPU per row."""
        with self._write_lock, self._engine.begin() as c:
            yield c

    def _insert(self) -> Any:
        return upsert_insert(self.dialect)

    def _relaxed(self, s: Session) -> None:
        if self.dialect == "postgresql":
            s.execute(text("SET LOCAL synchronous_commit TO OFF"))

    # -- servers -------------------------------------------------------------------------

    def server_heartbeat(self, server_id: str, url: str, now: datetime) -> None:
        """Creates or refreshes the server's row."""
        insert = self._insert()
        stmt = insert(ControlServer).values(id=server_id, url=url, started=now, heartbeat=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"], set_={"heartbeat": stmt.excluded.heartbeat, "url": url}
        )
        with self._writing() as s:
            self._relaxed(s)
            s.execute(stmt)

    def live_servers(self, now: datetime, ttl_s: float) -> list[tuple[str, str]]:
        """(id, url) of the servers with a heartbeat within ``ttl_s``."""
        cutoff = now - timedelta(seconds=ttl_s)
        with self._sessions() as s:
            rows = s.execute(
                select(ControlServer.id, ControlServer.url)
                .where(ControlServer.heartbeat >= cutoff)
                .order_by(ControlServer.started)
            )
            return [(str(i), str(u)) for i, u in rows]

    def remove_server(self, server_id: str) -> None:
        """Forgets a server that stops, with its registrations."""
        with self._writing() as s:
            s.execute(delete(GatewayConnection).where(GatewayConnection.server_id == server_id))
            s.execute(delete(ControlServer).where(ControlServer.id == server_id))

    def purge_servers(self, before: datetime) -> int:
        """Deletes rows of servers silent since ``before`` (and their registrations)."""
        with self._writing() as s:
            gone = list(s.scalars(select(ControlServer.id).where(ControlServer.heartbeat < before)))
            for chunk in _chunks(gone):
                s.execute(delete(GatewayConnection).where(GatewayConnection.server_id.in_(chunk)))
                s.execute(delete(ControlServer).where(ControlServer.id.in_(chunk)))
            return len(gone)

    # -- registrations -------------------------------------------------------------------

    def register(self, server_id: str, gateway_ids: Iterable[str], now: datetime) -> None:
        """Records that ``server_id`` holds these gateways now."""
        insert = self._insert()
        for chunk in _chunks(list(gateway_ids)):
            rows = [
                {"gateway_id": g, "server_id": server_id, "since": now, "heartbeat": now}
                for g in chunk
            ]
            stmt = insert(GatewayConnection).values(rows)
            moved = GatewayConnection.server_id != stmt.excluded.server_id
            stmt = stmt.on_conflict_do_update(
                index_elements=["gateway_id"],
                set_={
                    "server_id": stmt.excluded.server_id,
                    "since": case((moved, stmt.excluded.since), else_=GatewayConnection.since),
                    "heartbeat": stmt.excluded.heartbeat,
                },
            )
            with self._writing() as s:
                self._relaxed(s)
                s.execute(stmt)

    def unregister(self, server_id: str, gateway_id: str) -> None:
        """Drops the registration if it still names this server (the gateway went away)."""
        with self._writing() as s:
            s.execute(
                delete(GatewayConnection).where(
                    GatewayConnection.gateway_id == gateway_id,
                    GatewayConnection.server_id == server_id,
                )
            )

    def unregister_many(self, server_id: str, gateway_ids: Iterable[str]) -> None:
        """``unregister`` for many gateways."""
        for chunk in _chunks(list(gateway_ids)):
            with self._writing() as s:
                s.execute(
                    delete(GatewayConnection).where(
                        GatewayConnection.gateway_id.in_(chunk),
                        GatewayConnection.server_id == server_id,
                    )
                )

    def holder(self, gateway_id: str, now: datetime, ttl_s: float) -> Holder | None:
        """Who holds the gateway, as registered (None: nobody); fresh while the holding
        server's heartbeat is within ``ttl_s``."""
        cutoff = now - timedelta(seconds=ttl_s)
        with self._sessions() as s:
            row = s.execute(
                select(GatewayConnection, ControlServer.url, ControlServer.heartbeat)
                .outerjoin(ControlServer, ControlServer.id == GatewayConnection.server_id)
                .where(GatewayConnection.gateway_id == gateway_id)
            ).first()
        if row is None:
            return None
        conn, url, server_beat = row
        fresh = server_beat is not None and server_beat >= cutoff
        return Holder(conn.gateway_id, conn.server_id, url, conn.since, conn.heartbeat, fresh)

    # -- messages ------------------------------------------------------------------------

    def post(self, item: NewMessage, now: datetime) -> tuple[MessageInfo, bool]:
        """Stores a new message (True), or returns the one posted before under the same
        idempotency key (False; IdempotencyKeyError if it was a different command)."""
        result = self.post_many([item], now)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def post_many(
        self, items: Sequence[NewMessage], now: datetime, *, nowait: bool = False
    ) -> list[tuple[MessageInfo, bool] | BaseException]:
        """``post`` for many messages, in one transaction when none conflicts. With
        ``nowait``: WouldBlock (nothing written) unless that can be done at once."""
        hot = self._now_hot(nowait)
        rows = [item.values(now) for item in items]
        try:
            if hot is not None:
                hot.insert(rows, nowait)
            else:
                with self._core() as c:
                    c.execute(_MESSAGES.insert(), rows)
            return [(_info_of(r), True) for r in rows]
        except (IntegrityError, sqlite3.IntegrityError):
            if nowait:  # an idempotency key seen before: the slow path, in a thread
                raise WouldBlock from None
        out: list[tuple[MessageInfo, bool] | BaseException] = []
        for item, values in zip(items, rows, strict=True):
            try:
                out.append(self._post_one(item, ControlMessage(**values)))
            except (NotFoundError, IdempotencyKeyError) as exc:
                out.append(exc)
        return out

    def _post_one(self, item: NewMessage, row: ControlMessage) -> tuple[MessageInfo, bool]:
        fresh = ControlMessage(**{c.key: getattr(row, c.key) for c in ControlMessage.__table__.c})
        try:
            with self._writing() as s:
                s.add(fresh)
            return _info(fresh), True
        except IntegrityError:
            pass
        with self._sessions() as s:
            old = s.scalar(
                select(ControlMessage).where(
                    ControlMessage.gateway_id == item.gateway_id,
                    ControlMessage.idempotency_key == row.idempotency_key,
                )
            )
        if old is None:  # the conflict was not the key (the gateway is gone)
            raise NotFoundError(f"gateway {item.gateway_id} not found in account {item.account_id}")
        if old.type != row.type or old.args != row.args or old.account_id != item.account_id:
            raise IdempotencyKeyError(
                f"idempotency key {row.idempotency_key!r} was used for another command to "
                "this gateway; use a new key for a new command"
            )
        return _info(old), False

    def find(self, account_id: str, gateway_id: str, idempotency_key: str) -> MessageInfo | None:
        """The account's message to the gateway posted under this key, if any."""
        with self._sessions() as s:
            row = s.scalar(
                select(ControlMessage).where(
                    ControlMessage.gateway_id == gateway_id,
                    ControlMessage.idempotency_key == idempotency_key,
                )
            )
            return None if row is None or row.account_id != account_id else _info(row)

    def newest_under_prefix(
        self, gateway_id: str, key_prefix: str, type_: str, status: str, limit: int
    ) -> list[MessageInfo]:
        """The gateway's newest messages of this type and status whose idempotency key
        starts with ``key_prefix`` (exactly: LIKE may ignore case)."""
        with self._sessions() as s:
            rows = s.scalars(
                select(ControlMessage)
                .where(
                    ControlMessage.gateway_id == gateway_id,
                    ControlMessage.idempotency_key.startswith(key_prefix),
                    ControlMessage.type == type_,
                    ControlMessage.status == status,
                )
                .order_by(ControlMessage.created.desc())
                .limit(limit)
            )
            infos = [_info(r) for r in rows]
        return [i for i in infos if i.idempotency_key.startswith(key_prefix)]

    def take_pending_many(
        self,
        polls: Sequence[tuple[str, Sequence[str], bool]],
        now: datetime,
        *,
        redeliver_after_s: float,
        limit: int,
        nowait: bool = False,
    ) -> list[list[MessageInfo] | BaseException]:
        """For polls ``(gateway id, acknowledged message ids, look)``: records the
        acknowledgements (messages the gateway holds durably now), then, if ``look``,
        returns the gateway's messages to deliver (queued, or delivered without an
        acknowledgement for ``redeliver_after_s``), marked delivered, oldest first, at
        most ``limit``; all in one transaction. ``nowait``: as for ``post_many``."""
        hot = self._now_hot(nowait)
        if hot is not None:
            return hot.take(polls, now, redeliver_after_s, limit, nowait)
        t = _MESSAGES
        again = now - timedelta(seconds=redeliver_after_s)
        gateways = list(dict.fromkeys(g for g, _acks, look in polls if look))
        taken: dict[str, list[MessageInfo]] = {}
        with self._core() as c:
            for gateway_id, acks, _look in polls:
                if acks:
                    c.execute(
                        t.update()
                        .where(
                            t.c.gateway_id == gateway_id,
                            t.c.id.in_(list(acks)),
                            t.c.status.in_((QUEUED, DELIVERED)),
                        )
                        .values(status=ACKNOWLEDGED, acknowledged=now)
                    )
            for chunk in _chunks(gateways):
                due = (
                    t.c.gateway_id.in_(chunk),
                    or_(
                        t.c.status == QUEUED,
                        (t.c.status == DELIVERED) & (t.c.delivered < again),
                    ),
                    t.c.expires > now,
                )
                query = select(t.c.id, t.c.gateway_id).where(*due).order_by(t.c.created, t.c.id)
                if self.dialect == "postgresql":  # another server's poll takes others
                    query = query.with_for_update(skip_locked=True)
                per_gateway: dict[str, list[str]] = {}
                for message_id, gateway_id in c.execute(query):
                    ids = per_gateway.setdefault(gateway_id, [])
                    if len(ids) < limit:
                        ids.append(message_id)
                ids = [i for group in per_gateway.values() for i in group]
                if not ids:
                    continue
                # Guarded again: a message cancelled meanwhile stays cancelled.
                rows = c.execute(
                    t.update()
                    .where(t.c.id.in_(ids), *due)
                    .values(status=DELIVERED, delivered=now, deliveries=t.c.deliveries + 1)
                    .returning(*t.c)
                ).all()
                for r in sorted(rows, key=lambda r: (r.created, r.id)):
                    taken.setdefault(r.gateway_id, []).append(_info_of(r._mapping))
        out: list[list[MessageInfo] | BaseException] = []
        for gateway_id, _acks, _look in polls:
            out.append(taken.pop(gateway_id, []))  # a second poll of a gateway: nothing
        return out

    def mark_delivered_many(
        self, message_ids: Sequence[str], now: datetime, *, nowait: bool = False
    ) -> None:
        """Records the delivery of messages handed to a poll without reading them back
        (those still queued: one acknowledged, finished or expired meanwhile stays so).
        ``nowait``: as for ``post_many``."""
        hot = self._now_hot(nowait)
        if hot is not None:
            return hot.mark_delivered(message_ids, now, nowait)
        t = _MESSAGES
        with self._core() as c:
            for chunk in _chunks(list(message_ids)):
                c.execute(
                    t.update()
                    .where(t.c.id.in_(chunk), t.c.status == QUEUED)
                    .values(status=DELIVERED, delivered=now, deliveries=t.c.deliveries + 1)
                )
        return None

    def complete_many(
        self, replies: Sequence[Completion], now: datetime, *, nowait: bool = False
    ) -> list[tuple[MessageInfo | None, bool] | BaseException]:
        """Records gateways' replies (the first reply of a message wins), in one
        transaction. For each: the message (None if its gateway has no such message) and
        whether this reply finished it. ``nowait``: as for ``post_many``."""
        hot = self._now_hot(nowait)
        if hot is not None:
            return hot.complete(replies, now, nowait)
        t = _MESSAGES
        out: list[tuple[MessageInfo | None, bool] | BaseException] = []
        with self._core() as c:
            for reply in replies:
                # Only an open message changes; on PostgreSQL a concurrent reply through
                # another server waits for this row and then finds it finished.
                row = c.execute(
                    t.update()
                    .where(
                        t.c.id == reply.message_id,
                        t.c.gateway_id == reply.gateway_id,
                        t.c.status.in_(OPEN),
                    )
                    .values(
                        status=SUCCEEDED if reply.succeeded else FAILED,
                        completed=now,
                        acknowledged=func.coalesce(t.c.acknowledged, now),
                        result=None if reply.result is None else json.dumps(reply.result),
                        error=reply.error,
                    )
                    .returning(*t.c)
                ).first()
                if row is not None:
                    out.append((_info_of(row._mapping), True))
                    continue
                row = c.execute(select(*t.c).where(t.c.id == reply.message_id)).first()
                if row is None or row.gateway_id != reply.gateway_id:
                    out.append((None, False))
                else:
                    out.append((_info_of(row._mapping), False))
        return out

    def cancel(
        self, account_id: str, gateway_id: str, message_id: str, now: datetime
    ) -> tuple[MessageInfo, bool]:
        """Expires a command no poll took yet (it can never run then); returns it and
        whether this call expired it (False: delivered, taken or finished already; a
        delivered one is refused by the gateway once past its deadline)."""
        self.get(account_id, gateway_id, message_id)
        with self._writing() as s:
            res = s.execute(
                update(ControlMessage)
                .where(ControlMessage.id == message_id, ControlMessage.status == QUEUED)
                .values(status=EXPIRED, completed=now, error="cancelled by an admin")
            )
            changed = bool(getattr(res, "rowcount", 0))
        return self.get(account_id, gateway_id, message_id), changed

    def get(self, account_id: str, gateway_id: str, message_id: str) -> MessageInfo:
        with self._sessions() as s:
            row = s.get(ControlMessage, message_id)
            if row is None or row.account_id != account_id or row.gateway_id != gateway_id:
                raise NotFoundError(f"command {message_id} not found for gateway {gateway_id}")
            return _info(row)

    def get_many(self, message_ids: Sequence[str]) -> list[MessageInfo]:
        out: list[MessageInfo] = []
        with self._sessions() as s:
            for chunk in _chunks(list(message_ids)):
                rows = s.scalars(select(ControlMessage).where(ControlMessage.id.in_(chunk)))
                out.extend(_info(r) for r in rows)
        return out

    def list_messages(self, account_id: str, gateway_id: str, limit: int) -> list[MessageInfo]:
        """The gateway's newest messages, newest first."""
        with self._sessions() as s:
            rows = s.scalars(
                select(ControlMessage)
                .where(
                    ControlMessage.account_id == account_id,
                    ControlMessage.gateway_id == gateway_id,
                )
                .order_by(ControlMessage.created.desc(), ControlMessage.id)
                .limit(limit)
            )
            return [_info(r) for r in rows]

    def expire_due(self, now: datetime, *, delivered_grace_s: float) -> list[MessageInfo]:
        """Expires queued messages past their deadline, and delivered ones that were not
        acknowledged ``delivered_grace_s`` after it (the gateway refuses to start a
        message past its deadline, so none of them runs any more). Returns those this
        call expired."""
        grace = now - timedelta(seconds=delivered_grace_s)
        due = or_(
            (ControlMessage.status == QUEUED) & (ControlMessage.expires <= now),
            (ControlMessage.status == DELIVERED) & (ControlMessage.expires <= grace),
        )
        with self._writing() as s:
            ids = list(s.scalars(select(ControlMessage.id).where(due).limit(_BATCH)))
            if not ids:
                return []
            out = []
            for message_id in ids:
                res = s.execute(
                    update(ControlMessage)
                    .where(ControlMessage.id == message_id, due)
                    .values(
                        status=EXPIRED,
                        completed=now,
                        error="the gateway did not take the command before its deadline "
                        "(offline or unreachable)",
                    )
                )
                if getattr(res, "rowcount", 0):
                    row = s.get(ControlMessage, message_id)
                    if row is not None:
                        out.append(_info(row))
            return out

    def gateways_with_pending(self, now: datetime, *, redeliver_after_s: float) -> set[str]:
        """Gateways with a message to deliver now."""
        again = now - timedelta(seconds=redeliver_after_s)
        with self._sessions() as s:
            rows = s.scalars(
                select(ControlMessage.gateway_id)
                .where(
                    or_(
                        ControlMessage.status == QUEUED,
                        (ControlMessage.status == DELIVERED) & (ControlMessage.delivered < again),
                    ),
                    ControlMessage.expires > now,
                )
                .distinct()
            )
            return set(rows)

    def purge_messages(self, before: datetime) -> int:
        """Deletes finished messages completed before ``before``."""
        with self._writing() as s:
            res = s.execute(
                delete(ControlMessage).where(
                    ControlMessage.status.in_(TERMINAL), ControlMessage.completed < before
                )
            )
            return int(getattr(res, "rowcount", 0) or 0)


class _SqliteHot:
    """The hot path's writes on SQLite as plain SQL on a connection of the calling
    thread (the hub's writer): the same statements SQLAlchemy would send, without
    building, compiling and wrapping them per call, which cost more CPU than SQLite
    itself. Values are converted by the columns' own types, so rows are stored exactly
    as through SQLAlchemy. Each call takes the process's write lock; with ``nowait`` it
    runs only if it can at once (``ThreadConnections.write``)."""

    def __init__(self, engine: Engine, lock: Any) -> None:
        self._engine = engine
        self._lock = lock
        t = _MESSAGES
        self.columns = [c.name for c in t.c]
        self._names = ", ".join(self.columns)
        date_type = t.c.created.type.dialect_impl(engine.dialect)
        to_db = date_type.bind_processor(engine.dialect)
        from_db = date_type.result_processor(engine.dialect, None)
        assert to_db is not None and from_db is not None
        self.to_db: Callable[[Any], Any] = to_db
        self.from_db: Callable[[Any], Any] = from_db
        self.dates = [isinstance(c.type, UtcDateTime) for c in t.c]
        self._conns = ThreadConnections(engine)

    def close(self) -> None:
        self._conns.close()

    def checkpoint(self) -> None:
        self._conns.checkpoint()

    def _info(self, row: Sequence[Any]) -> MessageInfo:
        values = {
            name: self.from_db(v) if date else v
            for name, v, date in zip(self.columns, row, self.dates, strict=True)
        }
        return _info_of(values)

    def insert(self, rows: list[dict[str, Any]], nowait: bool) -> None:
        marks = ", ".join("?" * len(self.columns))
        params = [
            [
                self.to_db(r[c]) if date else r[c]
                for c, date in zip(self.columns, self.dates, strict=True)
            ]
            for r in rows
        ]
        with self._conns.write(self._lock, nowait) as cur:
            cur.executemany(
                f"INSERT INTO control_messages ({self._names}) VALUES ({marks})", params
            )

    def take(
        self,
        polls: Sequence[tuple[str, Sequence[str], bool]],
        now: datetime,
        redeliver_after_s: float,
        limit: int,
        nowait: bool,
    ) -> list[list[MessageInfo] | BaseException]:
        now_db = self.to_db(now)
        again_db = self.to_db(now - timedelta(seconds=redeliver_after_s))
        gateways = list(dict.fromkeys(g for g, _acks, look in polls if look))
        due = "(status = 'queued' OR (status = 'delivered' AND delivered < ?)) AND expires > ?"
        # The same for the look, by the (status, gateway) index: only open messages are
        # read, however long the gateway's history (the guard below goes by primary key).
        open_due = f"status IN ('queued', 'delivered') AND {due}"
        taken: dict[str, list[MessageInfo]] = {}
        with self._conns.write(self._lock, nowait) as cur:
            for gateway_id, acks, _look in polls:
                for chunk in _chunks(list(acks)):
                    cur.execute(
                        "UPDATE control_messages SET status = 'acknowledged', acknowledged = ? "
                        f"WHERE gateway_id = ? AND id IN ({_marks(chunk)}) "
                        "AND status IN ('queued', 'delivered')",
                        [now_db, gateway_id, *chunk],
                    )
            for chunk in _chunks(gateways):
                cur.execute(
                    "SELECT id, gateway_id FROM control_messages "
                    f"WHERE gateway_id IN ({_marks(chunk)}) AND {open_due} ORDER BY created, id",
                    [*chunk, again_db, now_db],
                )
                per_gateway: dict[str, list[str]] = {}
                for message_id, gateway_id in cur.fetchall():
                    ids = per_gateway.setdefault(gateway_id, [])
                    if len(ids) < limit:
                        ids.append(message_id)
                ids = [i for group in per_gateway.values() for i in group]
                if not ids:
                    continue
                # Guarded again: a message cancelled meanwhile stays cancelled.
                cur.execute(
                    "UPDATE control_messages SET status = 'delivered', delivered = ?, "
                    f"deliveries = deliveries + 1 WHERE id IN ({_marks(ids)}) AND {due} "
                    f"RETURNING {self._names}",
                    [now_db, *ids, again_db, now_db],
                )
                infos = [self._info(r) for r in cur.fetchall()]
                for info in sorted(infos, key=lambda m: (m.created, m.id)):
                    taken.setdefault(info.gateway_id, []).append(info)
        return [taken.pop(gateway_id, []) for gateway_id, _acks, _look in polls]

    def mark_delivered(self, message_ids: Sequence[str], now: datetime, nowait: bool) -> None:
        now_db = self.to_db(now)
        with self._conns.write(self._lock, nowait) as cur:
            for chunk in _chunks(list(message_ids)):
                cur.execute(
                    "UPDATE control_messages SET status = 'delivered', delivered = ?, "
                    f"deliveries = deliveries + 1 WHERE id IN ({_marks(chunk)}) "
                    "AND +status = 'queued'",  # + : by the primary key, not the status
                    [now_db, *chunk],
                )

    def complete(
        self, replies: Sequence[Completion], now: datetime, nowait: bool
    ) -> list[tuple[MessageInfo | None, bool] | BaseException]:
        now_db = self.to_db(now)
        out: list[tuple[MessageInfo | None, bool] | BaseException] = []
        with self._conns.write(self._lock, nowait) as cur:
            for reply in replies:
                cur.execute(
                    "UPDATE control_messages SET status = ?, completed = ?, "
                    "acknowledged = coalesce(acknowledged, ?), result = ?, error = ? "
                    "WHERE id = ? AND gateway_id = ? "
                    "AND status IN ('queued', 'delivered', 'acknowledged') "
                    f"RETURNING {self._names}",
                    [
                        SUCCEEDED if reply.succeeded else FAILED,
                        now_db,
                        now_db,
                        None if reply.result is None else json.dumps(reply.result),
                        reply.error,
                        reply.message_id,
                        reply.gateway_id,
                    ],
                )
                row = cur.fetchone()
                if row is not None:
                    out.append((self._info(row), True))
                    continue
                cur.execute(
                    f"SELECT {self._names} FROM control_messages WHERE id = ?",
                    [reply.message_id],
                )
                row = cur.fetchone()
                info = None if row is None else self._info(row)
                if info is None or info.gateway_id != reply.gateway_id:
                    out.append((None, False))
                else:
                    out.append((info, False))
        return out


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" * len(items))


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def _info_of(r: Mapping[Any, Any]) -> MessageInfo:
    """A message from its columns (a row of ``_MESSAGES`` or the values inserted)."""
    result = r["result"]
    return MessageInfo(
        id=r["id"],
        account_id=r["account_id"],
        gateway_id=r["gateway_id"],
        type=r["type"],
        args=json.loads(r["args"]),
        idempotency_key=r["idempotency_key"],
        status=r["status"],
        origin_server=r["origin_server"],
        created=r["created"],
        expires=r["expires"],
        delivered=r["delivered"],
        deliveries=r["deliveries"],
        acknowledged=r["acknowledged"],
        completed=r["completed"],
        result=None if result is None else json.loads(result),
        error=r["error"],
    )


def _info(r: ControlMessage) -> MessageInfo:
    return MessageInfo(
        id=r.id,
        account_id=r.account_id,
        gateway_id=r.gateway_id,
        type=r.type,
        args=json.loads(r.args),
        idempotency_key=r.idempotency_key,
        status=r.status,
        origin_server=r.origin_server,
        created=r.created,
        expires=r.expires,
        delivered=r.delivered,
        deliveries=r.deliveries,
        acknowledged=r.acknowledged,
        completed=r.completed,
        result=None if r.result is None else json.loads(r.result),
        error=r.error,
    )


def _sqlite_normal_sync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
