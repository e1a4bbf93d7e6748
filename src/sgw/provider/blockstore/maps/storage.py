"""How chunk maps are stored: the database the parts of ``ChunkMaps`` share, map
segments and the pointers of volumes and snapshots to them, and the row locks.

A map is a set of pointers (segment index -> segment row) owned by a volume or a
snapshot; a segment holds up to ``SEGMENT_CHUNKS`` entries (offset, SHA-256 digest) in the
encoding ``sgw.provider.db.models`` describes. Segments are immutable and shared: a
snapshot copies pointers, a change writes new segments and drops those no map names any
more. Every writer first locks the row it changes (``lock_volume``, ``lock_snapshot``, or
the ``UPDATE`` of a commit), which serialises writers of one map.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Delete,
    Result,
    Row,
    delete,
    exists,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from sgw.common.errors import DatabaseError, NotFoundError
from sgw.provider.blockstore.packs import PackIndex
from sgw.provider.db.models import (
    SEGMENT_CHUNKS,
    SEGMENT_FORMAT,
    MapSegment,
    RetiredId,
    Snapshot,
    SnapshotSegment,
    Volume,
    VolumeSegment,
)
from sgw.provider.db.schema import bound_engine

# One map entry inside a segment: offset in the segment, raw SHA-256 digest.
_ENTRY = struct.Struct(">H32s")
# Longest IN (...) list per statement: SQLite allows 32766 bound variables, PostgreSQL's
# plans degrade with huge lists long before its own limit.
IN_BATCH = 500
# Segment rows fetched per round trip when enumerating references.
SCAN_BATCH = 256


class MapStorage:
    """The database every part of ``ChunkMaps`` works on (one session factory)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        # For the hottest read (a volume by id, once per chunk put): a plain connection
        # costs a quarter of a session's ORM ``get``.
        engine = bound_engine(sessions)
        if engine is None:
            raise TypeError("ChunkMaps needs sessions bound to an Engine")
        self._engine = engine
        self.packs = PackIndex(sessions)


@dataclass(frozen=True, slots=True)
class Owner:
    """The map being changed: a volume's pointers or a snapshot's."""

    table: type[VolumeSegment] | type[SnapshotSegment]
    id: str

    def column(self) -> InstrumentedAttribute[str]:
        if self.table is VolumeSegment:
            return VolumeSegment.volume_id
        return SnapshotSegment.snapshot_id


def _encode(entries: Mapping[int, bytes]) -> bytes:
    out = bytearray((SEGMENT_FORMAT,))
    for offset in sorted(entries):
        out += _ENTRY.pack(offset, entries[offset])
    return bytes(out)


def decode(data: bytes) -> dict[int, bytes]:
    if not data or data[0] != SEGMENT_FORMAT or (len(data) - 1) % _ENTRY.size:
        raise DatabaseError(
            f"map segment of {len(data)} bytes with format byte {data[:1]!r} is not readable "
            f"by this version (expects format {SEGMENT_FORMAT}); upgrade the provider"
        )
    return dict(_ENTRY.iter_unpack(memoryview(data)[1:]))


def apply_changes(s: Session, owner: Owner, changes: Mapping[int, bytes | None]) -> int:
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
        entries = {} if old_data is None else decode(old_data)
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
        s.execute(delete_pointers(owner, batch))
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
    drop_orphans(s, dropped)
    return rewritten


def is_referenced() -> ColumnElement[bool]:
    """True for a segment row that some volume or snapshot pointer names."""
    return or_(
        exists().where(VolumeSegment.segment_id == MapSegment.id),
        exists().where(SnapshotSegment.segment_id == MapSegment.id),
    )


def drop_orphans(s: Session, segment_ids: Iterable[int]) -> int:
    """Deletes those of ``segment_ids`` that no volume or snapshot names any more."""
    dropped = 0
    for batch in _batches(sorted(segment_ids)):
        result = s.execute(
            delete(MapSegment)
            .where(MapSegment.id.in_(batch), ~is_referenced())
            .execution_options(synchronize_session=False)
        )
        dropped += _rowcount(result)
    return dropped


def copy_pointers(s: Session, source: Owner, target: Owner) -> None:
    s.execute(
        insert(target.table).from_select(
            [target.column().key, "segment_index", "segment_id"],
            select(literal(target.id), source.table.segment_index, source.table.segment_id).where(
                source.column() == source.id
            ),
        )
    )


def delete_pointers(owner: Owner, segment_indexes: Sequence[int] | None = None) -> Delete:
    stmt = delete(owner.table).where(owner.column() == owner.id)
    if segment_indexes is not None:
        stmt = stmt.where(owner.table.segment_index.in_(segment_indexes))
    return stmt.execution_options(synchronize_session=False)


def pointer_ids(s: Session, owner: Owner) -> dict[int, int]:
    rows = s.execute(
        select(owner.table.segment_index, owner.table.segment_id).where(owner.column() == owner.id)
    )
    return {segment_index: segment_id for segment_index, segment_id in rows}


def segment_data(s: Session, segment_ids: Iterable[int]) -> dict[int, bytes]:
    wanted = sorted(segment_ids)
    data: dict[int, bytes] = {}
    for batch in _batches(wanted):
        rows = s.execute(select(MapSegment.id, MapSegment.data).where(MapSegment.id.in_(batch)))
        data.update({segment_id: blob for segment_id, blob in rows})
    if len(data) != len(wanted):
        raise NotFoundError("a snapshot was deleted while it was being read; retry")
    return data


def volume_segments(
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


def snapshot_segments(
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


def id_used(s: Session, id_: str) -> bool:
    """True if ``id_`` names a volume or a snapshot, or named one that was deleted: a
    caller-chosen id must name nothing else, now or before."""
    return any(s.get(model, id_) is not None for model in (Volume, Snapshot, RetiredId))


def lock_volume(s: Session, volume_id: str) -> Row[str, int, int, int, str]:
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


def lock_snapshot(s: Session, snapshot_id: str) -> Row[str, str, int, int, str]:
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


def _rowcount(result: Result[Any]) -> int:
    return result.rowcount if isinstance(result, CursorResult) else 0


def _batches(items: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), IN_BATCH):
        yield items[start : start + IN_BATCH]
