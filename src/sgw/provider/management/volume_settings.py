"""What an admin sets on volumes besides their data: who may log in over iSCSI (CHAP
credentials, initiators allowed without CHAP, the open flag), snapshot schedules, and the
listings of an account's volumes and snapshots.

iSCSI access is closed by default (sgw.common.iscsi): a volume without rules accepts no
initiator. Every change of a volume's rules ends its "legacy open" mark (its gateway ends
it too when it fetches them, ``sync_chap``); the gateways' ``describe`` answers set it
(``record_reported_access``).

CHAP secrets must reach LIO in the clear, so they are encrypted, not hashed: AES-256-GCM
under a key derived (HKDF-SHA256) from the provider's master key, the volume and the
initiator bound in as associated data so a row copied elsewhere does not decrypt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError, MasterKeyError, NotFoundError
from sgw.common.iscsi import INITIATOR_NAME_HELP, access_label, initiator_name
from sgw.provider.blockstore.maps import SnapshotStatus, VolumeMode
from sgw.provider.db.models import (
    NAME_MAX,
    ChapCredential,
    InitiatorAcl,
    Snapshot,
    SnapshotSchedule,
    Volume,
    utcnow,
)

LOG = logging.getLogger(__name__)

_CHAP_INFO = b"sgw chap secrets"
# CHAP secrets: 12 to 16 printable ASCII characters, what Windows and Linux initiators
# both accept (RFC 3720 recommends at least 12 for one-way CHAP).
CHAP_SECRET_MIN = 12
CHAP_SECRET_MAX = 16
RECURRENCES = (1, 2, 4, 8, 12, 24)


@dataclass(frozen=True, slots=True)
class VolumeRow:
    id: str
    name: str
    gateway_id: str | None
    size: int
    chunk_size: int
    mode: VolumeMode
    map_version: int
    created: datetime
    access: str  # sgw.common.iscsi.access_label: closed, chap N, acl N, OPEN, OPEN (legacy)
    iscsi_open: bool
    iscsi_legacy_open: bool


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    id: str
    volume_id: str | None
    parent_snapshot_id: str | None
    status: SnapshotStatus
    volume_size: int
    chunk_size: int
    description: str | None
    created: datetime
    completed: datetime | None
    scheduled_for: datetime | None  # the schedule's slot; None: taken otherwise


@dataclass(frozen=True, slots=True)
class ChapInfo:
    initiator: str
    mutual: bool
    updated: datetime


@dataclass(frozen=True, slots=True)
class AclInfo:
    initiator: str
    updated: datetime


@dataclass(frozen=True, slots=True)
class AccessInfo:
    """A volume's iSCSI access: its label, flags and initiators (never the secrets)."""

    access: str
    open: bool
    legacy_open: bool
    chap: list[ChapInfo]
    acl: list[AclInfo]


@dataclass(frozen=True, slots=True)
class GatewayAccess:
    """A volume's rules as its gateway applies them: CHAP (initiator, secret, target
    secret) decrypted, initiators without CHAP, the open flag."""

    chap: list[tuple[str, str, str | None]]
    acl: list[str]
    open: bool


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    volume_id: str
    start_hour: int
    recurrence_hours: int
    description: str | None
    retain: int | None
    updated: datetime


class SecretBox:
    """Encrypts CHAP secrets under a key derived from the master key."""

    def __init__(self, master_key: bytes) -> None:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CHAP_INFO)
        self._aead = AESGCM(hkdf.derive(master_key))

    def seal(self, secret: str, context: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret.encode(), context.encode())

    def open(self, sealed: bytes, context: str) -> str:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], context.encode()).decode()
        except (InvalidTag, ValueError) as e:
            raise MasterKeyError(
                f"a stored CHAP secret ({context}) cannot be decrypted: the master key changed"
            ) from e


def check_chap_secret(secret: str, what: str) -> str:
    if (
        not CHAP_SECRET_MIN <= len(secret) <= CHAP_SECRET_MAX
        or not secret.isascii()
        or not secret.isprintable()
    ):
        raise BadRequestError(
            f"{what}: give {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} printable ASCII characters"
        )
    return secret


class VolumeSettings:
    """Listings, CHAP credentials and snapshot schedules of an account's volumes."""

    def __init__(self, sessions: sessionmaker[Session], box: SecretBox) -> None:
        self._sessions = sessions
        self._box = box

    def list_volumes(self, account_id: str, gateway_id: str | None = None) -> list[VolumeRow]:
        query = select(Volume).where(Volume.account_id == account_id)
        if gateway_id is not None:
            query = query.where(Volume.gateway_id == gateway_id)
        with self._sessions() as s:
            volumes = list(s.scalars(query.order_by(Volume.created, Volume.id)))
            chap = _counts(s, ChapCredential.volume_id, account_id, gateway_id)
            acl = _counts(s, InitiatorAcl.volume_id, account_id, gateway_id)
            return [
                VolumeRow(
                    v.id,
                    v.name,
                    v.gateway_id,
                    v.size,
                    v.chunk_size,
                    VolumeMode(v.mode),
                    v.map_version,
                    v.created,
                    access_label(
                        chap.get(v.id, 0), acl.get(v.id, 0), v.iscsi_open, v.iscsi_legacy_open
                    ),
                    v.iscsi_open,
                    v.iscsi_legacy_open,
                )
                for v in volumes
            ]

    def list_snapshots(self, account_id: str, volume_id: str | None = None) -> list[SnapshotRow]:
        query = select(Snapshot).where(Snapshot.account_id == account_id)
        if volume_id is not None:
            query = query.where(Snapshot.volume_id == volume_id)
        with self._sessions() as s:
            return [
                SnapshotRow(
                    x.id,
                    x.volume_id,
                    x.parent_snapshot_id,
                    SnapshotStatus(x.status),
                    x.volume_size,
                    x.chunk_size,
                    x.description,
                    x.created,
                    x.completed,
                    x.scheduled_for,
                )
                for x in s.scalars(query.order_by(Snapshot.created, Snapshot.id))
            ]

    # CHAP

    def set_chap(
        self,
        account_id: str,
        volume_id: str,
        initiator: str,
        secret: str,
        target_secret: str | None,
    ) -> ChapInfo:
        initiator = _check_initiator(initiator)
        check_chap_secret(secret, "CHAP secret")
        if target_secret is not None:
            check_chap_secret(target_secret, "mutual CHAP (target) secret")
            if target_secret == secret:
                raise BadRequestError(
                    "the mutual CHAP (target) secret must differ from the initiator's secret"
                )
        context = f"{volume_id}/{initiator}"
        with self._sessions.begin() as s:
            volume = self._volume(s, account_id, volume_id)
            volume.iscsi_legacy_open = False
            # An initiator allowed without CHAP that gets credentials needs them from now.
            s.execute(
                delete(InitiatorAcl).where(
                    InitiatorAcl.volume_id == volume_id, InitiatorAcl.initiator == initiator
                )
            )
            row = s.get(ChapCredential, (volume_id, initiator))
            if row is None:
                row = ChapCredential(volume_id=volume_id, initiator=initiator)
                s.add(row)
            row.secret = self._box.seal(secret, context)
            row.target_secret = (
                None if target_secret is None else self._box.seal(target_secret, context + "/t")
            )
            row.updated = utcnow()
            info = ChapInfo(initiator, target_secret is not None, row.updated)
        LOG.info("chap credentials set", extra={"volume": volume_id, "initiator": initiator})
        return info

    def list_chap(self, account_id: str, volume_id: str) -> list[ChapInfo]:
        with self._sessions() as s:
            self._volume(s, account_id, volume_id)
            rows = s.scalars(
                select(ChapCredential)
                .where(ChapCredential.volume_id == volume_id)
                .order_by(ChapCredential.initiator)
            )
            return [ChapInfo(r.initiator, r.target_secret is not None, r.updated) for r in rows]

    def chap_secrets(self, volume_id: str) -> list[tuple[str, str, str | None]]:
        """(initiator, secret, target secret) of a volume, decrypted: for its gateway."""
        with self._sessions() as s:
            rows = list(
                s.scalars(select(ChapCredential).where(ChapCredential.volume_id == volume_id))
            )
        out = []
        for r in rows:
            context = f"{volume_id}/{r.initiator}"
            target = None
            if r.target_secret is not None:
                target = self._box.open(r.target_secret, context + "/t")
            out.append((r.initiator, self._box.open(r.secret, context), target))
        return out

    def delete_chap(self, account_id: str, volume_id: str, initiator: str) -> None:
        """Removes an initiator's credentials (the volume's last rule: it is closed)."""
        with self._sessions.begin() as s:
            volume = self._volume(s, account_id, volume_id)
            gone = s.execute(
                delete(ChapCredential).where(
                    ChapCredential.volume_id == volume_id, ChapCredential.initiator == initiator
                )
            )
            if not getattr(gone, "rowcount", 0):
                raise NotFoundError(f"volume {volume_id} has no CHAP credentials for {initiator}")
            volume.iscsi_legacy_open = False

    # Initiators without CHAP, the open flag

    def add_acl(self, account_id: str, volume_id: str, initiator: str) -> AclInfo:
        """Allows an initiator on the volume by its name alone, without CHAP."""
        name = initiator_name(initiator)
        if name is None:
            raise BadRequestError(f"initiator {initiator[:80]!r}: give {INITIATOR_NAME_HELP}")
        with self._sessions.begin() as s:
            volume = self._volume(s, account_id, volume_id)
            if s.get(ChapCredential, (volume_id, name)) is not None:
                raise BadRequestError(
                    f"initiator {name} has CHAP credentials on volume {volume_id}; remove "
                    f"them first (sgw volumes chap-delete {volume_id} {name}) to let it in "
                    "without CHAP"
                )
            row = s.get(InitiatorAcl, (volume_id, name))
            if row is None:
                row = InitiatorAcl(volume_id=volume_id, initiator=name)
                s.add(row)
            row.updated = utcnow()
            volume.iscsi_legacy_open = False
            info = AclInfo(name, row.updated)
        LOG.info("initiator allowed without chap", extra={"volume": volume_id, "initiator": name})
        return info

    def list_acl(self, account_id: str, volume_id: str) -> list[AclInfo]:
        with self._sessions() as s:
            self._volume(s, account_id, volume_id)
            rows = s.scalars(
                select(InitiatorAcl)
                .where(InitiatorAcl.volume_id == volume_id)
                .order_by(InitiatorAcl.initiator)
            )
            return [AclInfo(r.initiator, r.updated) for r in rows]

    def delete_acl(self, account_id: str, volume_id: str, initiator: str) -> None:
        """Removes an initiator allowed without CHAP (the last rule: the volume closes)."""
        name = initiator.strip().lower()
        with self._sessions.begin() as s:
            volume = self._volume(s, account_id, volume_id)
            gone = s.execute(
                delete(InitiatorAcl).where(
                    InitiatorAcl.volume_id == volume_id, InitiatorAcl.initiator == name
                )
            )
            if not getattr(gone, "rowcount", 0):
                raise NotFoundError(f"volume {volume_id} allows no initiator {name} without CHAP")
            volume.iscsi_legacy_open = False

    def set_open(self, account_id: str, volume_id: str, open_: bool) -> AccessInfo:
        """Sets the open flag: any initiator may log in without authentication (labs), the
        rules kept but not applied; cleared, the rules apply (none: closed)."""
        with self._sessions.begin() as s:
            volume = self._volume(s, account_id, volume_id)
            volume.iscsi_open = open_
            volume.iscsi_legacy_open = False
        log = LOG.warning if open_ else LOG.info
        log(
            "volume open to any iscsi initiator" if open_ else "volume open flag cleared",
            extra={"volume": volume_id},
        )
        return self.access(account_id, volume_id)

    def access(self, account_id: str, volume_id: str) -> AccessInfo:
        with self._sessions() as s:
            volume = self._volume(s, account_id, volume_id)
            opened, legacy = volume.iscsi_open, volume.iscsi_legacy_open
        chap = self.list_chap(account_id, volume_id)
        acl = self.list_acl(account_id, volume_id)
        label = access_label(len(chap), len(acl), opened, legacy)
        return AccessInfo(label, opened, legacy, chap, acl)

    def gateway_access(self, volume_id: str) -> GatewayAccess:
        """The volume's rules for its gateway, secrets decrypted."""
        with self._sessions() as s:
            volume = s.get(Volume, volume_id)
            if volume is None:
                raise NotFoundError(f"volume {volume_id} not found")
            opened = volume.iscsi_open
            acl = list(
                s.scalars(
                    select(InitiatorAcl.initiator)
                    .where(InitiatorAcl.volume_id == volume_id)
                    .order_by(InitiatorAcl.initiator)
                )
            )
        return GatewayAccess(self.chap_secrets(volume_id), acl, opened)

    def record_reported_access(self, gateway_id: str, legacy_open: dict[str, bool]) -> None:
        """Records, for the gateway's volumes it reported on (by id), whether it exports
        them legacy open."""
        if not legacy_open:
            return
        with self._sessions.begin() as s:
            for value in (True, False):
                ids = [v for v, legacy in legacy_open.items() if legacy is value]
                if ids:
                    s.execute(
                        update(Volume)
                        .where(Volume.gateway_id == gateway_id, Volume.id.in_(ids))
                        .values(iscsi_legacy_open=value)
                    )

    # Snapshot schedules

    def set_schedule(
        self,
        account_id: str,
        volume_id: str,
        *,
        start_hour: int,
        recurrence_hours: int,
        description: str | None,
        retain: int | None,
    ) -> ScheduleInfo:
        if not 0 <= start_hour < 24:
            raise BadRequestError(f"start_hour {start_hour}: give an hour from 0 to 23")
        if recurrence_hours not in RECURRENCES:
            raise BadRequestError(
                f"recurrence_hours {recurrence_hours}: give one of "
                f"{', '.join(map(str, RECURRENCES))}"
            )
        if retain is not None and not 1 <= retain <= 10_000:
            raise BadRequestError(f"retain {retain}: keep 1 to 10000 snapshots, or omit it")
        if description is not None and len(description) > NAME_MAX:
            raise BadRequestError(f"description: at most {NAME_MAX} characters")
        with self._sessions.begin() as s:
            self._volume(s, account_id, volume_id)
            row = s.get(SnapshotSchedule, volume_id)
            if row is None:
                row = SnapshotSchedule(volume_id=volume_id)
                s.add(row)
            row.start_hour = start_hour
            row.recurrence_hours = recurrence_hours
            row.description = description
            row.retain = retain
            row.updated = utcnow()
            info = _schedule(row)
        LOG.info("snapshot schedule set", extra={"volume": volume_id})
        return info

    def get_schedule(self, account_id: str, volume_id: str) -> ScheduleInfo:
        with self._sessions() as s:
            self._volume(s, account_id, volume_id)
            row = s.get(SnapshotSchedule, volume_id)
            if row is None:
                raise NotFoundError(f"volume {volume_id} has no snapshot schedule")
            return _schedule(row)

    def delete_schedule(self, account_id: str, volume_id: str) -> None:
        with self._sessions.begin() as s:
            self._volume(s, account_id, volume_id)
            row = s.get(SnapshotSchedule, volume_id)
            if row is None:
                raise NotFoundError(f"volume {volume_id} has no snapshot schedule")
            s.delete(row)

    @staticmethod
    def _volume(s: Session, account_id: str, volume_id: str) -> Volume:
        volume = s.get(Volume, volume_id)
        if volume is None or volume.account_id != account_id:
            raise NotFoundError(f"volume {volume_id} not found in account {account_id}")
        return volume


def _counts(s: Session, column: Any, account_id: str, gateway_id: str | None) -> dict[str, int]:
    """How many rows of ``column``'s table (a volume id) each of the account's volumes
    (of the gateway, if given) has."""
    query = (
        select(column, func.count())
        .join(Volume, Volume.id == column)
        .where(Volume.account_id == account_id)
    )
    if gateway_id is not None:
        query = query.where(Volume.gateway_id == gateway_id)
    return {str(v): int(n) for v, n in s.execute(query.group_by(column))}


def _check_initiator(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 223 or not name.isascii() or not name.isprintable() or " " in name:
        raise BadRequestError(
            f"initiator {name[:80]!r}: give the initiator's iSCSI name, e.g. "
            "iqn.1994-05.com.redhat:client1 (at most 223 characters, no spaces)"
        )
    return name


def _schedule(row: SnapshotSchedule) -> ScheduleInfo:
    return ScheduleInfo(
        row.volume_id,
        row.start_hour,
        row.recurrence_hours,
        row.description,
        row.retain,
        row.updated,
    )
