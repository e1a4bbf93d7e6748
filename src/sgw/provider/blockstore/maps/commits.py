"""Reading chunk maps (whole, one page, one chunk) and committing changes to a volume's.

A commit names the map version it is based on and an idempotency key: a stale base is
refused, a retry of a commit that was applied returns the version it produced.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from sgw.common.errors import IdempotencyKeyError, NotFoundError, VersionConflictError
from sgw.provider.blockstore.maps.records import (
    ChunkChanges,
    ChunkCheck,
    check_indexes,
    parse_changes,
)
from sgw.provider.blockstore.maps.references import loose_chunks, read_gc_generation
from sgw.provider.blockstore.maps.storage import (
    SCAN_BATCH,
    MapStorage,
    Owner,
    apply_changes,
    decode,
    snapshot_segments,
    volume_segments,
)
from sgw.provider.db.models import (
    KEY_MAX,
    SEGMENT_CHUNKS,
    CommitRecord,
    MapSegment,
    Snapshot,
    SnapshotSegment,
    Volume,
    VolumeSegment,
    utcnow,
)

LOG = logging.getLogger(__name__)

# Commit records kept per volume: a retry only ever concerns the last few commits.
_COMMIT_RECORDS_KEPT = 1000


class MapCommits(MapStorage):
    """Reading maps and committing changes to them."""

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
                _, rows = snapshot_segments(s, snapshot_id, volume_id, None)
            else:
                if volume_id is None:
                    raise ValueError("read_map needs a volume id or a snapshot id")
                volume, rows = volume_segments(s, volume_id, None)
                if version is not None and volume.map_version != version:
                    raise VersionConflictError(
                        f"volume {volume_id} is at map version {volume.map_version}, "
                        f"not {version}; read the current version"
                    )
        return _entries(rows)

    def read_volume_map(self, volume_id: str) -> tuple[int, dict[int, str]]:
        """The volume's map version and its whole map, read in one statement (consistent)."""
        with self._sessions() as s:
            volume, rows = volume_segments(s, volume_id, None)
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
                .execution_options(yield_per=SCAN_BATCH)
            )
            for segment_index, data in rows:
                base = segment_index * SEGMENT_CHUNKS
                for offset, digest in sorted(decode(data).items()):
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
                snap, rows = snapshot_segments(s, snapshot_id, volume_id, segment_index)
                size, chunk_size, name = snap.volume_size, snap.chunk_size, f"snapshot {snap.id}"
            else:
                if volume_id is None:
                    raise ValueError("lookup needs a volume id or a snapshot id")
                vol, rows = volume_segments(s, volume_id, segment_index)
                size, chunk_size, name = vol.size, vol.chunk_size, f"volume {vol.id}"
        check_indexes(name, size, chunk_size, (chunk_index,))
        for _, data in rows:
            digest = decode(data).get(offset)
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
        parsed = parse_changes(changes)
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
            check_indexes(f"volume {volume_id}", size, chunk_size, parsed)
            if check_chunks is not None and (loose := loose_chunks(s, key_scope, parsed)):
                check_chunks(loose, read_gc_generation(s, key_scope))
            rewritten = apply_changes(s, Owner(VolumeSegment, volume_id), parsed)
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


def _entries(rows: Iterable[tuple[int, bytes]]) -> dict[int, str]:
    """The sparse map (chunk index -> chunk id) that segment rows hold."""
    result: dict[int, str] = {}
    for segment_index, data in rows:
        base = segment_index * SEGMENT_CHUNKS
        for offset, digest in decode(data).items():
            result[base + offset] = digest.hex()
    return result


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


def _changes_digest(changes: Mapping[int, bytes | None]) -> str:
    h = hashlib.sha256()
    for index in sorted(changes):
        digest = changes[index]
        h.update(f"{index}:{'-' if digest is None else digest.hex()}\n".encode())
    return h.hexdigest()
