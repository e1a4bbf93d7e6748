"""Chunk maps on real databases (SQLite file and PostgreSQL server): migrations, commits,
optimistic concurrency, idempotent retries, snapshots, diffs and GC references."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, inspect, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import NotFoundError, VersionConflictError
from sgw.provider.blockstore.maps import (
    ChunkMaps,
    IdempotencyKeyError,
    NameTakenError,
    SnapshotStateError,
    SnapshotStatus,
    VolumeMode,
)
from sgw.provider.db.models import (
    SEGMENT_CHUNKS,
    Account,
    Base,
    CommitRecord,
    Gateway,
    MapSegment,
    Volume,
    VolumeSegment,
)
from sgw.provider.db.schema import (
    bound_engine,
    current_revision,
    head_revision,
    make_engine,
    session_factory,
    upgrade,
)
from tests.fixtures.waiting import wait_for

KIB = 1 << 10
MIB = 1 << 20
TIB = 1 << 40
SMALL_CHUNK = 4 * KIB


def cid(n: object) -> str:
    """A chunk id (as the gateway would make: SHA-256 hex)."""
    return hashlib.sha256(repr(n).encode()).hexdigest()


@dataclass
class Db:
    maps: ChunkMaps
    sessions: sessionmaker[Session]
    account: str
    other_account: str

    def count(self, model: Any) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def segment_bytes(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.sum(func.length(MapSegment.data)))) or 0)

    def pointers(self, volume_id: str) -> dict[int, int]:
        with self.sessions() as s:
            rows = s.execute(
                select(VolumeSegment.segment_index, VolumeSegment.segment_id).where(
                    VolumeSegment.volume_id == volume_id
                )
            )
            return {i: seg for i, seg in rows}

    def volume(self, size: int = 4 * SEGMENT_CHUNKS * SMALL_CHUNK, **kwargs: Any) -> str:
        kwargs.setdefault("chunk_size", SMALL_CHUNK)
        name = kwargs.pop("name", "vol-" + uuid.uuid4().hex[:8])
        return self.maps.create_volume(self.account, name, size, **kwargs).id


def add_account(sessions: sessionmaker[Session], name: str) -> str:
    with sessions.begin() as s:
        account = Account(id=str(uuid.uuid4()), name=name)
        s.add(account)
    return account.id


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    yield Db(
        ChunkMaps(sessions), sessions, add_account(sessions, "acme"), add_account(sessions, "other")
    )
    engine.dispose()


def test_migrations_apply_to_empty_database_and_are_idempotent(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= set(Base.metadata.tables)
            # The hand-written migration and the models describe the same schema.
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_volume_create_get_and_account_isolation(db: Db) -> None:
    with db.sessions.begin() as s:
        s.add(Gateway(id="gw-1", account_id=db.account, name="gw"))
    vol = db.maps.create_volume(db.account, "data", 10 * MIB, gateway_id="gw-1")
    assert (vol.size, vol.chunk_size, vol.mode, vol.map_version) == (10 * MIB, MIB, "cached", 0)
    assert vol.chunk_count == 10 and vol.created.tzinfo is not None
    assert db.maps.get_volume(db.account, vol.id) == vol
    with pytest.raises(NotFoundError):
        db.maps.get_volume(db.other_account, vol.id)
    with pytest.raises(NotFoundError):
        db.maps.get_volume(db.account, str(uuid.uuid4()))
    with pytest.raises(NameTakenError, match="data"):
        db.maps.create_volume(db.account, "data", MIB)
    # Names are per account; gateways too.
    other = db.maps.create_volume(db.other_account, "data", MIB, mode=VolumeMode.STORED)
    assert other.mode == "stored" and other.gateway_id is None
    with pytest.raises(NotFoundError, match="gateway"):
        db.maps.create_volume(db.other_account, "x", MIB, gateway_id="gw-1")
    with pytest.raises(NotFoundError, match="account"):
        db.maps.create_volume(str(uuid.uuid4()), "x", MIB)
    with pytest.raises(ValueError, match="power of two"):
        db.maps.create_volume(db.account, "x", MIB, chunk_size=3 * KIB)
    with pytest.raises(ValueError, match="positive"):
        db.maps.create_volume(db.account, "x", 0)
    db.maps.delete_volume(vol.id)
    with pytest.raises(NotFoundError):
        db.maps.get_volume(db.account, vol.id)
    with pytest.raises(NotFoundError):
        db.maps.delete_volume(vol.id)


def test_commit_read_back_sparse_and_zero_chunks(db: Db) -> None:
    vol = db.volume()
    last = 4 * SEGMENT_CHUNKS - 1
    v1 = db.maps.commit_changes(vol, 0, {0: cid(0), 5: cid(5), last: cid("last")}, "k1")
    assert v1 == 1
    assert db.maps.read_map(vol) == {0: cid(0), 5: cid(5), last: cid("last")}
    assert db.maps.read_map(vol, version=1) == db.maps.read_map(vol)
    assert db.maps.lookup(vol, 5) == cid(5)
    assert db.maps.lookup(vol, 6) is None
    assert db.maps.lookup(vol, SEGMENT_CHUNKS) is None
    # None: the chunk is all zero now, so it has no entry; zeroing a hole is harmless.
    v2 = db.maps.commit_changes(vol, v1, {5: None, 7: None, 0: cid("new")}, "k2")
    assert v2 == 2
    assert db.maps.read_map(vol) == {0: cid("new"), last: cid("last")}
    assert db.maps.get_volume(db.account, vol).map_version == 2
    with pytest.raises(VersionConflictError, match="version 2"):
        db.maps.read_map(vol, version=1)
    # Zeroing a whole segment removes its pointer and its segment row.
    db.maps.commit_changes(vol, v2, {last: None}, "k3")
    assert db.pointers(vol).keys() == {0}
    assert db.count(MapSegment) == 1
    # Bad input changes nothing.
    with pytest.raises(ValueError, match="out of range"):
        db.maps.commit_changes(vol, 3, {4 * SEGMENT_CHUNKS: cid(1)}, "k4")
    with pytest.raises(ValueError, match="out of range"):
        db.maps.commit_changes(vol, 3, {-1: cid(1)}, "k4")
    with pytest.raises(ValueError, match="not a chunk id"):
        db.maps.commit_changes(vol, 3, {1: "ABC"}, "k4")
    with pytest.raises(ValueError, match="out of range"):
        db.maps.lookup(vol, 4 * SEGMENT_CHUNKS)
    assert db.maps.get_volume(db.account, vol).map_version == 3
    with pytest.raises(NotFoundError):
        db.maps.commit_changes(str(uuid.uuid4()), 0, {}, "k")
    with pytest.raises(NotFoundError):
        db.maps.read_map(str(uuid.uuid4()))


def test_only_touched_segments_are_rewritten(db: Db) -> None:
    vol = db.volume()
    version = db.maps.commit_changes(
        vol, 0, {i * SEGMENT_CHUNKS + j: cid((i, j)) for i in range(4) for j in range(50)}, "fill"
    )
    before = db.pointers(vol)
    assert len(before) == 4 and db.count(MapSegment) == 4
    version = db.maps.commit_changes(
        vol, version, {2 * SEGMENT_CHUNKS + 7: cid("x"), 2 * SEGMENT_CHUNKS + 900: cid("y")}, "a"
    )
    after = db.pointers(vol)
    assert {i for i in before if before[i] != after[i]} == {2}
    assert db.count(MapSegment) == 4  # the replaced segment row was dropped
    # A snapshot keeps the old segment alive; the next commit adds exactly one row.
    db.maps.create_snapshot(vol)
    db.maps.commit_changes(vol, version, {SEGMENT_CHUNKS + 3: cid("z")}, "b")
    assert db.count(MapSegment) == 5
    assert {i for i in after if after[i] != db.pointers(vol)[i]} == {1}
    # Rewriting a chunk with its own id changes no segment at all.
    segments = db.pointers(vol)
    db.maps.commit_changes(vol, version + 1, {SEGMENT_CHUNKS + 3: cid("z"), 60: None}, "c")
    assert db.pointers(vol) == segments and db.count(MapSegment) == 5


def test_terabyte_volume_stays_small(db: Db) -> None:
    vol = db.maps.create_volume(db.account, "big", TIB)
    assert vol.chunk_count == 1 << 20
    model: dict[int, str] = {}
    version = 0
    for n in range(6):
        changes = {(n * 179_999 + k * 65_537) % vol.chunk_count: cid((n, k)) for k in range(4)}
        version = db.maps.commit_changes(vol.id, version, changes, f"batch-{n}")
        model.update(changes)
    snap = db.maps.create_snapshot(vol.id)
    assert db.maps.read_map(vol.id) == model == db.maps.read_map(None, snapshot_id=snap)
    # One segment row per touched GiB, each a format byte plus 34 bytes per chunk.
    assert db.count(MapSegment) == len({i // SEGMENT_CHUNKS for i in model})
    assert db.segment_bytes() == db.count(MapSegment) + 34 * len(model)
    assert db.maps.lookup(vol.id, vol.chunk_count - 1) is None


def _race(n: int, call: Callable[[int], int]) -> list[int | Exception]:
    """Runs ``call(i)`` in ``n`` threads released together; results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[int | Exception] = [0] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_commits_on_one_base_exactly_one_wins(db: Db) -> None:
    vol = db.volume()
    for round_ in range(5):

        def commit(i: int, r: int = round_) -> int:
            return db.maps.commit_changes(vol, r, {i: cid((r, i))}, f"r{r}-{i}")

        results = _race(2, commit)
        wins = [i for i, r in enumerate(results) if isinstance(r, int)]
        losses = [r for r in results if isinstance(r, VersionConflictError)]
        assert len(wins) == 1 and len(losses) == 1, results
        assert results[wins[0]] == round_ + 1
        assert db.maps.lookup(vol, wins[0]) == cid((round_, wins[0]))
        assert db.maps.lookup(vol, 1 - wins[0]) != cid((round_, 1 - wins[0]))
    assert db.maps.get_volume(db.account, vol).map_version == 5


def test_commit_waiting_for_a_writer_sees_its_result(db: Db) -> None:
    """A commit that has to wait for another writer's lock re-checks after it: conflict."""
    vol = db.volume()
    engine = bound_engine(db.sessions)
    assert engine is not None
    blocked = threading.Event()
    traced: list[Any] = []
    outcome: list[object] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(_result(lambda: db.maps.commit_changes(vol, 0, {}, "w")))
    )

    def on_execute(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        # SQLite: its trace callback runs as the statement starts running, before it asks
        # for the write lock; from then on it cannot finish while the holder holds it.
        if threading.current_thread() is waiter and statement.startswith("UPDATE volumes"):
            raw = cursor.connection
            raw.set_trace_callback(lambda sql: _set_if(blocked, sql, "UPDATE volumes"))
            traced.append(raw)

    def waiting_on_postgres() -> bool:
        with db.sessions() as s:
            return bool(s.scalar(text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE volumes%'"
            )))  # fmt: skip

    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        event.listen(engine, "before_cursor_execute", on_execute)
    try:
        with db.sessions() as holder:
            # Another committer, mid-transaction, holding the volume's row (or SQLite's) lock.
            holder.execute(update(Volume).where(Volume.id == vol).values(map_version=1))
            waiter.start()
            # Positive evidence that the waiter is at the lock: its UPDATE is running
            # (SQLite) or waits for a lock in the server (PostgreSQL).
            if sqlite:
                assert blocked.wait(30), "the waiter never issued its UPDATE"
            else:
                wait_for(waiting_on_postgres, what="the waiter blocked on the row lock")
            assert waiter.is_alive() and not outcome  # blocked on the lock
            holder.commit()
        waiter.join(30)
    finally:
        if sqlite:
            event.remove(engine, "before_cursor_execute", on_execute)
        for raw in traced:
            raw.set_trace_callback(None)
    assert len(outcome) == 1 and isinstance(outcome[0], VersionConflictError), outcome


def _set_if(flag: threading.Event, sql: str, prefix: str) -> None:
    if sql.startswith(prefix):
        flag.set()


def _result(call: Callable[[], int]) -> int | Exception:
    try:
        return call()
    except Exception as e:
        return e


def test_concurrent_retries_of_one_commit_apply_once(db: Db) -> None:
    vol = db.volume()
    results = _race(3, lambda i: db.maps.commit_changes(vol, 0, {1: cid(1)}, "same"))
    assert results == [1, 1, 1]
    assert db.maps.get_volume(db.account, vol).map_version == 1


def test_idempotent_retry_returns_first_version_and_applies_nothing(db: Db) -> None:
    vol = db.volume()
    v1 = db.maps.commit_changes(vol, 0, {1: cid(1), 2: None}, "batch-1")
    v2 = db.maps.commit_changes(vol, v1, {1: cid("newer")}, "batch-2")
    segments = db.count(MapSegment)
    # The retry carries the old base version and must not be applied over batch-2.
    assert db.maps.commit_changes(vol, 0, {2: None, 1: cid(1)}, "batch-1") == v1
    assert db.maps.get_volume(db.account, vol).map_version == v2
    assert db.maps.read_map(vol) == {1: cid("newer")}
    assert db.count(MapSegment) == segments and db.count(CommitRecord) == 2
    with pytest.raises(IdempotencyKeyError, match="batch-1"):
        db.maps.commit_changes(vol, v2, {1: cid(2)}, "batch-1")
    with pytest.raises(ValueError, match="idempotency key"):
        db.maps.commit_changes(vol, v2, {}, "")


def test_snapshots_are_immutable_and_outlive_their_volume(db: Db) -> None:
    vol = db.volume()
    v = db.maps.commit_changes(vol, 0, {0: cid(0), 3000: cid(3000)}, "a")
    snap_id = db.maps.create_snapshot(vol, description="before upgrade")
    snap = db.maps.get_snapshot(db.account, snap_id)
    assert snap.status == SnapshotStatus.COMPLETED and snap.map_version == v
    assert (snap.volume_id, snap.volume_size, snap.chunk_size) == (vol, 4 * MIB * 4, SMALL_CHUNK)
    assert snap.description == "before upgrade" and snap.completed is not None
    with pytest.raises(NotFoundError):
        db.maps.get_snapshot(db.other_account, snap_id)
    db.maps.commit_changes(vol, v, {0: None, 3000: cid("changed"), 1: cid(1)}, "b")
    assert db.maps.read_map(vol, snapshot_id=snap_id) == {0: cid(0), 3000: cid(3000)}
    assert db.maps.lookup(None, 3000, snapshot_id=snap_id) == cid(3000)
    with pytest.raises(SnapshotStateError):
        db.maps.put_snapshot_chunks(snap_id, {0: cid("sneaky")})
    with pytest.raises(NotFoundError):
        db.maps.read_map(db.volume(), snapshot_id=snap_id)
    db.maps.delete_volume(vol)
    assert db.maps.get_snapshot(db.account, snap_id).volume_id is None
    assert db.maps.read_map(None, snapshot_id=snap_id) == {0: cid(0), 3000: cid(3000)}


def test_list_changed_chunks_between_snapshots_and_from_nothing(db: Db) -> None:
    vol = db.volume()
    v = db.maps.commit_changes(vol, 0, {0: cid(0), 1: cid(1), 2000: cid(2000)}, "a")
    first = db.maps.create_snapshot(vol)
    assert db.maps.list_changed_chunks(first, first) == []
    changes = {1: None, 2000: cid("2000b"), 3500: cid(3500), 5: cid(5)}
    db.maps.commit_changes(vol, v, changes, "b")
    second = db.maps.create_snapshot(vol)
    assert db.maps.list_changed_chunks(first, second) == sorted(changes.items())
    assert db.maps.list_changed_chunks(None, second) == sorted(
        {0: cid(0), 5: cid(5), 2000: cid("2000b"), 3500: cid(3500)}.items()
    )
    assert db.maps.list_changed_chunks(second, first) == [
        (1, cid(1)),
        (5, None),
        (2000, cid(2000)),
        (3500, None),
    ]
    pending = db.maps.start_snapshot(db.account, 16 * MIB, chunk_size=SMALL_CHUNK)
    with pytest.raises(SnapshotStateError, match="complete it"):
        db.maps.list_changed_chunks(first, pending)
    foreign = db.maps.start_snapshot(db.other_account, MIB, chunk_size=SMALL_CHUNK)
    db.maps.complete_snapshot(foreign)
    with pytest.raises(NotFoundError):
        db.maps.list_changed_chunks(foreign, second)


def test_block_api_snapshot_flow_and_volume_from_snapshot(db: Db) -> None:
    size = 3 * SEGMENT_CHUNKS * SMALL_CHUNK
    base = db.maps.start_snapshot(db.account, size, chunk_size=SMALL_CHUNK)
    assert db.maps.get_snapshot(db.account, base).status == SnapshotStatus.PENDING
    db.maps.put_snapshot_chunks(base, {0: cid(0), 1500: cid(1500)})
    db.maps.put_snapshot_chunks(base, {7: cid(7)})
    with pytest.raises(ValueError, match="out of range"):
        db.maps.put_snapshot_chunks(base, {3 * SEGMENT_CHUNKS: cid(0)})
    db.maps.complete_snapshot(base)
    db.maps.complete_snapshot(base)  # a retried completion is harmless
    assert db.maps.read_map(None, snapshot_id=base) == {0: cid(0), 7: cid(7), 1500: cid(1500)}
    # Incremental: a child starts from its parent's map.
    child = db.maps.start_snapshot(
        db.account, size, chunk_size=SMALL_CHUNK, parent_snapshot_id=base
    )
    db.maps.put_snapshot_chunks(child, {7: None, 8: cid(8)})
    db.maps.complete_snapshot(child)
    assert db.maps.list_changed_chunks(base, child) == [(7, None), (8, cid(8))]
    with pytest.raises(SnapshotStateError):
        db.maps.put_snapshot_chunks(child, {9: cid(9)})
    # A volume made from a snapshot shares its segments and then diverges alone.
    segments = db.count(MapSegment)
    vol = db.maps.create_volume(db.account, "restored", size, from_snapshot_id=child)
    assert vol.chunk_size == SMALL_CHUNK and db.count(MapSegment) == segments
    assert db.maps.read_map(vol.id) == db.maps.read_map(None, snapshot_id=child)
    db.maps.commit_changes(vol.id, 0, {0: None}, "k")
    assert db.maps.lookup(None, 0, snapshot_id=child) == cid(0)
    with pytest.raises(ValueError, match="smaller"):
        db.maps.create_volume(db.account, "small", SMALL_CHUNK, from_snapshot_id=child)
    with pytest.raises(NotFoundError):
        db.maps.create_volume(db.other_account, "theirs", size, from_snapshot_id=child)


def test_referenced_chunk_ids_follow_volumes_and_snapshots(db: Db) -> None:
    vol = db.volume()
    v = db.maps.commit_changes(vol, 0, {0: cid("a"), 1: cid("a"), 2000: cid("b")}, "1")
    snap = db.maps.create_snapshot(vol)
    db.maps.commit_changes(vol, v, {0: None, 1: None, 3: cid("c")}, "2")
    pending = db.maps.start_snapshot(db.account, MIB, chunk_size=SMALL_CHUNK)
    db.maps.put_snapshot_chunks(pending, {0: cid("d")})
    assert set(db.maps.referenced_chunk_ids()) == {cid("a"), cid("b"), cid("c"), cid("d")}
    db.maps.delete_snapshot(snap)
    assert set(db.maps.referenced_chunk_ids()) == {cid("b"), cid("c"), cid("d")}
    db.maps.delete_snapshot(pending)
    db.maps.delete_volume(vol)
    assert list(db.maps.referenced_chunk_ids()) == []
    assert db.count(MapSegment) == 0 and db.count(CommitRecord) == 0
    with pytest.raises(NotFoundError):
        db.maps.delete_snapshot(snap)


# Model test: random commit sequences (and snapshots) against a dict.

_INDEXES = st.one_of(
    st.integers(0, 3 * SEGMENT_CHUNKS - 1),
    st.sampled_from([0, SEGMENT_CHUNKS - 1, SEGMENT_CHUNKS, 2 * SEGMENT_CHUNKS + 1]),
)
_CHANGES = st.dictionaries(_INDEXES, st.one_of(st.none(), st.integers(0, 5).map(cid)), max_size=8)
_STEPS = st.lists(st.tuples(_CHANGES, st.booleans()), min_size=1, max_size=8)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_STEPS)
def test_random_commits_match_a_dict_model(
    db: Db, steps: list[tuple[dict[int, Any], bool]]
) -> None:
    vol = db.volume(size=3 * SEGMENT_CHUNKS * SMALL_CHUNK)
    model: dict[int, str] = {}
    version = 0
    snapshots: list[tuple[str, dict[int, str]]] = []
    for n, (changes, snapshot) in enumerate(steps):
        version = db.maps.commit_changes(vol, version, changes, f"step-{n}")
        for index, chunk in changes.items():
            if chunk is None:
                model.pop(index, None)
            else:
                model[index] = chunk
        assert db.maps.read_map(vol, version=version) == model
        for index in changes:
            assert db.maps.lookup(vol, index) == model.get(index)
        if snapshot:
            snapshots.append((db.maps.create_snapshot(vol), dict(model)))
    previous: tuple[str, dict[int, str]] | None = None
    for snap_id, frozen in snapshots:
        assert db.maps.read_map(None, snapshot_id=snap_id) == frozen
        before = {} if previous is None else previous[1]
        expected = sorted(
            (i, frozen.get(i))
            for i in before.keys() | frozen.keys()
            if before.get(i) != frozen.get(i)
        )
        first = None if previous is None else previous[0]
        assert db.maps.list_changed_chunks(first, snap_id) == expected
        previous = (snap_id, frozen)
    db.maps.delete_volume(vol)
    for snap_id, _ in snapshots:
        db.maps.delete_snapshot(snap_id)
    assert db.count(MapSegment) == 0


def test_sweep_removes_segments_no_map_names(db: Db) -> None:
    vol = db.volume()
    db.maps.commit_changes(vol, 0, {0: cid("kept")}, "1")
    # What two concurrent last-pointer removals can leave behind on PostgreSQL.
    with db.sessions.begin() as s:
        s.add(MapSegment(chunk_count=1, data=b"\x01\x00\x00" + bytes.fromhex(cid("leaked"))))
    assert set(db.maps.referenced_chunk_ids()) == {cid("kept")}
    assert db.maps.sweep_segments() == 1
    assert db.maps.sweep_segments() == 0
    assert db.count(MapSegment) == 1 and db.maps.read_map(vol) == {0: cid("kept")}
