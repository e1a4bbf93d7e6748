"""Chunk maps of volumes and snapshots: commits, snapshots, diffs and references for GC.

A chunk map says, for each chunk index of a volume, which chunk holds its data (the chunk
id: SHA-256 hex of the plaintext) or that the chunk is all zero (no entry). The destager
commits a batch of changes at once against the map version it started from
(``commit_changes``); snapshots freeze a map without copying it; the block API builds
snapshots chunk by chunk (``start_snapshot`` ... ``complete_snapshot``) and lists what
changed between two of them. How maps are stored (segments, pointers, the encoding) is
described in ``sgw.provider.db.models`` and stays private to this module.

Every public method is one database transaction of its own and returns plain values, so
one ``ChunkMaps`` can serve many threads. Methods taking a bare volume or snapshot id do
not check the account: callers resolve ids through ``get_volume``/``get_snapshot`` first.

Concurrency: every write first updates the row of the volume (or snapshot) it changes.
That row lock (PostgreSQL) or write lock (SQLite, whose driver opens the transaction at the
first write) serialises writers of one map, and everything the writer reads afterwards is
current. Reads are single statements, hence consistent on both backends.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Delete,
    Result,
    Row,
    bindparam,
    delete,
    exists,
    insert,
    literal,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from sgw.common.errors import (
    DatabaseError,
    IdempotencyKeyError,
    NameTakenError,
    NotFoundError,
    SnapshotStateError,
    VersionConflictError,
)
from sgw.provider.blockstore.packs import PackIndex, located
from sgw.provider.db.models import (
    KEY_MAX,
    NAME_MAX,
    SEGMENT_CHUNKS,
    SEGMENT_FORMAT,
    Account,
    ChunkLocation,
    ChunkPack,
    CommitRecord,
    Gateway,
    GcGeneration,
    MapSegment,
    Snapshot,
    SnapshotSegment,
    SnapshotStatus,
    Volume,
    VolumeMode,
    VolumeSegment,
    utcnow,
)
from sgw.provider.db.schema import bound_engine, upsert_insert

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkChanges",
    "ChunkMaps",
    "IdempotencyKeyError",
    "NameTakenError",
    "SnapshotInfo",
    "SnapshotStateError",
    "SnapshotStatus",
    "VolumeInfo",
    "VolumeMode",
]

LOG = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
# Chunk sizes a volume may have (bytes, powers of two): small enough to keep a random
# write's upload cheap, large enough to keep maps small.
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20
# One map entry inside a segment: offset in the segment, raw SHA-256 digest.
_ENTRY = struct.Struct(">H32s")
_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
# Longest IN (...) list per statement: SQLite allows 32766 bound variables, PostgreSQL's
# plans degrade with huge lists long before its own limit.
_IN_BATCH = 500
# Commit records kept per volume: a retry only ever concerns the last few commits.
_COMMIT_RECORDS_KEPT = 1000
# Segment rows fetched per round trip when enumerating references.
_SCAN_BATCH = 256

# Changes to a map: chunk index -> new chunk id, or None for "all zero now".
ChunkChanges = Mapping[int, str | None]
# Called inside a writer's transaction, with the map's row locked, with the chunk ids the
# change names (sorted, distinct): raises if the store does not hold one of them. Garbage
# collection deletes chunks only while holding the rows of every map of the key scope
# (``delete_unreferenced_chunks``), so a chunk checked here cannot vanish before the
# change that names it is visible to the collector. The second argument is the scope's
# GC generation (``gc_generation``) as of this transaction.
ChunkCheck = Callable[[list[str], int], None]


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    id: str
    account_id: str
    gateway_id: str | None
    name: str
    size: int
    chunk_size: int
    mode: VolumeMode
    map_version: int
    created: datetime
    # Which key encrypts the volume's chunks and where they are stored (see the KeyRing).
    key_scope: str

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: str
    account_id: str
    volume_id: str | None
    parent_snapshot_id: str | None
    status: SnapshotStatus
    volume_size: int
    chunk_size: int
    map_version: int | None
    description: str | None
    created: datetime
    completed: datetime | None
    key_scope: str
    # The schedule slot it was taken for (sgw.provider.control.schedules); None: by hand.
    scheduled_for: datetime | None = None

    @property
    def chunk_count(self) -> int:
        return -(-self.volume_size // self.chunk_size)


@dataclass(frozen=True, slots=True)
class _Owner:
    """The map being changed: a volume's pointers or a snapshot's."""

    table: type[VolumeSegment] | type[SnapshotSegment]
    id: str

    def column(self) -> InstrumentedAttribute[str]:
        if self.table is VolumeSegment:
            return VolumeSegment.volume_id
        return SnapshotSegment.snapshot_id


class ChunkMaps:
    """The chunk-map repository over the provider's database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        # For the hottest read (a volume by id, once per chunk put): a plain connection
        # costs a quarter of a session's ORM ``get``.
        engine = bound_engine(sessions)
        if engine is None:
            raise TypeError("ChunkMaps needs sessions bound to an Engine")
        self._engine = engine
        self.packs = PackIndex(sessions)

    # Volumes

    def create_volume(
        self,
        account_id: str,
        name: str,
        size: int,
        *,
        chunk_size: int | None = None,
        mode: VolumeMode = VolumeMode.CACHED,
        gateway_id: str | None = None,
        from_snapshot_id: str | None = None,
        volume_id: str | None = None,
    ) -> VolumeInfo:
        """A new volume of ``size`` bytes, all zero or with the map of a completed snapshot.

        From a snapshot only the segment pointers are copied (instant at any size);
        ``chunk_size`` then defaults to the snapshot's and must equal it, and the volume
        shares the snapshot's key scope (its chunks are the snapshot's). A new empty
        volume starts a key scope of its own, named by its id. A caller may choose the id
        (``volume_id``, a UUID): asking again for the same volume returns it, so a retry
        after a lost reply does not fail or leave an orphan behind.
        """
        if volume_id is not None:
            volume_id = _check_uuid(volume_id, "volume id")
            with self._sessions() as s:
                existing = s.get(Volume, volume_id)
                if existing is not None:
                    same = (
                        existing.account_id == account_id
                        and existing.name == name
                        and existing.size == size
                        and existing.mode == VolumeMode(mode).value
                    )
                    if not same:
                        raise NameTakenError(
                            f"volume id {volume_id} is taken by another volume; choose another"
                        )
                    return _volume_info(existing)
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"volume name {name!r}: give 1 to {NAME_MAX} characters")
        mode = VolumeMode(mode)
        if size <= 0:
            raise ValueError(f"volume {name!r}: size {size} must be a positive number of bytes")
        with self._sessions.begin() as s:
            source = None
            if from_snapshot_id is not None:
                source = _lock_snapshot(s, from_snapshot_id)
                if source.account_id != account_id:
                    raise NotFoundError(f"snapshot {from_snapshot_id} not found")
                if source.status != SnapshotStatus.COMPLETED:
                    raise SnapshotStateError(
                        f"snapshot {from_snapshot_id} is {source.status}; "
                        "create volumes from completed snapshots only"
                    )
                chunk_size = source.chunk_size if chunk_size is None else chunk_size
                if chunk_size != source.chunk_size:
                    raise ValueError(
                        f"volume {name!r}: chunk size {chunk_size} differs from snapshot "
                        f"{from_snapshot_id}'s {source.chunk_size}; omit it to inherit"
                    )
                if size < source.volume_size:
                    raise ValueError(
                        f"volume {name!r}: size {size} is smaller than snapshot "
                        f"{from_snapshot_id}'s {source.volume_size} bytes"
                    )
            chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
            _check_chunk_size(chunk_size)
            if s.get(Account, account_id) is None:
                raise NotFoundError(f"account {account_id} does not exist")
            if gateway_id is not None:
                gateway = s.get(Gateway, gateway_id)
                if gateway is None or gateway.account_id != account_id:
                    raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
            taken = select(Volume.id).where(Volume.account_id == account_id, Volume.name == name)
            if s.scalar(taken) is not None:
                raise NameTakenError(
                    f"account {account_id} already has a volume named {name!r}; pick another name"
                )
            volume_id = volume_id or str(uuid.uuid4())
            volume = Volume(
                id=volume_id,
                account_id=account_id,
                gateway_id=gateway_id,
                name=name,
                size=size,
                chunk_size=chunk_size,
                mode=mode.value,
                map_version=0,
                key_scope=volume_id if source is None else source.key_scope,
                created=utcnow(),
            )
            s.add(volume)
            try:
                s.flush()
            except IntegrityError as e:
                raise NameTakenError(
                    f"account {account_id} already has a volume named {name!r}; pick another name"
                ) from e
            if from_snapshot_id is not None:
                _copy_pointers(
                    s, _Owner(SnapshotSegment, from_snapshot_id), _Owner(VolumeSegment, volume.id)
                )
            info = _volume_info(volume)
        LOG.info(
            "volume created",
            extra={"volume": info.id, "account": account_id, "size": size, "mode": mode.value},
        )
        return info

    def get_volume(self, account_id: str, volume_id: str) -> VolumeInfo:
        """The volume, if it exists and belongs to ``account_id``."""
        with self._engine.connect() as c:
            row = c.execute(_VOLUME_BY_ID, {"id": volume_id}).one_or_none()
        if row is None or row.account_id != account_id:
            raise NotFoundError(f"volume {volume_id} not found in account {account_id}")
        return _volume_info(row)

    def delete_volume(self, volume_id: str) -> None:
        """Deletes the volume and its map; its snapshots stay (without a volume)."""
        with self._sessions.begin() as s:
            _lock_volume(s, volume_id)
            owner = _Owner(VolumeSegment, volume_id)
            dropped = set(_pointer_ids(s, owner).values())
            s.execute(_delete_pointers(owner))
            s.execute(delete(CommitRecord).where(CommitRecord.volume_id == volume_id))
            s.execute(delete(Volume).where(Volume.id == volume_id))
            _drop_orphans(s, dropped)
        LOG.info("volume deleted", extra={"volume": volume_id})

    # Maps

    def read_map(
        self,
        volume_id: str | None,
        *,
        version: int | None = None,
        snapshot_id: str | None = None,
    ) -> dict[int, str]:
        """The whole map, sparse: chunk index -> chunk id (all-zero chunks are absent).

        Of the volume now or, with ``snapshot_id``, of that snapshot (``volume_id`` may
        then be None; if given it must be the snapshot's volume). ``version``: the map
        version the caller expects; VersionConflictError if the volume has moved on.
        """
        with self._sessions() as s:
            if snapshot_id is not None:
                _, rows = _snapshot_segments(s, snapshot_id, volume_id, None)
            else:
                if volume_id is None:
                    raise ValueError("read_map needs a volume id or a snapshot id")
                volume, rows = _volume_segments(s, volume_id, None)
                if version is not None and volume.map_version != version:
                    raise VersionConflictError(
                        f"volume {volume_id} is at map version {volume.map_version}, "
                        f"not {version}; read the current version"
                    )
        return _entries(rows)

    def read_volume_map(self, volume_id: str) -> tuple[int, dict[int, str]]:
        """The volume's map version and its whole map, read in one statement (consistent)."""
        with self._sessions() as s:
            volume, rows = _volume_segments(s, volume_id, None)
            version = volume.map_version
        return version, _entries(rows)

    def list_snapshot_chunks(
        self, snapshot_id: str, start: int, limit: int
    ) -> tuple[list[tuple[int, str]], int | None]:
        """One page of a snapshot's non-zero chunks: up to ``limit`` (index, chunk id)
        pairs from index ``start`` on, sorted, and the index the next page starts at
        (None after the last page). Reads only the segments the page needs."""
        if start < 0 or limit < 1:
            raise ValueError(f"page start {start} and limit {limit}: start >= 0, limit >= 1")
        page: list[tuple[int, str]] = []
        with self._sessions() as s:
            if s.get(Snapshot, snapshot_id) is None:
                raise NotFoundError(f"snapshot {snapshot_id} not found")
            rows = s.execute(
                select(SnapshotSegment.segment_index, MapSegment.data)
                .join(MapSegment, MapSegment.id == SnapshotSegment.segment_id)
                .where(
                    SnapshotSegment.snapshot_id == snapshot_id,
                    SnapshotSegment.segment_index >= start // SEGMENT_CHUNKS,
                )
                .order_by(SnapshotSegment.segment_index)
                .execution_options(yield_per=_SCAN_BATCH)
            )
            for segment_index, data in rows:
                base = segment_index * SEGMENT_CHUNKS
                for offset, digest in sorted(_decode(data).items()):
                    index = base + offset
                    if index < start:
                        continue
                    if len(page) == limit:
                        return page, index
                    page.append((index, digest.hex()))
        return page, None

    def lookup(
        self, volume_id: str | None, chunk_index: int, *, snapshot_id: str | None = None
    ) -> str | None:
        """The chunk id at ``chunk_index`` of a volume (or snapshot); None if all zero."""
        segment_index, offset = divmod(chunk_index, SEGMENT_CHUNKS)
        with self._sessions() as s:
            if snapshot_id is not None:
                snap, rows = _snapshot_segments(s, snapshot_id, volume_id, segment_index)
                size, chunk_size, name = snap.volume_size, snap.chunk_size, f"snapshot {snap.id}"
            else:
                if volume_id is None:
                    raise ValueError("lookup needs a volume id or a snapshot id")
                vol, rows = _volume_segments(s, volume_id, segment_index)
                size, chunk_size, name = vol.size, vol.chunk_size, f"volume {vol.id}"
        _check_indexes(name, size, chunk_size, (chunk_index,))
        for _, data in rows:
            digest = _decode(data).get(offset)
            return None if digest is None else digest.hex()
        return None

    def commit_changes(
        self,
        volume_id: str,
        base_version: int,
        changes: ChunkChanges,
        idempotency_key: str,
        *,
        check_chunks: ChunkCheck | None = None,
    ) -> int:
        """Applies ``changes`` to the map at ``base_version`` atomically; the new version.

        A stale ``base_version`` raises VersionConflictError and changes nothing. Retrying
        with the same ``idempotency_key`` and changes returns the version the first attempt
        produced without applying anything again (the same key with other changes raises
        IdempotencyKeyError). An index outside the volume raises ValueError. Whatever
        ``check_chunks`` raises (it runs with the volume locked) refuses the commit; it
        is given the named chunks that have no location in a pack (those with one are
        there: see ``packs``).
        """
        if not idempotency_key or len(idempotency_key) > KEY_MAX:
            raise ValueError(f"idempotency key {idempotency_key!r}: give 1 to {KEY_MAX} characters")
        parsed = _parse_changes(changes)
        digest = _changes_digest(parsed)
        with self._sessions.begin() as s:
            done = _recorded_version(s, volume_id, idempotency_key, digest)
            if done is not None:
                return done
            row = s.execute(
                update(Volume)
                .where(Volume.id == volume_id, Volume.map_version == base_version)
                .values(map_version=Volume.map_version + 1)
                .returning(Volume.size, Volume.chunk_size, Volume.map_version, Volume.key_scope)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if row is None:
                # Stale, missing, or a concurrent attempt of this very commit won the lock.
                done = _recorded_version(s, volume_id, idempotency_key, digest)
                if done is not None:
                    return done
                current = s.scalar(select(Volume.map_version).where(Volume.id == volume_id))
                if current is None:
                    raise NotFoundError(f"volume {volume_id} not found")
                raise VersionConflictError(
                    f"volume {volume_id}: commit based on map version {base_version}, but the "
                    f"map is at version {current}; re-read the map and rebase the changes"
                )
            size, chunk_size, version, key_scope = row
            _check_indexes(f"volume {volume_id}", size, chunk_size, parsed)
            if check_chunks is not None and (loose := _loose_chunks(s, key_scope, parsed)):
                check_chunks(loose, _gc_generation(s, key_scope))
            rewritten = _apply(s, _Owner(VolumeSegment, volume_id), parsed)
            s.add(
                CommitRecord(
                    volume_id=volume_id,
                    idempotency_key=idempotency_key,
                    version=version,
                    changes_digest=digest,
                    created=utcnow(),
                )
            )
            s.execute(
                delete(CommitRecord).where(
                    CommitRecord.volume_id == volume_id,
                    CommitRecord.version <= version - _COMMIT_RECORDS_KEPT,
                )
            )
        LOG.debug(
            "chunk map committed",
            extra={
                "volume": volume_id,
                "version": version,
                "changes": len(parsed),
                "segments_rewritten": rewritten,
            },
        )
        return int(version)

    # Snapshots

    def create_snapshot(
        self,
        volume_id: str,
        description: str | None = None,
        *,
        snapshot_id: str | None = None,
        map_version: int | None = None,
    ) -> str:
        """A completed snapshot of the volume's current map (a pointer copy); its id.

        It shares the volume's key scope: its chunks are the volume's. A gateway names the
        snapshot itself (``snapshot_id``, a UUID it chose when the snapshot was requested)
        and says at which ``map_version`` it must be taken: asking again for a snapshot
        that exists already returns it (a retry whose answer was lost), and a volume whose
        map is at another version is refused rather than snapshotted at the wrong point.
        """
        _check_description(description)
        if snapshot_id is not None:
            snapshot_id = _check_uuid(snapshot_id, "snapshot id")
        with self._sessions.begin() as s:
            volume = _lock_volume(s, volume_id)
            if snapshot_id is not None:
                existing = s.get(Snapshot, snapshot_id)
                if existing is not None:
                    if existing.volume_id != volume_id or (
                        map_version is not None and existing.map_version != map_version
                    ):
                        raise SnapshotStateError(
                            f"snapshot {snapshot_id} exists already and is not a snapshot of "
                            f"volume {volume_id} at map version {map_version}"
                        )
                    return snapshot_id
            if map_version is not None and volume.map_version != map_version:
                raise SnapshotStateError(
                    f"volume {volume_id} is at map version {volume.map_version}, not "
                    f"{map_version}: the snapshot would not be the point in time asked for"
                )
            now = utcnow()
            snapshot = Snapshot(
                id=snapshot_id or str(uuid.uuid4()),
                account_id=volume.account_id,
                volume_id=volume_id,
                status=SnapshotStatus.COMPLETED.value,
                volume_size=volume.size,
                chunk_size=volume.chunk_size,
                map_version=volume.map_version,
                description=description,
                key_scope=volume.key_scope,
                created=now,
                completed=now,
            )
            s.add(snapshot)
            s.flush()
            _copy_pointers(
                s, _Owner(VolumeSegment, volume_id), _Owner(SnapshotSegment, snapshot.id)
            )
        LOG.info(
            "snapshot created",
            extra={"snapshot": snapshot.id, "volume": volume_id, "version": volume.map_version},
        )
        return snapshot.id

    def start_snapshot(
        self,
        account_id: str,
        volume_size: int,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        parent_snapshot_id: str | None = None,
        description: str | None = None,
    ) -> str:
        """A pending snapshot to put chunks into (block API); its id.

        With a parent, it starts as a copy of the parent's map (incremental upload) and
        shares the parent's key scope; without one it starts a key scope named by its id.
        """
        _check_description(description)
        _check_chunk_size(chunk_size)
        if volume_size <= 0:
            raise ValueError(f"snapshot volume size {volume_size} must be a positive number")
        snapshot_id = str(uuid.uuid4())
        key_scope = snapshot_id
        with self._sessions.begin() as s:
            if parent_snapshot_id is not None:
                parent = _lock_snapshot(s, parent_snapshot_id)
                key_scope = parent.key_scope
                if parent.account_id != account_id:
                    raise NotFoundError(f"snapshot {parent_snapshot_id} not found")
                if parent.status != SnapshotStatus.COMPLETED:
                    raise SnapshotStateError(
                        f"parent snapshot {parent_snapshot_id} is {parent.status}; "
                        "use a completed snapshot as parent"
                    )
                if parent.chunk_size != chunk_size or parent.volume_size > volume_size:
                    raise ValueError(
                        f"parent snapshot {parent_snapshot_id} has chunk size "
                        f"{parent.chunk_size} and {parent.volume_size} bytes; the new snapshot "
                        "needs the same chunk size and at least that size"
                    )
            if s.get(Account, account_id) is None:
                raise NotFoundError(f"account {account_id} does not exist")
            snapshot = Snapshot(
                id=snapshot_id,
                account_id=account_id,
                volume_id=None,
                parent_snapshot_id=parent_snapshot_id,
                status=SnapshotStatus.PENDING.value,
                volume_size=volume_size,
                chunk_size=chunk_size,
                map_version=None,
                description=description,
                key_scope=key_scope,
                created=utcnow(),
            )
            s.add(snapshot)
            s.flush()
            if parent_snapshot_id is not None:
                _copy_pointers(
                    s,
                    _Owner(SnapshotSegment, parent_snapshot_id),
                    _Owner(SnapshotSegment, snapshot.id),
                )
        LOG.info("snapshot started", extra={"snapshot": snapshot.id, "account": account_id})
        return snapshot.id

    def put_snapshot_chunks(
        self, snapshot_id: str, changes: ChunkChanges, *, check_chunks: ChunkCheck | None = None
    ) -> None:
        """Sets chunks of a pending snapshot (None: the chunk is all zero); whatever
        ``check_chunks`` raises (it runs with the snapshot locked) refuses the change."""
        parsed = _parse_changes(changes)
        with self._sessions.begin() as s:
            snap = _lock_snapshot(s, snapshot_id)
            if snap.status != SnapshotStatus.PENDING:
                raise SnapshotStateError(
                    f"snapshot {snapshot_id} is {snap.status}; only pending snapshots take chunks"
                )
            _check_indexes(f"snapshot {snapshot_id}", snap.volume_size, snap.chunk_size, parsed)
            if check_chunks is not None and (loose := _loose_chunks(s, snap.key_scope, parsed)):
                check_chunks(loose, _gc_generation(s, snap.key_scope))
            _apply(s, _Owner(SnapshotSegment, snapshot_id), parsed)

    def complete_snapshot(self, snapshot_id: str) -> None:
        """Makes a pending snapshot immutable; completing it again is a no-op."""
        with self._sessions.begin() as s:
            snap = _lock_snapshot(s, snapshot_id)
            if snap.status == SnapshotStatus.COMPLETED:
                return
            if snap.status != SnapshotStatus.PENDING:
                raise SnapshotStateError(f"snapshot {snapshot_id} is {snap.status}; delete it")
            s.execute(
                update(Snapshot)
                .where(Snapshot.id == snapshot_id)
                .values(status=SnapshotStatus.COMPLETED.value, completed=utcnow())
                .execution_options(synchronize_session=False)
            )
        LOG.info("snapshot completed", extra={"snapshot": snapshot_id})

    def get_snapshot(self, account_id: str, snapshot_id: str) -> SnapshotInfo:
        """The snapshot, if it exists and belongs to ``account_id``."""
        with self._sessions() as s:
            snap = s.get(Snapshot, snapshot_id)
            if snap is None or snap.account_id != account_id:
                raise NotFoundError(f"snapshot {snapshot_id} not found in account {account_id}")
            return _snapshot_info(snap)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Deletes the snapshot; chunks it alone referenced stop being referenced."""
        with self._sessions.begin() as s:
            _lock_snapshot(s, snapshot_id)
            owner = _Owner(SnapshotSegment, snapshot_id)
            dropped = set(_pointer_ids(s, owner).values())
            s.execute(_delete_pointers(owner))
            s.execute(delete(Snapshot).where(Snapshot.id == snapshot_id))
            _drop_orphans(s, dropped)
        LOG.info("snapshot deleted", extra={"snapshot": snapshot_id})

    def list_changed_chunks(
        self, first_snapshot_id: str | None, second_snapshot_id: str
    ) -> list[tuple[int, str | None]]:
        """Chunks whose id differs between two completed snapshots, sorted by index.

        Each item is the index and the chunk id in the second snapshot (None: zero
        there). Without a first snapshot, every non-zero chunk of the second. Only the
        segments whose pointers differ are read.
        """
        with self._sessions() as s:
            second = s.get(Snapshot, second_snapshot_id)
            if second is None:
                raise NotFoundError(f"snapshot {second_snapshot_id} not found")
            first = None
            if first_snapshot_id is not None:
                first = s.get(Snapshot, first_snapshot_id)
                if first is None or first.account_id != second.account_id:
                    raise NotFoundError(f"snapshot {first_snapshot_id} not found")
                if first.chunk_size != second.chunk_size:
                    raise ValueError(
                        f"snapshots {first_snapshot_id} and {second_snapshot_id} have different "
                        f"chunk sizes ({first.chunk_size}, {second.chunk_size}); "
                        "they cannot be compared"
                    )
            for snap in (first, second):
                if snap is not None and snap.status != SnapshotStatus.COMPLETED:
                    raise SnapshotStateError(
                        f"snapshot {snap.id} is {snap.status}; complete it before comparing"
                    )
            new = _pointer_ids(s, _Owner(SnapshotSegment, second_snapshot_id))
            old = {} if first is None else _pointer_ids(s, _Owner(SnapshotSegment, first.id))
            differing = sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
            wanted = {p[i] for p in (old, new) for i in differing if i in p}
            data = _segment_data(s, wanted)
        changed: list[tuple[int, str | None]] = []
        for segment_index in differing:
            before = _decode(data[old[segment_index]]) if segment_index in old else {}
            after = _decode(data[new[segment_index]]) if segment_index in new else {}
            base = segment_index * SEGMENT_CHUNKS
            for offset in sorted(before.keys() | after.keys()):
                digest = after.get(offset)
                if digest != before.get(offset):
                    changed.append((base + offset, None if digest is None else digest.hex()))
        return changed

    # Garbage collection

    def referenced_chunk_ids(self, key_scope: str | None = None) -> Iterator[str]:
        """Every chunk id some volume or snapshot map references (ids may repeat); with
        ``key_scope``, only maps of that scope (whose chunks are stored under it).

        One streamed query, so the result is a consistent view as of its start and memory
        stays bounded. Chunks committed after that are not included: the sweep must spare
        objects younger than the scan (and a grace period for uploads not committed yet),
        and delete only through ``delete_unreferenced_chunks``.
        """
        with self._sessions() as s:
            yield from _referenced(s, key_scope)

    def delete_unreferenced_chunks(
        self, key_scope: str, chunk_ids: Iterable[str], delete: Callable[[str], None]
    ) -> list[str]:
        """Calls ``delete`` for each of ``chunk_ids`` that no map of ``key_scope``
        references; the ids it was called for.

        Runs in one transaction that first locks the row of every volume and snapshot of
        the scope, so writers of the scope (commits, snapshot puts, pointer copies) wait
        until the deletes are done, and every writer that got its chunk check in before
        has committed and is seen here. New references in a scope only ever come from
        those rows, hence nothing can start naming a chunk between the check and the
        delete. Keep ``chunk_ids`` to a bounded batch: the writers wait for all of it.
        """
        wanted = list(dict.fromkeys(chunk_ids))
        if not wanted:
            return []
        deleted: list[str] = []
        with self._sessions.begin() as s:
            _lock_scope(s, key_scope)
            referenced = set(_referenced(s, key_scope))
            doomed = [c for c in wanted if c not in referenced]
            if doomed:  # before any object goes: commits locked out until we are done
                _bump_gc_generation(s, key_scope)
            for chunk_id in doomed:
                delete(chunk_id)
                deleted.append(chunk_id)
        return deleted

    def delete_unreferenced_locations(self, key_scope: str, chunk_ids: Iterable[str]) -> list[str]:
        """Deletes the locations of those of ``chunk_ids`` that no map of ``key_scope``
        references (with the scope's maps locked, as ``delete_unreferenced_chunks``);
        the ids whose locations went. Their bytes stay in their packs until
        ``delete_empty_packs`` finds a pack with no location left."""
        wanted = list(dict.fromkeys(chunk_ids))
        if not wanted:
            return []
        with self._sessions.begin() as s:
            _lock_scope(s, key_scope)
            referenced = set(_referenced(s, key_scope))
            doomed = [c for c in wanted if c not in referenced]
            for i in range(0, len(doomed), _IN_BATCH):
                s.execute(
                    delete(ChunkLocation).where(
                        ChunkLocation.key_scope == key_scope,
                        ChunkLocation.chunk_id.in_(doomed[i : i + _IN_BATCH]),
                    )
                )
        return doomed

    def delete_empty_packs(self, key_scope: str, created_before: datetime) -> list[tuple[str, int]]:
        """Deletes the rows of the scope's packs made before ``created_before`` that hold
        no location (every chunk in them unreferenced and its location deleted, or an
        upload that never finished); (pack id, size) of each. The caller deletes their
        objects afterwards. Runs with the scope's maps locked: a commit that saw one of
        their chunks' locations has committed before, and its chunks still have them.

        An upload finishing meanwhile (``PackIndex.finish``, or a rewrite's ``move``)
        marks its unwritten pack written in the same transaction that gives it locations,
        and may move a committed chunk's location into it. So a row is deleted only if it
        is still as it was seen (``written`` unchanged: PostgreSQL re-checks that against
        the row a concurrent upload committed), never a pack that just got locations; a
        written pack never gains any.
        """
        pack = ChunkPack.__table__.c
        loc = ChunkLocation.__table__.c
        empty = (
            select(pack.id, pack.written)
            .where(
                pack.key_scope == key_scope,
                pack.created < created_before,
                ~select(loc.pack_id).where(loc.pack_id == pack.id).exists(),
            )
            .order_by(pack.id)
        )
        doomed: list[tuple[str, int]] = []
        with self._sessions.begin() as s:
            _lock_scope(s, key_scope)
            seen = s.execute(empty).all()
            for written in (False, True):
                ids = [str(i) for i, w in seen if bool(w) == written]
                for i in range(0, len(ids), _IN_BATCH):
                    rows = s.execute(
                        delete(ChunkPack)
                        .where(
                            ChunkPack.id.in_(ids[i : i + _IN_BATCH]),
                            ChunkPack.written.is_(written),
                        )
                        .returning(ChunkPack.id, ChunkPack.size)
                    )
                    doomed += [(str(i), int(n)) for i, n in rows]
        return doomed

    def gc_generation(self, key_scope: str) -> int:
        """How many collections have deleted chunks of the scope so far. A chunk put after
        reading this value is still in the store if the value is unchanged when a writer
        checks it with the scope's maps locked (``ChunkCheck``)."""
        with self._sessions() as s:
            return _gc_generation(s, key_scope)

    def sweep_segments(self) -> int:
        """Deletes segment rows that no map names; how many. Run before each GC pass.

        Writers drop the rows they orphan themselves, but on PostgreSQL two transactions
        removing the last two pointers to one segment at once each still see the other's
        pointer, and the row is left behind (chunks stay referenced; nothing is lost).
        """
        swept = 0
        last = 0
        while True:
            with self._sessions() as s:
                ids = list(
                    s.scalars(
                        select(MapSegment.id)
                        .where(MapSegment.id > last, ~_is_referenced())
                        .order_by(MapSegment.id)
                        .limit(_IN_BATCH)
                    )
                )
            if not ids:
                break
            last = ids[-1]
            try:
                with self._sessions.begin() as s:
                    swept += _drop_orphans(s, ids)
            except IntegrityError:
                # A pointer to one of them was being copied: it is in use again.
                LOG.info("segment sweep skipped a batch in use", extra={"from_id": ids[0]})
        if swept:
            LOG.info("unreferenced map segments swept", extra={"segments": swept})
        return swept


# Segment mechanics


def _referenced(s: Session, key_scope: str | None) -> Iterator[str]:
    """The chunk ids that maps (of ``key_scope``, or all) name, streamed; ids may repeat."""
    if key_scope is None:
        where = _is_referenced()
    else:
        where = MapSegment.id.in_(
            union(
                select(VolumeSegment.segment_id)
                .join(Volume, Volume.id == VolumeSegment.volume_id)
                .where(Volume.key_scope == key_scope),
                select(SnapshotSegment.segment_id)
                .join(Snapshot, Snapshot.id == SnapshotSegment.snapshot_id)
                .where(Snapshot.key_scope == key_scope),
            )
        )
    rows = s.execute(
        select(MapSegment.data).where(where).execution_options(yield_per=_SCAN_BATCH)
    ).scalars()
    for data in rows:
        for digest in set(_decode(data).values()):
            yield digest.hex()


def _lock_scope(s: Session, key_scope: str) -> None:
    """Locks the row of every volume and snapshot of the scope: writers of its maps
    (commits, snapshot puts, pointer copies) wait until the transaction ends."""
    s.execute(
        update(Volume)
        .where(Volume.key_scope == key_scope)
        .values(map_version=Volume.map_version)
        .execution_options(synchronize_session=False)
    )
    s.execute(
        update(Snapshot)
        .where(Snapshot.key_scope == key_scope)
        .values(status=Snapshot.status)
        .execution_options(synchronize_session=False)
    )


def _loose_chunks(s: Session, key_scope: str, changes: Mapping[int, bytes | None]) -> list[str]:
    """The distinct chunk ids a parsed change names that have no location in a pack."""
    named = _named_chunks(changes)
    packed = located(s, key_scope, named) if named else set()
    return [c for c in named if c not in packed]


def _named_chunks(changes: Mapping[int, bytes | None]) -> list[str]:
    """The distinct chunk ids a parsed change names, sorted."""
    return sorted({digest.hex() for digest in changes.values() if digest is not None})


def _encode(entries: Mapping[int, bytes]) -> bytes:
    out = bytearray((SEGMENT_FORMAT,))
    for offset in sorted(entries):
        out += _ENTRY.pack(offset, entries[offset])
    return bytes(out)


def _decode(data: bytes) -> dict[int, bytes]:
    if not data or data[0] != SEGMENT_FORMAT or (len(data) - 1) % _ENTRY.size:
        raise DatabaseError(
            f"map segment of {len(data)} bytes with format byte {data[:1]!r} is not readable "
            f"by this version (expects format {SEGMENT_FORMAT}); upgrade the provider"
        )
    return dict(_ENTRY.iter_unpack(memoryview(data)[1:]))


def _entries(rows: Iterable[tuple[int, bytes]]) -> dict[int, str]:
    """The sparse map (chunk index -> chunk id) that segment rows hold."""
    result: dict[int, str] = {}
    for segment_index, data in rows:
        base = segment_index * SEGMENT_CHUNKS
        for offset, digest in _decode(data).items():
            result[base + offset] = digest.hex()
    return result


def _apply(s: Session, owner: _Owner, changes: Mapping[int, bytes | None]) -> int:
    """Rewrites the segments of ``owner``'s map that ``changes`` touch; how many changed."""
    by_segment: dict[int, dict[int, bytes | None]] = {}
    for index, digest in changes.items():
        segment_index, offset = divmod(index, SEGMENT_CHUNKS)
        by_segment.setdefault(segment_index, {})[offset] = digest
    current: dict[int, tuple[int, bytes]] = {}
    for batch in _batches(sorted(by_segment)):
        rows = s.execute(
            select(owner.table.segment_index, MapSegment.id, MapSegment.data)
            .join(MapSegment, MapSegment.id == owner.table.segment_id)
            .where(owner.column() == owner.id, owner.table.segment_index.in_(batch))
        )
        for segment_index, segment_id, data in rows:
            current[segment_index] = (segment_id, data)
    replaced: list[int] = []
    dropped: set[int] = set()
    rewritten = 0
    new_segments: dict[int, MapSegment] = {}
    for segment_index, segment_changes in by_segment.items():
        old_id, old_data = current.get(segment_index, (None, None))
        entries = {} if old_data is None else _decode(old_data)
        updated = dict(entries)
        for offset, digest in segment_changes.items():
            if digest is None:
                updated.pop(offset, None)
            else:
                updated[offset] = digest
        if updated == entries:
            continue
        rewritten += 1
        if old_id is not None:
            replaced.append(segment_index)
            dropped.add(old_id)
        if updated:
            new_segments[segment_index] = MapSegment(
                chunk_count=len(updated), data=_encode(updated)
            )
    for batch in _batches(replaced):
        s.execute(_delete_pointers(owner, batch))
    if new_segments:
        s.add_all(new_segments.values())
        s.flush()
        s.execute(
            insert(owner.table),
            [
                {owner.column().key: owner.id, "segment_index": i, "segment_id": segment.id}
                for i, segment in new_segments.items()
            ],
        )
    _drop_orphans(s, dropped)
    return rewritten


def _is_referenced() -> ColumnElement[bool]:
    """True for a segment row that some volume or snapshot pointer names."""
    return or_(
        exists().where(VolumeSegment.segment_id == MapSegment.id),
        exists().where(SnapshotSegment.segment_id == MapSegment.id),
    )


def _drop_orphans(s: Session, segment_ids: Iterable[int]) -> int:
    """Deletes those of ``segment_ids`` that no volume or snapshot names any more."""
    dropped = 0
    for batch in _batches(sorted(segment_ids)):
        result = s.execute(
            delete(MapSegment)
            .where(MapSegment.id.in_(batch), ~_is_referenced())
            .execution_options(synchronize_session=False)
        )
        dropped += _rowcount(result)
    return dropped


def _copy_pointers(s: Session, source: _Owner, target: _Owner) -> None:
    s.execute(
        insert(target.table).from_select(
            [target.column().key, "segment_index", "segment_id"],
            select(literal(target.id), source.table.segment_index, source.table.segment_id).where(
                source.column() == source.id
            ),
        )
    )


def _delete_pointers(owner: _Owner, segment_indexes: Sequence[int] | None = None) -> Delete:
    stmt = delete(owner.table).where(owner.column() == owner.id)
    if segment_indexes is not None:
        stmt = stmt.where(owner.table.segment_index.in_(segment_indexes))
    return stmt.execution_options(synchronize_session=False)


def _pointer_ids(s: Session, owner: _Owner) -> dict[int, int]:
    rows = s.execute(
        select(owner.table.segment_index, owner.table.segment_id).where(owner.column() == owner.id)
    )
    return {segment_index: segment_id for segment_index, segment_id in rows}


def _segment_data(s: Session, segment_ids: Iterable[int]) -> dict[int, bytes]:
    wanted = sorted(segment_ids)
    data: dict[int, bytes] = {}
    for batch in _batches(wanted):
        rows = s.execute(select(MapSegment.id, MapSegment.data).where(MapSegment.id.in_(batch)))
        data.update({segment_id: blob for segment_id, blob in rows})
    if len(data) != len(wanted):
        raise NotFoundError("a snapshot was deleted while it was being read; retry")
    return data


def _volume_segments(
    s: Session, volume_id: str, segment_index: int | None
) -> tuple[Volume, list[tuple[int, bytes]]]:
    """The volume and its segments (all, or the one at ``segment_index``), in one statement."""
    on = VolumeSegment.volume_id == Volume.id
    if segment_index is not None:
        on &= VolumeSegment.segment_index == segment_index
    rows = s.execute(
        select(Volume, VolumeSegment.segment_index, MapSegment.data)
        .outerjoin(VolumeSegment, on)
        .outerjoin(MapSegment, MapSegment.id == VolumeSegment.segment_id)
        .where(Volume.id == volume_id)
    ).all()
    if not rows:
        raise NotFoundError(f"volume {volume_id} not found")
    return rows[0][0], [(i, data) for _, i, data in rows if i is not None]


def _snapshot_segments(
    s: Session, snapshot_id: str, volume_id: str | None, segment_index: int | None
) -> tuple[Snapshot, list[tuple[int, bytes]]]:
    on = SnapshotSegment.snapshot_id == Snapshot.id
    if segment_index is not None:
        on &= SnapshotSegment.segment_index == segment_index
    rows = s.execute(
        select(Snapshot, SnapshotSegment.segment_index, MapSegment.data)
        .outerjoin(SnapshotSegment, on)
        .outerjoin(MapSegment, MapSegment.id == SnapshotSegment.segment_id)
        .where(Snapshot.id == snapshot_id)
    ).all()
    if not rows or (volume_id is not None and rows[0][0].volume_id != volume_id):
        raise NotFoundError(f"snapshot {snapshot_id} not found")
    return rows[0][0], [(i, data) for _, i, data in rows if i is not None]


def _lock_volume(s: Session, volume_id: str) -> Row[str, int, int, int, str]:
    """Locks the volume's row for this transaction (a no-op update) and returns it."""
    row = s.execute(
        update(Volume)
        .where(Volume.id == volume_id)
        .values(map_version=Volume.map_version)
        .returning(
            Volume.account_id, Volume.size, Volume.chunk_size, Volume.map_version, Volume.key_scope
        )
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"volume {volume_id} not found")
    return row


def _lock_snapshot(s: Session, snapshot_id: str) -> Row[str, str, int, int, str]:
    """Locks the snapshot's row for this transaction (a no-op update) and returns it."""
    row = s.execute(
        update(Snapshot)
        .where(Snapshot.id == snapshot_id)
        .values(status=Snapshot.status)
        .returning(
            Snapshot.account_id,
            Snapshot.status,
            Snapshot.volume_size,
            Snapshot.chunk_size,
            Snapshot.key_scope,
        )
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"snapshot {snapshot_id} not found")
    return row


def _recorded_version(s: Session, volume_id: str, key: str, digest: str) -> int | None:
    """The version an earlier commit with this key produced, if there was one."""
    row = s.execute(
        select(CommitRecord.version, CommitRecord.changes_digest).where(
            CommitRecord.volume_id == volume_id, CommitRecord.idempotency_key == key
        )
    ).one_or_none()
    if row is None:
        return None
    if row.changes_digest != digest:
        raise IdempotencyKeyError(
            f"volume {volume_id}: idempotency key {key!r} was used for different changes "
            f"(committed as version {row.version}); use a new key for a new commit"
        )
    return int(row.version)


# Validation and conversion


def _parse_changes(changes: ChunkChanges) -> dict[int, bytes | None]:
    parsed: dict[int, bytes | None] = {}
    for index, chunk_id in changes.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"chunk index {index!r} is not an integer")
        if chunk_id is None:
            parsed[index] = None
        elif isinstance(chunk_id, str) and _CHUNK_ID.fullmatch(chunk_id):
            parsed[index] = bytes.fromhex(chunk_id)
        else:
            raise ValueError(
                f"chunk {index}: {chunk_id!r} is not a chunk id (64 lowercase hex digits of "
                "SHA-256) or None for an all-zero chunk"
            )
    return parsed


def _changes_digest(changes: Mapping[int, bytes | None]) -> str:
    h = hashlib.sha256()
    for index in sorted(changes):
        digest = changes[index]
        h.update(f"{index}:{'-' if digest is None else digest.hex()}\n".encode())
    return h.hexdigest()


def _check_indexes(name: str, size: int, chunk_size: int, indexes: Iterable[int]) -> None:
    count = -(-size // chunk_size)
    bad = [i for i in indexes if not 0 <= i < count]
    if bad:
        raise ValueError(
            f"{name} has chunks 0 to {count - 1} ({size} bytes in {chunk_size}-byte chunks); "
            f"chunk index {min(bad)} is out of range"
        )


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1) != 0:
        raise ValueError(
            f"chunk size {chunk_size}: use a power of two from {MIN_CHUNK_SIZE} to "
            f"{MAX_CHUNK_SIZE} bytes"
        )


def _check_uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a UUID") from None


def _check_description(description: str | None) -> None:
    if description is not None and len(description) > NAME_MAX:
        raise ValueError(f"snapshot description is longer than {NAME_MAX} characters")


def _rowcount(result: Result[Any]) -> int:
    return result.rowcount if isinstance(result, CursorResult) else 0


def _batches(items: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), _IN_BATCH):
        yield items[start : start + _IN_BATCH]


_VOLUME_BY_ID = select(Volume.__table__).where(Volume.__table__.c.id == bindparam("id"))


def _volume_info(v: Volume | Row[Any]) -> VolumeInfo:
    """From an ORM object or a Core row of the volumes table (same names)."""
    return VolumeInfo(
        id=v.id,
        account_id=v.account_id,
        gateway_id=v.gateway_id,
        name=v.name,
        size=v.size,
        chunk_size=v.chunk_size,
        mode=VolumeMode(v.mode),
        map_version=v.map_version,
        created=v.created,
        key_scope=v.key_scope,
    )


def _snapshot_info(snap: Snapshot) -> SnapshotInfo:
    return SnapshotInfo(
        id=snap.id,
        account_id=snap.account_id,
        volume_id=snap.volume_id,
        parent_snapshot_id=snap.parent_snapshot_id,
        status=SnapshotStatus(snap.status),
        volume_size=snap.volume_size,
        chunk_size=snap.chunk_size,
        map_version=snap.map_version,
        description=snap.description,
        created=snap.created,
        completed=snap.completed,
        key_scope=snap.key_scope,
        scheduled_for=snap.scheduled_for,
    )


def _gc_generation(s: Session, key_scope: str) -> int:
    value = s.scalar(select(GcGeneration.generation).where(GcGeneration.key_scope == key_scope))
    return int(value or 0)


def _bump_gc_generation(s: Session, key_scope: str) -> None:
    """Adds one to the scope's GC generation (an upsert: two collectors may race)."""
    stmt = upsert_insert(s.get_bind().dialect.name)(GcGeneration).values(
        key_scope=key_scope, generation=1
    )
    s.execute(
        stmt.on_conflict_do_update(
            index_elements=[GcGeneration.key_scope],
            set_={"generation": GcGeneration.generation + 1},
        )
    )
