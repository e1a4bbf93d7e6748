"""Snapshots: taken of a volume (a pointer copy), or built chunk by chunk through the
block API (``start_snapshot``, ``put_snapshot_chunks``, ``complete_snapshot``); reading,
deleting and comparing them (``list_changed_chunks``).
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import delete, update

from sgw.common.errors import NameTakenError, NotFoundError, SnapshotStateError
from sgw.provider.blockstore.keys import new_scope
from sgw.provider.blockstore.maps.records import (
    DEFAULT_CHUNK_SIZE,
    ChunkChanges,
    ChunkCheck,
    SnapshotInfo,
    check_chunk_size,
    check_description,
    check_indexes,
    check_uuid,
    check_volume_size,
    parse_changes,
    snapshot_info,
)
from sgw.provider.blockstore.maps.references import loose_chunks, read_gc_generation
from sgw.provider.blockstore.maps.storage import (
    MapStorage,
    Owner,
    apply_changes,
    copy_pointers,
    decode,
    delete_pointers,
    drop_orphans,
    id_used,
    lock_snapshot,
    lock_volume,
    pointer_ids,
    segment_data,
)
from sgw.provider.db.models import (
    SEGMENT_CHUNKS,
    Account,
    RetiredId,
    Snapshot,
    SnapshotSegment,
    SnapshotStatus,
    VolumeSegment,
    utcnow,
)

LOG = logging.getLogger(__name__)


class SnapshotMaps(MapStorage):
    """Taking, building, reading, deleting and comparing snapshots."""

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
        check_description(description)
        if snapshot_id is not None:
            snapshot_id = check_uuid(snapshot_id, "snapshot id")
        with self._sessions.begin() as s:
            volume = lock_volume(s, volume_id)
            if snapshot_id is not None:
                existing = s.get(Snapshot, snapshot_id)
                if existing is None and id_used(s, snapshot_id):
                    raise NameTakenError(
                        f"snapshot id {snapshot_id} is not available: choose another (a new UUID)"
                    )
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
            copy_pointers(s, Owner(VolumeSegment, volume_id), Owner(SnapshotSegment, snapshot.id))
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
        shares the parent's key scope; without one it starts a key scope of its own
        (``new_scope``).
        """
        check_description(description)
        check_chunk_size(chunk_size)
        check_volume_size(volume_size, "snapshot volume")
        snapshot_id = str(uuid.uuid4())
        key_scope = new_scope(account_id)
        with self._sessions.begin() as s:
            if parent_snapshot_id is not None:
                parent = lock_snapshot(s, parent_snapshot_id)
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
                copy_pointers(
                    s,
                    Owner(SnapshotSegment, parent_snapshot_id),
                    Owner(SnapshotSegment, snapshot.id),
                )
        LOG.info("snapshot started", extra={"snapshot": snapshot.id, "account": account_id})
        return snapshot.id

    def put_snapshot_chunks(
        self, snapshot_id: str, changes: ChunkChanges, *, check_chunks: ChunkCheck | None = None
    ) -> None:
        """Sets chunks of a pending snapshot (None: the chunk is all zero); whatever
        ``check_chunks`` raises (it runs with the snapshot locked) refuses the change."""
        parsed = parse_changes(changes)
        with self._sessions.begin() as s:
            snap = lock_snapshot(s, snapshot_id)
            if snap.status != SnapshotStatus.PENDING:
                raise SnapshotStateError(
                    f"snapshot {snapshot_id} is {snap.status}; only pending snapshots take chunks"
                )
            check_indexes(f"snapshot {snapshot_id}", snap.volume_size, snap.chunk_size, parsed)
            if check_chunks is not None and (loose := loose_chunks(s, snap.key_scope, parsed)):
                check_chunks(loose, read_gc_generation(s, snap.key_scope))
            apply_changes(s, Owner(SnapshotSegment, snapshot_id), parsed)

    def complete_snapshot(self, snapshot_id: str) -> None:
        """Makes a pending snapshot immutable; completing it again is a no-op."""
        with self._sessions.begin() as s:
            snap = lock_snapshot(s, snapshot_id)
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
            return snapshot_info(snap)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Deletes the snapshot; chunks it alone referenced stop being referenced."""
        with self._sessions.begin() as s:
            lock_snapshot(s, snapshot_id)
            owner = Owner(SnapshotSegment, snapshot_id)
            dropped = set(pointer_ids(s, owner).values())
            s.execute(delete_pointers(owner))
            s.execute(delete(Snapshot).where(Snapshot.id == snapshot_id))
            s.add(RetiredId(id=snapshot_id, kind="snapshot", retired=utcnow()))
            drop_orphans(s, dropped)
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
            new = pointer_ids(s, Owner(SnapshotSegment, second_snapshot_id))
            old = {} if first is None else pointer_ids(s, Owner(SnapshotSegment, first.id))
            differing = sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
            wanted = {p[i] for p in (old, new) for i in differing if i in p}
            data = segment_data(s, wanted)
        changed: list[tuple[int, str | None]] = []
        for segment_index in differing:
            before = decode(data[old[segment_index]]) if segment_index in old else {}
            after = decode(data[new[segment_index]]) if segment_index in new else {}
            base = segment_index * SEGMENT_CHUNKS
            for offset in sorted(before.keys() | after.keys()):
                digest = after.get(offset)
                if digest != before.get(offset):
                    changed.append((base + offset, None if digest is None else digest.hex()))
        return changed
