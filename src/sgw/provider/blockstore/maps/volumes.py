"""Volumes: creating one (empty, or from a snapshot's map), reading and deleting it."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError

from sgw.common.errors import NameTakenError, NotFoundError, SnapshotStateError
from sgw.provider.blockstore.maps.records import (
    DEFAULT_CHUNK_SIZE,
    VolumeInfo,
    check_chunk_size,
    check_uuid,
    volume_info,
)
from sgw.provider.blockstore.maps.storage import (
    MapStorage,
    Owner,
    copy_pointers,
    delete_pointers,
    drop_orphans,
    lock_snapshot,
    lock_volume,
    pointer_ids,
)
from sgw.provider.db.models import (
    NAME_MAX,
    Account,
    CommitRecord,
    Gateway,
    SnapshotSegment,
    SnapshotStatus,
    Volume,
    VolumeMode,
    VolumeSegment,
    utcnow,
)

LOG = logging.getLogger(__name__)

_VOLUME_BY_ID = select(Volume.__table__).where(Volume.__table__.c.id == bindparam("id"))


class VolumeMaps(MapStorage):
    """Creating, reading and deleting volumes."""

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
            volume_id = check_uuid(volume_id, "volume id")
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
                    return volume_info(existing)
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"volume name {name!r}: give 1 to {NAME_MAX} characters")
        mode = VolumeMode(mode)
        if size <= 0:
            raise ValueError(f"volume {name!r}: size {size} must be a positive number of bytes")
        with self._sessions.begin() as s:
            source = None
            if from_snapshot_id is not None:
                source = lock_snapshot(s, from_snapshot_id)
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
            check_chunk_size(chunk_size)
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
                copy_pointers(
                    s, Owner(SnapshotSegment, from_snapshot_id), Owner(VolumeSegment, volume.id)
                )
            info = volume_info(volume)
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
        return volume_info(row)

    def delete_volume(self, volume_id: str) -> None:
        """Deletes the volume and its map; its snapshots stay (without a volume)."""
        with self._sessions.begin() as s:
            lock_volume(s, volume_id)
            owner = Owner(VolumeSegment, volume_id)
            dropped = set(pointer_ids(s, owner).values())
            s.execute(delete_pointers(owner))
            s.execute(delete(CommitRecord).where(CommitRecord.volume_id == volume_id))
            s.execute(delete(Volume).where(Volume.id == volume_id))
            drop_orphans(s, dropped)
        LOG.info("volume deleted", extra={"volume": volume_id})
