"""Volumes: creating one (empty, or from a snapshot's map), reading and deleting it."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sgw.common.errors import (
    NameTakenError,
    NotFoundError,
    QuotaExceededError,
    SnapshotStateError,
)
from sgw.common.names import VOLUME_NAME_HELP, is_volume_name
from sgw.provider.blockstore.keys import new_scope
from sgw.provider.blockstore.maps.records import (
    DEFAULT_CHUNK_SIZE,
    VolumeInfo,
    check_chunk_size,
    check_uuid,
    check_volume_size,
    volume_info,
)
from sgw.provider.blockstore.maps.storage import (
    MapStorage,
    Owner,
    copy_pointers,
    delete_pointers,
    drop_orphans,
    id_used,
    lock_snapshot,
    lock_volume,
    pointer_ids,
)
from sgw.provider.db.models import (
    NAME_MAX,
    Account,
    CommitRecord,
    Gateway,
    RetiredId,
    Snapshot,
    SnapshotSegment,
    SnapshotStatus,
    Volume,
    VolumeMode,
    VolumeSegment,
    utcnow,
)

LOG = logging.getLogger(__name__)

_VOLUME_BY_ID = select(Volume.__table__).where(Volume.__table__.c.id == bindparam("id"))
# The answer to a chosen volume id that names a volume the request did not make: the same
# whether that volume is of another account, another gateway or merely different, so that
# it tells no caller which ids exist elsewhere.
UNAVAILABLE = "volume id {volume_id} is not available: choose another (a new UUID)"


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
        after a lost reply does not fail or leave an orphan behind. Only the same request
        gets it back (account, gateway, name, size, mode, chunk size, snapshot or none);
        any other is refused with ``UNAVAILABLE``, which says nothing of whose the id is,
        and so is an id that names a snapshot or a deleted volume or snapshot.
        A volume on a gateway (``gateway_id``) is named by the gateway's rule
        (sgw.common.names); any other with 1 to NAME_MAX printable characters.
        """
        if not name or len(name) > NAME_MAX or not name.isprintable():
            raise ValueError(
                f"volume name {name[:80]!r}: give 1 to {NAME_MAX} printable characters"
            )
        if gateway_id is not None and not is_volume_name(name):
            raise ValueError(
                f"volume name {name[:80]!r}: a volume on a gateway is named with "
                + VOLUME_NAME_HELP
            )
        request = _Request(
            account_id, gateway_id, name, size, VolumeMode(mode), chunk_size, from_snapshot_id
        )
        if volume_id is not None:
            volume_id = check_uuid(volume_id, "volume id")
            found = self._made_before(request, volume_id)
            if found is not None:
                return found
        check_volume_size(size, f"volume {name!r}")
        try:
            info = self._insert(request, volume_id)
        except IntegrityError as e:
            # Another request made the id or the name first: a retry that ran beside the
            # first gets the volume; anything else is refused as above.
            if volume_id is not None:
                found = self._made_before(request, volume_id)
                if found is not None:
                    return found
            raise NameTakenError(
                f"account {account_id} already has a volume named {name!r}; pick another name"
            ) from e
        LOG.info(
            "volume created",
            extra={"volume": info.id, "account": account_id, "size": size, "mode": info.mode.value},
        )
        return info

    def _made_before(self, request: _Request, volume_id: str) -> VolumeInfo | None:
        """The volume ``volume_id`` if ``request`` made it, None if there is none;
        NameTakenError(UNAVAILABLE) if it is another's (of this account or another: the
        answer is the same, so that no caller learns which ids other accounts hold)."""
        with self._sessions() as s:
            existing = s.get(Volume, volume_id)
            if existing is None:
                if id_used(s, volume_id):
                    LOG.info(
                        "volume id refused: it names a snapshot or a deleted volume or snapshot",
                        extra={"volume": volume_id, "account": request.account_id},
                    )
                    raise NameTakenError(UNAVAILABLE.format(volume_id=volume_id))
                return None
            if not request.made(s, existing):
                LOG.info(
                    "volume id refused: it names another volume",
                    extra={"volume": volume_id, "account": request.account_id},
                )
                raise NameTakenError(UNAVAILABLE.format(volume_id=volume_id))
            return volume_info(existing)

    def _insert(self, r: _Request, volume_id: str | None) -> VolumeInfo:
        """The new volume's record (and its map's pointers, from a snapshot)."""
        name, chunk_size, from_snapshot_id = r.name, r.chunk_size, r.from_snapshot_id
        with self._sessions.begin() as s:
            source = None
            if from_snapshot_id is not None:
                source = lock_snapshot(s, from_snapshot_id)
                if source.account_id != r.account_id:
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
                if r.size < source.volume_size:
                    raise ValueError(
                        f"volume {name!r}: size {r.size} is smaller than snapshot "
                        f"{from_snapshot_id}'s {source.volume_size} bytes"
                    )
            chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
            check_chunk_size(chunk_size)
            # Locked (PostgreSQL): creates of one account are serialised, so two of them
            # cannot both pass its quotas (SQLite serialises every writer anyway).
            account = s.get(Account, r.account_id, with_for_update=True)
            if account is None:
                raise NotFoundError(f"account {r.account_id} does not exist")
            _check_quotas(s, account, r.size)
            if r.gateway_id is not None:
                gateway = s.get(Gateway, r.gateway_id)
                if gateway is None or gateway.account_id != r.account_id:
                    raise NotFoundError(
                        f"gateway {r.gateway_id} not found in account {r.account_id}"
                    )
            taken = select(Volume.id).where(Volume.account_id == r.account_id, Volume.name == name)
            if s.scalar(taken) is not None:
                raise NameTakenError(
                    f"account {r.account_id} already has a volume named {name!r}; pick another name"
                )
            volume_id = volume_id or str(uuid.uuid4())
            volume = Volume(
                id=volume_id,
                account_id=r.account_id,
                gateway_id=r.gateway_id,
                name=name,
                size=r.size,
                chunk_size=chunk_size,
                mode=r.mode.value,
                map_version=0,
                key_scope=new_scope(r.account_id) if source is None else source.key_scope,
                source_snapshot_id=from_snapshot_id,
                created=utcnow(),
            )
            s.add(volume)
            s.flush()
            if from_snapshot_id is not None:
                copy_pointers(
                    s, Owner(SnapshotSegment, from_snapshot_id), Owner(VolumeSegment, volume.id)
                )
            return volume_info(volume)

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
            s.add(RetiredId(id=volume_id, kind="volume", retired=utcnow()))
            drop_orphans(s, dropped)
        LOG.info("volume deleted", extra={"volume": volume_id})


@dataclass(frozen=True, slots=True)
class _Request:
    """What a volume creation asks for: the volume it made, if asked again, has all of it."""

    account_id: str
    gateway_id: str | None
    name: str
    size: int
    mode: VolumeMode
    chunk_size: int | None
    from_snapshot_id: str | None

    def made(self, s: Session, v: Volume) -> bool:
        """True if ``v`` is the volume this request makes (asked before)."""
        if (v.account_id, v.gateway_id, v.name, v.size, v.mode) != (
            self.account_id,
            self.gateway_id,
            self.name,
            self.size,
            self.mode.value,
        ):
            return False
        if self.chunk_size is not None and v.chunk_size != self.chunk_size:
            return False
        if self.from_snapshot_id is None:
            # An empty volume started a key scope of its own: named by the provider
            # (``<account>.<random>``), or by its id before that.
            return v.source_snapshot_id is None and (v.key_scope == v.id or "." in v.key_scope)
        if v.source_snapshot_id is not None:
            return v.source_snapshot_id == self.from_snapshot_id
        # Made before volumes recorded their snapshot: it shares the snapshot's scope.
        source = s.get(Snapshot, self.from_snapshot_id)
        if source is None:  # deleted since: the volume still shares its key scope
            return v.key_scope != v.id and "." not in v.key_scope
        return source.account_id == self.account_id and v.key_scope == source.key_scope


def _check_quotas(s: Session, account: Account, size: int) -> None:
    """QuotaExceededError if a new volume of ``size`` bytes would take the account past
    its volume or provisioned-bytes quota (docs/provider.md, "Quotas")."""
    fix = f"`sgw accounts quota-set {account.id}"
    if account.quota_volumes is not None:
        count = s.scalar(select(func.count(Volume.id)).where(Volume.account_id == account.id))
        if (count or 0) >= account.quota_volumes:
            raise QuotaExceededError(
                f"account {account.id} has {count} volume(s), its volume quota is "
                f"{account.quota_volumes}: delete a volume, or the provider's operator raises "
                f"the quota with {fix} --volumes N`"
            )
    if account.quota_bytes is not None:
        total = s.scalar(
            select(func.coalesce(func.sum(Volume.size), 0)).where(Volume.account_id == account.id)
        )
        if (total or 0) + size > account.quota_bytes:
            raise QuotaExceededError(
                f"account {account.id} has {total} bytes of volumes provisioned; {size} more "
                f"would exceed its byte quota of {account.quota_bytes}: make the volume "
                f"smaller or delete one, or the provider's operator raises the quota with "
                f"{fix} --bytes SIZE`"
            )
