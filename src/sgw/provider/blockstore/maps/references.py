"""What garbage collection asks of the maps: which chunks they reference, and deleting
chunks, locations, packs and segments nothing references.

The collector and the writers meet at the rows of a key scope's volumes and snapshots:
every deletion runs with all of them locked (``_lock_scope``), and a writer checks the
chunks it names (``loose_chunks``, ``ChunkCheck``) with its own row locked, against the
scope's GC generation, which a collection bumps before it deletes anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime

from sqlalchemy import delete, select, union, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sgw.provider.blockstore.maps.storage import (
    IN_BATCH,
    SCAN_BATCH,
    MapStorage,
    decode,
    drop_orphans,
    is_referenced,
)
from sgw.provider.blockstore.packs import located
from sgw.provider.db.models import (
    ChunkLocation,
    ChunkPack,
    GcGeneration,
    MapSegment,
    Snapshot,
    SnapshotSegment,
    Volume,
    VolumeSegment,
)
from sgw.provider.db.schema import upsert_insert

LOG = logging.getLogger(__name__)


class ChunkReferences(MapStorage):
    """Chunk references for garbage collection, and deletions under the scope's locks."""

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
        self,
        key_scope: str,
        chunk_ids: Iterable[str],
        delete: Callable[[str], None],
        names_of: Callable[[str], Iterable[str]] = lambda chunk_id: (chunk_id,),
    ) -> list[str]:
        """Calls ``delete`` for each of ``chunk_ids`` that no map of ``key_scope``
        references; the ids it was called for. With ``names_of`` the candidates are names
        instead (the store names objects by a keyed hash of the chunk id): a candidate is
        referenced if it is one of the names of a referenced chunk id.

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
            referenced = {n for c in _referenced(s, key_scope) for n in names_of(c)}
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
            for i in range(0, len(doomed), IN_BATCH):
                s.execute(
                    delete(ChunkLocation).where(
                        ChunkLocation.key_scope == key_scope,
                        ChunkLocation.chunk_id.in_(doomed[i : i + IN_BATCH]),
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
                for i in range(0, len(ids), IN_BATCH):
                    rows = s.execute(
                        delete(ChunkPack)
                        .where(
                            ChunkPack.id.in_(ids[i : i + IN_BATCH]),
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
            return read_gc_generation(s, key_scope)

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
                        .where(MapSegment.id > last, ~is_referenced())
                        .order_by(MapSegment.id)
                        .limit(IN_BATCH)
                    )
                )
            if not ids:
                break
            last = ids[-1]
            try:
                with self._sessions.begin() as s:
                    swept += drop_orphans(s, ids)
            except IntegrityError:
                # A pointer to one of them was being copied: it is in use again.
                LOG.info("segment sweep skipped a batch in use", extra={"from_id": ids[0]})
        if swept:
            LOG.info("unreferenced map segments swept", extra={"segments": swept})
        return swept


def _referenced(s: Session, key_scope: str | None) -> Iterator[str]:
    """The chunk ids that maps (of ``key_scope``, or all) name, streamed; ids may repeat."""
    if key_scope is None:
        where = is_referenced()
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
        select(MapSegment.data).where(where).execution_options(yield_per=SCAN_BATCH)
    ).scalars()
    for data in rows:
        for digest in set(decode(data).values()):
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


def loose_chunks(s: Session, key_scope: str, changes: Mapping[int, bytes | None]) -> list[str]:
    """The distinct chunk ids a parsed change names that have no location in a pack."""
    named = _named_chunks(changes)
    packed = located(s, key_scope, named) if named else set()
    return [c for c in named if c not in packed]


def _named_chunks(changes: Mapping[int, bytes | None]) -> list[str]:
    """The distinct chunk ids a parsed change names, sorted."""
    return sorted({digest.hex() for digest in changes.values() if digest is not None})


def read_gc_generation(s: Session, key_scope: str) -> int:
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
