"""What callers of the chunk maps give and get: records, chunk changes, validation.

The records are plain frozen values read out of one transaction; the checks turn a
caller's mistake into a ValueError that names the fix before any row is touched.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from sgw.provider.db.models import NAME_MAX, Snapshot, SnapshotStatus, Volume, VolumeMode

DEFAULT_CHUNK_SIZE = 1 << 20
# Chunk sizes a volume may have (bytes, powers of two): small enough to keep a random
# write's upload cheap, large enough to keep maps small.
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20
# The largest volume (and block API snapshot) in bytes: 64 TiB, what one volume of the
# largest common SAN arrays holds; 2**26 map entries at 1 MiB chunks. Bounds what one
# create may cost (the map's segments, a restore's tree, a listing's pages).
MAX_VOLUME_SIZE = 64 << 40
_CHUNK_ID = re.compile(r"[0-9a-f]{64}")

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


def volume_info(v: Volume | Row[Any]) -> VolumeInfo:
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


def snapshot_info(snap: Snapshot) -> SnapshotInfo:
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


# Validation


def parse_changes(changes: ChunkChanges) -> dict[int, bytes | None]:
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


def check_indexes(name: str, size: int, chunk_size: int, indexes: Iterable[int]) -> None:
    count = -(-size // chunk_size)
    bad = [i for i in indexes if not 0 <= i < count]
    if bad:
        raise ValueError(
            f"{name} has chunks 0 to {count - 1} ({size} bytes in {chunk_size}-byte chunks); "
            f"chunk index {min(bad)} is out of range"
        )


def check_volume_size(size: int, what: str) -> None:
    """ValueError unless ``size`` is 1 to MAX_VOLUME_SIZE bytes."""
    if not 0 < size <= MAX_VOLUME_SIZE:
        raise ValueError(
            f"{what}: size {size} must be a positive number of bytes, at most "
            f"{MAX_VOLUME_SIZE} (64 TiB, the provider's limit)"
        )


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1) != 0:
        raise ValueError(
            f"chunk size {chunk_size}: use a power of two from {MIN_CHUNK_SIZE} to "
            f"{MAX_CHUNK_SIZE} bytes"
        )


def check_uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a UUID") from None


def check_description(description: str | None) -> None:
    if description is not None and len(description) > NAME_MAX:
        raise ValueError(f"snapshot description is longer than {NAME_MAX} characters")
