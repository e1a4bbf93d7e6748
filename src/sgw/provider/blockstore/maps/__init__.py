"""Chunk maps of volumes and snapshots: commits, snapshots, diffs and references for GC.

A chunk map says, for each chunk index of a volume, which chunk holds its data (the chunk
id: SHA-256 hex of the plaintext) or that the chunk is all zero (no entry). The destager
commits a batch of changes at once against the map version it started from
(``commit_changes``); snapshots freeze a map without copying it; the block API builds
snapshots chunk by chunk (``start_snapshot`` ... ``complete_snapshot``) and lists what
changed between two of them. How maps are stored (segments, pointers, the encoding) is
described in ``sgw.provider.db.models`` and stays private to this package.

Every public method is one database transaction of its own and returns plain values, so
one ``ChunkMaps`` can serve many threads. Methods taking a bare volume or snapshot id do
not check the account: callers resolve ids through ``get_volume``/``get_snapshot`` first.

Concurrency: every write first updates the row of the volume (or snapshot) it changes.
That row lock (PostgreSQL) or write lock (SQLite, whose driver opens the transaction at the
first write) serialises writers of one map, and everything the writer reads afterwards is
current. Reads are single statements, hence consistent on both backends.

Import from here; the parts are ``records`` (what callers give and get), ``storage``
(segments, pointers, row locks), ``volumes``, ``commits`` (map reads and commits),
``snapshots`` and ``references`` (what garbage collection asks of the maps).
"""

from __future__ import annotations

from sgw.common.errors import IdempotencyKeyError, NameTakenError, SnapshotStateError
from sgw.provider.blockstore.maps.commits import MapCommits
from sgw.provider.blockstore.maps.records import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_VOLUME_SIZE,
    MIN_CHUNK_SIZE,
    ChunkChanges,
    ChunkCheck,
    SnapshotInfo,
    VolumeInfo,
)
from sgw.provider.blockstore.maps.references import ChunkReferences
from sgw.provider.blockstore.maps.snapshots import SnapshotMaps
from sgw.provider.blockstore.maps.volumes import VolumeMaps
from sgw.provider.db.models import SnapshotStatus, VolumeMode

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_VOLUME_SIZE",
    "MIN_CHUNK_SIZE",
    "ChunkChanges",
    "ChunkCheck",
    "ChunkMaps",
    "IdempotencyKeyError",
    "NameTakenError",
    "SnapshotInfo",
    "SnapshotStateError",
    "SnapshotStatus",
    "VolumeInfo",
    "VolumeMode",
]


class ChunkMaps(VolumeMaps, MapCommits, SnapshotMaps, ChunkReferences):
    """The chunk-map repository over the provider's database."""
