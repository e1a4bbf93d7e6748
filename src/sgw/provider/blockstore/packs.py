"""Pack objects: several encoded chunks of one key scope in one stored object, and the
database rows that say which pack holds which chunk (docs/adr/0005-chunk-packs.md).

Object layout (``packs/<key scope>/<pack id>``; integers big-endian)::

    the encoded chunks (``sgw.common.chunks``), one after the other
    per chunk: object name (32 bytes), offset (8 bytes), length (4 bytes)
    trailer (16 bytes): number of chunks (4), CRC32C of the index entries (4),
                        magic b"SGWP", format version (1), reserved zero (3)

Each chunk keeps its own header and CRC32C, so a ranged read checks what it got; the
index makes a pack readable without the database (``read_index``). Format 2 indexes name
each chunk by its object name (``KeyRing.object_name``: a keyed hash of the chunk id), so
a pack read by someone without the master key does not say which content it holds; format
1 packs, written before, name the chunk ids themselves (the plaintext's SHA-256) and are
rewritten to format 2 by ``sgw provider migrate-object-names``. The two index the same
bytes at the same offsets: only the 32-byte names differ.

Life of a pack (``PackIndex``): a row is made (``begin``) before the object is written,
so an object without a row is garbage whatever its age; once the object is durable the
row is marked written and every chunk's location points at it, in one transaction
(``finish``). Only written packs have locations, so a chunk with a location can be read.
A garbage collection pass that deletes a pack row deletes its locations with it (the
foreign key cascades) while it holds the scope's maps locked (``ChunkMaps``), and deletes
the object only after that transaction: a commit either saw the location before the
collector locked the scope (and the collector then sees the reference) or finds none.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from crc32c import crc32c
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.chunks import Payload, encode_into
from sgw.common.errors import ChunkCorruptError
from sgw.provider.db.models import ChunkLocation, ChunkPack, utcnow
from sgw.provider.db.schema import upsert_insert

PACKS_PREFIX = "packs/"
MAGIC = b"SGWP"
FORMAT_VERSION = 2
# Format 1 (chunk ids in the index) is still read; nothing writes it any more.
LEGACY_FORMAT = 1

_ENTRY = struct.Struct(">32sQI")
_TRAILER = struct.Struct(">II4sB3s")
# Ids per IN (...) list: well below SQLite's bound on host parameters.
_IN_BATCH = 500


def pack_key(scope: str, pack_id: str) -> str:
    """The object key of a pack."""
    return f"{PACKS_PREFIX}{scope}/{pack_id}"


def new_pack_id() -> str:
    """A fresh random pack id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class PackContents:
    """A pack row and its chunks that have locations (id, offset, length)."""

    id: str
    size: int
    written: bool
    chunks: list[tuple[str, int, int]]


def is_sparse(size: int, live_bytes: int) -> bool:
    """True if a pack of ``size`` bytes whose live chunks take ``live_bytes`` is worth
    rewriting: some live, less than half of the object (its index counts: a pack of four
    equal chunks with two live qualifies)."""
    return live_bytes > 0 and live_bytes * 2 < size


@dataclass(frozen=True, slots=True)
class Location:
    """Where a packed chunk is: the pack and its byte range in the pack object."""

    pack_id: str
    offset: int
    length: int


def build_pack(
    blobs: Sequence[tuple[str, bytes | bytearray]], *, name_of: Callable[[str], str]
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The pack object of encoded chunks ``(chunk id, blob)``, and (id, offset, length)
    of each (one copy of the blobs); ``name_of`` gives a chunk id's object name for the
    index."""
    entries: list[tuple[str, int, int]] = []
    offset = 0
    for chunk_id, blob in blobs:
        entries.append((chunk_id, offset, len(blob)))
        offset += len(blob)
    return b"".join([*(blob for _, blob in blobs), _index(entries, name_of)]), entries


def encode_pack(
    chunks: Sequence[tuple[str, Payload]], key: bytes | None, *, name_of: Callable[[str], str]
) -> tuple[bytearray, list[tuple[str, int, int]]]:
    """The pack object of chunks ``(chunk id, payload)`` encoded with ``key`` straight
    into it (one buffer, each byte written once), and (id, offset, length) of each;
    ``name_of`` as in ``build_pack``."""
    entries: list[tuple[str, int, int]] = []
    offset = 0
    for chunk_id, payload in chunks:
        size = payload.encoded_size(key is not None)
        entries.append((chunk_id, offset, size))
        offset += size
    index = _index(entries, name_of)
    out = bytearray(offset + len(index))
    with memoryview(out) as view:
        for (_, payload), (_, start, size) in zip(chunks, entries, strict=True):
            encode_into(view[start : start + size], payload, key)
        view[offset:] = index
    return out, entries


def _index(entries: Sequence[tuple[str, int, int]], name_of: Callable[[str], str]) -> bytes:
    """The index entries (by object name) and the trailer that end a pack."""
    return index_bytes([(name_of(c), off, n) for c, off, n in entries])


def index_bytes(entries: Sequence[tuple[str, int, int]], version: int = FORMAT_VERSION) -> bytes:
    """The index and trailer of a pack whose entries are (32-byte hex name, offset, length)."""
    index = b"".join(_ENTRY.pack(bytes.fromhex(c), off, n) for c, off, n in entries)
    return index + _TRAILER.pack(len(entries), crc32c(index), MAGIC, version, bytes(3))


def pack_format(data: bytes) -> int:
    """The format version in a pack object's trailer (1 or 2); ChunkCorruptError if the
    trailer is not a pack's."""
    if len(data) < _TRAILER.size:
        raise ChunkCorruptError(f"pack object of {len(data)} bytes is shorter than its trailer")
    _, _, magic, version, reserved = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if magic != MAGIC or version not in (LEGACY_FORMAT, FORMAT_VERSION) or reserved != bytes(3):
        raise ChunkCorruptError(
            f"pack trailer has magic {magic!r}, version {version}, reserved {reserved.hex()}"
        )
    return int(version)


def read_index(data: bytes) -> list[tuple[str, int, int]]:
    """(name, offset, length) of every chunk in a pack object, the name being its object
    name (format 2) or its chunk id (format 1, see ``pack_format``); ChunkCorruptError if
    its index is damaged or does not fit the object."""
    pack_format(data)
    count, crc, _, _, _ = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    start = len(data) - _TRAILER.size - count * _ENTRY.size
    if start < 0:
        raise ChunkCorruptError(f"pack index of {count} entries does not fit the object")
    index = data[start : len(data) - _TRAILER.size]
    if crc32c(index) != crc:
        raise ChunkCorruptError("pack index fails its CRC32C")
    entries = []
    for i in range(count):
        digest, offset, length = _ENTRY.unpack_from(index, i * _ENTRY.size)
        if offset + length > start:
            raise ChunkCorruptError(f"pack index entry {i} points past the chunks")
        entries.append((digest.hex(), offset, length))
    return entries


class PackIndex:
    """The pack and location rows (thread-safe: each call is its own transaction)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def begin(
        self, scope: str, chunk_ids: Sequence[str], fresh_after: datetime
    ) -> tuple[str | None, list[str]]:
        """Of ``chunk_ids``, those the scope has no location for stored after
        ``fresh_after``, and a new pack row for them (None if there are none)."""
        with self._sessions.begin() as s:
            held = located(s, scope, chunk_ids, stored_after=fresh_after)
            new = [c for c in chunk_ids if c not in held]
            if not new:
                return None, []
            pack_id = _add_row(s, scope)
        return pack_id, new

    def finish(
        self, pack_id: str, size: int, scope: str, entries: Iterable[tuple[str, int, int]]
    ) -> bool:
        """Marks the pack written and points its chunks' locations at it; False if the
        row is gone (a garbage collection took it: the chunks must be stored again)."""
        now = utcnow()
        with self._sessions.begin() as s:
            if not _mark_written(s, pack_id, size):
                return False
            rows = [
                {
                    "key_scope": scope,
                    "chunk_id": c,
                    "pack_id": pack_id,
                    "offset": o,
                    "length": n,
                    "created": now,
                }
                for c, o, n in entries
            ]
            stmt = upsert_insert(s.get_bind().dialect.name)(ChunkLocation).values(rows)
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=[ChunkLocation.key_scope, ChunkLocation.chunk_id],
                    set_={
                        "pack_id": stmt.excluded.pack_id,
                        "offset": stmt.excluded.offset,
                        "length": stmt.excluded.length,
                        "created": stmt.excluded.created,
                    },
                )
            )
        return True

    def abandon(self, pack_id: str) -> None:
        """Deletes the row of a pack whose object could not be written (it has no
        locations yet); a partly written object is left to garbage collection."""
        with self._sessions.begin() as s:
            s.execute(
                delete(ChunkPack).where(ChunkPack.id == pack_id, ChunkPack.written.is_(False))
            )

    def new_row(self, scope: str) -> str:
        """A new pack row (not written) for a rewrite; its id."""
        with self._sessions.begin() as s:
            return _add_row(s, scope)

    def move(
        self, old: str, new: str, size: int, scope: str, entries: Iterable[tuple[str, int, int]]
    ) -> list[str] | None:
        """Marks the rewritten pack ``new`` written and points those of its chunks whose
        locations are still in ``old`` at it; the ids moved. None if ``new``'s row is gone
        (a collection took it before this: the rewrite is abandoned)."""
        moved: list[str] = []
        with self._sessions.begin() as s:
            if not _mark_written(s, new, size):
                return None
            for chunk_id, offset, length in entries:
                done = s.execute(
                    update(ChunkLocation)
                    .where(
                        ChunkLocation.key_scope == scope,
                        ChunkLocation.chunk_id == chunk_id,
                        ChunkLocation.pack_id == old,
                    )
                    .values(pack_id=new, offset=offset, length=length)
                    .execution_options(synchronize_session=False)
                )
                if done.rowcount:  # type: ignore[attr-defined]
                    moved.append(chunk_id)
        return moved

    def locate(self, scope: str, chunk_id: str) -> Location | None:
        """Where the scope's chunk is packed; None if it is not (a loose object, or none)."""
        with self._sessions() as s:
            row = s.execute(_LOCATE, {"scope": scope, "chunk": chunk_id}).one_or_none()
        return None if row is None else Location(row[0], int(row[1]), int(row[2]))

    def contents(self, scope: str, before: datetime) -> list[PackContents]:
        """The scope's packs made before ``before``, each with its chunks that have
        locations (ordered by offset)."""
        pack = ChunkPack.__table__.c
        out: dict[str, PackContents] = {}
        with self._sessions() as s:
            rows = s.execute(
                select(pack.id, pack.size, pack.written, _LOC.chunk_id, _LOC.offset, _LOC.length)
                .outerjoin(ChunkLocation.__table__, _LOC.pack_id == pack.id)
                .where(pack.key_scope == scope, pack.created < before)
                .order_by(pack.id, _LOC.offset)
            )
            for pack_id, size, written, chunk_id, offset, length in rows:
                entry = out.setdefault(
                    str(pack_id), PackContents(str(pack_id), int(size), bool(written), [])
                )
                if chunk_id is not None:
                    entry.chunks.append((str(chunk_id), int(offset), int(length)))
        return list(out.values())

    def count(self) -> int:
        """How many pack rows there are."""
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(ChunkPack)) or 0)

    def pack_scopes(self) -> list[str]:
        """Every key scope that has pack rows."""
        with self._sessions() as s:
            return list(
                s.scalars(select(ChunkPack.key_scope).distinct().order_by(ChunkPack.key_scope))
            )

    def known_packs(self, pack_ids: Sequence[str]) -> set[str]:
        """Which of ``pack_ids`` have rows."""
        out: set[str] = set()
        with self._sessions() as s:
            for i in range(0, len(pack_ids), _IN_BATCH):
                batch = pack_ids[i : i + _IN_BATCH]
                out.update(s.scalars(select(ChunkPack.id).where(ChunkPack.id.in_(batch))))
        return out

    def stale_locations(self, scope: str, before: datetime) -> list[str]:
        """Chunk ids of the scope's locations stored before ``before``."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(ChunkLocation.chunk_id).where(
                        ChunkLocation.key_scope == scope, ChunkLocation.created < before
                    )
                )
            )


def _add_row(s: Session, scope: str) -> str:
    """Adds a new, not yet written pack row of ``scope``; its id."""
    pack_id = new_pack_id()
    s.add(ChunkPack(id=pack_id, key_scope=scope, size=0, written=False, created=utcnow()))
    return pack_id


def _mark_written(s: Session, pack_id: str, size: int) -> bool:
    """Marks a pack row written with its object's size; False if the row is gone."""
    marked = s.execute(
        update(ChunkPack)
        .where(ChunkPack.id == pack_id)
        .values(written=True, size=size)
        .execution_options(synchronize_session=False)
    )
    return bool(marked.rowcount)  # type: ignore[attr-defined]


_LOC = ChunkLocation.__table__.c
_LOCATE = select(_LOC.pack_id, _LOC.offset, _LOC.length).where(
    _LOC.key_scope == bindparam("scope"), _LOC.chunk_id == bindparam("chunk")
)


def located(
    s: Session, scope: str, chunk_ids: Sequence[str], *, stored_after: datetime | None = None
) -> set[str]:
    """Which of ``chunk_ids`` have a location in the scope (stored after ``stored_after``)."""
    out: set[str] = set()
    for i in range(0, len(chunk_ids), _IN_BATCH):
        batch = list(chunk_ids[i : i + _IN_BATCH])
        query = select(_LOC.chunk_id).where(_LOC.key_scope == scope, _LOC.chunk_id.in_(batch))
        if stored_after is not None:
            query = query.where(_LOC.created >= stored_after)
        out.update(s.scalars(query))
    return out


__all__ = [
    "PACKS_PREFIX",
    "Location",
    "PackIndex",
    "build_pack",
    "index_bytes",
    "located",
    "new_pack_id",
    "pack_format",
    "pack_key",
    "read_index",
]
