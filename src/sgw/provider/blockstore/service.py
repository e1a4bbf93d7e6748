"""The block service: what the block API (docs/block-api.md) does, between HTTP and storage.

It checks every request completely before it stores anything (a refused request stores
nothing), keeps chunk objects and chunk maps consistent (a map only ever names chunks the
store holds: upload first, then commit) and turns the repository's ``ValueError`` into
``BadRequestError``, so each client mistake reaches HTTP as a 4xx naming the fix.

Chunk objects live under ``chunks/<key scope>/k/<name[:2]>/<name>``, encoded by
``sgw.common.chunks`` and encrypted with the scope's key (``KeyRing``). The name is the
chunk id's keyed hash (``KeyRing.object_name``), never the id itself: a chunk id is the
plaintext's SHA-256, so a listing of ids would tell a bucket reader whether content it
knows is stored (docs/adr/0009-object-names-and-customer-keys.md). Objects stored before
are named by the id (``chunks/<key scope>/<id[:2]>/<id>``, ``legacy_chunk_key``): reads,
commits and garbage collection still find them, and ``sgw provider migrate-object-names``
renames them. Chunks uploaded
in a chunk pack (``put_chunk_pack``) are byte ranges of one pack object instead, found
through their locations (``packs``). Pack objects are durable when the request is
answered, so a commit accepts a chunk with a location without asking the store; the
rest of this docstring is about loose chunk objects. Putting a chunk
that is already there stores nothing (it is only rewritten when it is old, which renews
its time against garbage collection's grace period), so uploads are idempotent and may
run in parallel.

Durability. A chunk upload is answered before its object is durable (the directory store
does not fsync it then); the commit that names chunks first makes them durable and checks
that each is whole (``ObjectStore.sync``, inside the commit's transaction), so a committed
map never names a chunk that a power loss could still take, or took part of. A damaged
one is refused like a missing one (400 ``missing_chunks``), and uploading it again
replaces it. A chunk body sent as one zstd frame that declares its size is stored as that
frame (after inflating it to check the SHA-256), not compressed a second time.

Garbage collection (``gc``) may delete a chunk that no map references at any moment, also
one uploaded a moment ago whose commit has not come yet (a grace period makes that rare,
not impossible). So a commit checks that its chunks exist *inside* its transaction, with
the volume locked, where the collector cannot delete them unseen (see
``ChunkMaps.delete_unreferenced_chunks``): a map never names a missing chunk, and a
commit whose chunks were collected is refused (400 ``missing_chunks``) for the client
to upload them again.

Which chunks a volume may read (``get_chunk``): any chunk stored in the volume's key
scope, not only those its current map names. A reader holding map version N must still
get its chunks after version N+1 replaced them (until garbage collection), checking
membership would mean decoding the whole map on every read, and a chunk id is the
SHA-256 of the content, so knowing one means already knowing the data. Scopes never
cross accounts (volumes are made only from the account's own snapshots); if snapshots are
ever shared between accounts, a volume made from a shared snapshot must get a scope of
its own, or the other account could test which content the original volume holds.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import zstandard

from sgw.common.chunk_packs import decode_pack
from sgw.common.chunks import (
    BytesLike,
    check_chunk,
    decode_chunk,
    encode_chunk,
    inflate_frame,
    is_zero,
    prepare_payload,
)
from sgw.common.chunks import chunk_id as sha256_id
from sgw.common.errors import (
    BadRequestError,
    ChecksumMismatchError,
    ChunkCorruptError,
    ChunkError,
    MissingChunksError,
    NotFoundError,
    ObjectNotFoundError,
    ObjectStoreError,
    PayloadTooLargeError,
    StoredChunkError,
)
from sgw.provider.blockstore.keys import KeyRing
from sgw.provider.blockstore.maps import (
    DEFAULT_CHUNK_SIZE,
    ChunkMaps,
    SnapshotInfo,
    SnapshotStateError,
    SnapshotStatus,
    VolumeInfo,
    VolumeMode,
)
from sgw.provider.blockstore.objects import ObjectStore
from sgw.provider.blockstore.packs import Location, encode_pack, pack_key
from sgw.provider.db.models import utcnow

LOG = logging.getLogger(__name__)

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"-?[0-9]{1,20}")
# Longest page of a block listing: large enough that a 1 TiB volume lists in ~100 calls
# at 1 MiB chunks, small enough that one answer stays around a megabyte of JSON.
MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
# Parallel existence checks of one commit's chunks: one S3 HEAD costs a round trip each.
_EXISTS_WORKERS = 16
# Slack on top of zstd's worst-case expansion (ZSTD_compressBound) for frame headers,
# checksums and a few concatenated frames (bytes).
_ZSTD_FRAMING = 4096
# Missing chunk ids named in a refused commit's message (all are in the error's field).
_MISSING_NAMED = 10
# A chunk put again is rewritten if its object is older than this (seconds): that renews
# its time, so an upload that reuses old, unreferenced content gets the whole grace
# period of garbage collection (``gc.DEFAULT_GRACE_SECONDS``, far longer) before its
# commit. Rewriting costs one object write per such chunk and hour at most.
REFRESH_AGE = 3600.0
# Tries of a block put whose chunk garbage collection removed between store and record
# (and of a chunk pack whose row it removed before the pack was finished).
_PUT_BLOCK_TRIES = 3
# Most bytes of chunk data in one chunk pack request (their plaintext, summed): also the
# most zstd output one pack request may make the provider inflate, hash and compress.
MAX_PACK_DATA = 64 << 20
# The window a zstd frame of a chunk body may need (bytes): the chunk size rounded up to
# a power of two, at least zstd's level-19 streaming window (8 MiB, for clients that
# compress without declaring the size), at most MAX_CHUNK_SIZE's.
_MIN_WINDOW = 8 << 20
_MAX_WINDOW = 64 << 20
# Packed chunk locations cached per process.
_LOCATIONS_MAX = 1 << 18


CHUNKS_PREFIX = "chunks/"
# The folder of keyed names inside a scope's folder: not two hex digits, so no legacy key
# (``legacy_chunk_key``) looks like one.
NAMED_FOLDER = "k"


def chunk_key(keys: KeyRing, scope: str, chunk_id: str) -> str:
    """The object key of a chunk in the store: under its keyed name."""
    return named_key(scope, keys.object_name(scope, chunk_id))


def named_key(scope: str, name: str) -> str:
    """The object key of the chunk object named ``name`` (``KeyRing.object_name``)."""
    return f"{CHUNKS_PREFIX}{scope}/{NAMED_FOLDER}/{name[:2]}/{name}"


def legacy_chunk_key(scope: str, chunk_id: str) -> str:
    """Where a chunk object stored before keyed names is: under its chunk id."""
    return f"{CHUNKS_PREFIX}{scope}/{chunk_id[:2]}/{chunk_id}"


def parse_chunk_key(key: str) -> str | None:
    """The scope of a chunk object's key (keyed or legacy name); None if ``key`` is not
    one."""
    parts = key.split("/")
    if len(parts) == 5 and parts[2] == NAMED_FOLDER and _CHUNK_ID.fullmatch(parts[4]):
        return parts[1] if named_key(parts[1], parts[4]) == key else None
    if len(parts) == 4 and _CHUNK_ID.fullmatch(parts[3]):
        return parts[1] if legacy_chunk_key(parts[1], parts[3]) == key else None
    return None


def check_chunk_id(value: str, what: str) -> str:
    """``value`` if it is a chunk id (64 lowercase hex digits), else BadRequestError."""
    if not _CHUNK_ID.fullmatch(value):
        raise BadRequestError(
            f"{what} {value[:80]!r} is not a chunk id: give the lowercase hex SHA-256 of the "
            "chunk's plaintext (64 characters)"
        )
    return value


@dataclass(frozen=True, slots=True)
class PackStored:
    """What a chunk pack request did: the chunks it stored and those already held."""

    stored: list[str]
    present: list[str]


@dataclass(frozen=True, slots=True)
class BlockPage:
    """One page of a block listing: (index, chunk id or None for zero) and the next start."""

    blocks: list[tuple[int, str | None]]
    next: int | None


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """The repository reports a caller's bad value as ValueError: a 400 here."""
    try:
        yield
    except ValueError as e:
        raise BadRequestError(str(e)) from e


# Chunks remembered as put by this process (``BlockService._fresh``), and how long a read
# GC generation is reused for puts (seconds).
_FRESH_MAX = 1 << 16
_GENERATION_TTL = 1.0


class BlockService:
    """Volumes, chunks, commits and snapshots of the block API, for one account at a time.

    Every method takes the acting account first and treats records of other accounts as
    missing (NotFoundError). Thread-safe: each call uses its own database transactions.
    """

    def __init__(self, maps: ChunkMaps, store: ObjectStore, keys: KeyRing) -> None:
        self.maps = maps
        self.store = store
        self.keys = keys
        self._pool = ThreadPoolExecutor(_EXISTS_WORKERS, thread_name_prefix="sgw-exists")
        # Chunks this process put, with the scope's GC generation read before the put: a
        # commit that finds the generation unchanged skips asking the store (see
        # ``_require_chunks``). Bounded; generations cached per scope for a moment (any
        # value read before a put will do: an old one only makes the check ask the store).
        self._fresh: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._generations: dict[str, tuple[float, int]] = {}
        # Where packed chunks are (they move only when garbage collection deletes a pack,
        # which a read of a stale entry finds and looks again).
        self._locations: OrderedDict[tuple[str, str], Location] = OrderedDict()
        self._fresh_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # Volumes

    def create_volume(
        self,
        account: str,
        name: str,
        size: int,
        *,
        mode: VolumeMode,
        chunk_size: int | None = None,
        from_snapshot_id: str | None = None,
        gateway_id: str | None = None,
        volume_id: str | None = None,
    ) -> VolumeInfo:
        with _client_errors():
            return self.maps.create_volume(
                account,
                name,
                size,
                chunk_size=chunk_size,
                mode=mode,
                gateway_id=gateway_id,
                from_snapshot_id=from_snapshot_id,
                volume_id=volume_id,
            )

    def get_volume(self, account: str, volume_id: str) -> VolumeInfo:
        return self.maps.get_volume(account, volume_id)

    def delete_volume(self, account: str, volume_id: str) -> None:
        """Deletes the volume and its map; its chunks stay for its snapshots (GC later)."""
        self.maps.delete_volume(self.get_volume(account, volume_id).id)

    def put_chunk(
        self,
        account: str,
        volume_id: str,
        chunk_id: str,
        body: bytes,
        *,
        zstd: bool = False,
        body_sha256: str | None = None,
    ) -> bool:
        """Stores a chunk for the volume; True if it was new, False if already there.

        ``body`` is the chunk's plaintext, or with ``zstd`` its zstd compression (sent
        ``Content-Encoding: zstd``). ``chunk_id`` must be the SHA-256 of the plaintext,
        which must be at most the volume's chunk size and not all zero (zero chunks are a
        null map entry, never an object). A body that is exactly one zstd frame declaring
        its size is stored as it is after these checks, not compressed again. A body
        larger than the chunk size allows (or its zstd bound) is refused as too large.
        ``body_sha256``: the SHA-256 of ``body`` if the caller computed it already (a
        signed request's), which spares hashing a plaintext body again (a zstd body's
        plaintext is hashed whatever it says).
        """
        volume = self.get_volume(account, volume_id)
        check_chunk_id(chunk_id, "chunk id")
        data, frame = _checked_body(
            volume, chunk_id, body, zstd=zstd, body_sha256=body_sha256, what=f"chunk {chunk_id}"
        )
        return self._store_chunk(volume.key_scope, chunk_id, data, frame=frame)

    def put_chunk_pack(self, account: str, volume_id: str, body: bytes) -> PackStored:
        """Stores the chunks of a chunk pack request (``sgw.common.chunk_packs``) for the
        volume in one pack object; which were new and which the volume's scope held.

        Every chunk is checked as ``put_chunk`` checks one (and the pack holds each chunk
        once, at most ``MAX_PACK_DATA`` bytes of data in all) before anything is stored:
        a bad chunk refuses the whole request, naming it. Chunks the scope holds in a pack
        already (stored within ``REFRESH_AGE``) are not stored again.
        """
        volume = self.get_volume(account, volume_id)
        checked: list[_Checked] = []
        total = 0
        for i, chunk in enumerate(decode_pack(body)):
            what = f"chunk {i} of the pack ({chunk.id})"
            if any(chunk.id == c.id for c in checked):
                raise BadRequestError(f"{what} is in the pack twice; send each chunk once")
            # The pack's inflated total is bounded before this chunk is inflated: at most
            # MAX_PACK_DATA bytes of zstd output per request, whatever its frames claim.
            limit = min(volume.chunk_size, MAX_PACK_DATA - total)
            if limit <= 0:
                raise pack_too_large()
            try:
                data, frame = _checked_body(
                    volume, chunk.id, chunk.body, zstd=chunk.zstd, what=what, inflate_limit=limit
                )
            except PayloadTooLargeError:
                if limit < volume.chunk_size:  # the pack's bound, not the chunk's
                    raise pack_too_large() from None
                raise
            total += len(data)
            if total > MAX_PACK_DATA:
                raise pack_too_large()
            # A zstd chunk that is not one frame declaring its size was inflated: it is
            # compressed again (one frame), so a few bytes on the wire never become a
            # chunk's size in the store. A plaintext chunk is stored as sent (see below).
            checked.append(_Checked(chunk.id, data, frame, recompress=chunk.zstd and not frame))
        return self._store_pack(volume.key_scope, checked)

    def get_chunk(self, account: str, volume_id: str, chunk_id: str) -> bytes:
        """The plaintext of a chunk stored in the volume's key scope (see the module doc)."""
        volume = self.get_volume(account, volume_id)
        check_chunk_id(chunk_id, "chunk id")
        try:
            return self._read_chunk(volume.key_scope, chunk_id)
        except ObjectNotFoundError:
            raise NotFoundError(
                f"chunk {chunk_id} is not stored for volume {volume.id}; upload it with "
                f"PUT /v1/volumes/{volume.id}/chunks/{chunk_id}"
            ) from None

    def read_map(self, account: str, volume_id: str) -> tuple[int, dict[int, str]]:
        """The volume's map version and map (index -> chunk id; zero chunks absent)."""
        return self.maps.read_volume_map(self.get_volume(account, volume_id).id)

    def commit(
        self,
        account: str,
        volume_id: str,
        base_version: int,
        idempotency_key: str,
        changes: Mapping[str, str | None] | Mapping[int, str | None],
    ) -> int:
        """Applies ``changes`` (index -> chunk id or None) to the map; the new version.

        Refused before anything changes if an index is not a chunk of the volume, an id
        is malformed, or the store does not hold a named chunk (MissingChunksError,
        checked with the volume locked against garbage collection).
        """
        volume = self.get_volume(account, volume_id)
        parsed: dict[int, str | None] = {}
        for key, value in changes.items():
            index = _parse_index(key)
            if value is not None:
                check_chunk_id(value, f"change of chunk {index}: value")
            parsed[index] = value
        bad = sorted(i for i in parsed if not 0 <= i < volume.chunk_count)
        if bad:
            raise BadRequestError(
                f"volume {volume.id} has chunks 0 to {volume.chunk_count - 1} ({volume.size} "
                f"bytes in {volume.chunk_size}-byte chunks); chunk index {bad[0]} is out of range"
            )
        with _client_errors():
            return self.maps.commit_changes(
                volume.id,
                base_version,
                parsed,
                idempotency_key,
                check_chunks=lambda ids, gen: self._require_chunks(volume, ids, gen),
            )

    def snapshot_volume(
        self,
        account: str,
        volume_id: str,
        description: str | None = None,
        *,
        snapshot_id: str | None = None,
        map_version: int | None = None,
    ) -> SnapshotInfo:
        """A completed snapshot of the volume's map (see ``ChunkMaps.create_snapshot``)."""
        volume = self.get_volume(account, volume_id)
        with _client_errors():
            snapshot_id = self.maps.create_snapshot(
                volume.id, description, snapshot_id=snapshot_id, map_version=map_version
            )
        return self.maps.get_snapshot(account, snapshot_id)

    # Snapshots (block API)

    def start_snapshot(
        self,
        account: str,
        volume_size: int,
        *,
        chunk_size: int | None = None,
        parent_snapshot_id: str | None = None,
        description: str | None = None,
    ) -> SnapshotInfo:
        """A pending snapshot to put blocks into; from its parent's map if given."""
        if parent_snapshot_id is not None:
            parent = self.get_snapshot(account, parent_snapshot_id)
            chunk_size = parent.chunk_size if chunk_size is None else chunk_size
        with _client_errors():
            snapshot_id = self.maps.start_snapshot(
                account,
                volume_size,
                chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                parent_snapshot_id=parent_snapshot_id,
                description=description,
            )
        return self.maps.get_snapshot(account, snapshot_id)

    def get_snapshot(self, account: str, snapshot_id: str) -> SnapshotInfo:
        return self.maps.get_snapshot(account, snapshot_id)

    def block_length(self, snapshot: SnapshotInfo, index: int) -> int:
        """How many bytes block ``index`` of the snapshot has (the last may be shorter)."""
        if not 0 <= index < snapshot.chunk_count:
            raise BadRequestError(
                f"snapshot {snapshot.id} has blocks 0 to {snapshot.chunk_count - 1} "
                f"({snapshot.volume_size} bytes in {snapshot.chunk_size}-byte blocks); "
                f"block index {index} is out of range"
            )
        return min(snapshot.chunk_size, snapshot.volume_size - index * snapshot.chunk_size)

    def upload_length(self, snapshot: SnapshotInfo, index: int) -> int:
        """``block_length`` if the snapshot takes blocks (pending), else SnapshotStateError."""
        _check_pending(snapshot)
        return self.block_length(snapshot, index)

    def put_block(
        self, account: str, snapshot_id: str, index: int, data: bytes, sha256: str
    ) -> str | None:
        """Sets block ``index`` of a pending snapshot; its chunk id (None: all zero).

        ``data`` must be exactly the block's length and have SHA-256 ``sha256``. An
        all-zero block is recorded as zero (it may hide the parent's block) and not stored.
        """
        snapshot = self.get_snapshot(account, snapshot_id)
        length = self.upload_length(snapshot, index)
        check_chunk_id(sha256, "x-sgw-sha256")
        if len(data) != length:
            raise BadRequestError(
                f"block {index} of snapshot {snapshot.id} must be exactly {length} bytes, "
                f"got {len(data)}; send whole blocks"
            )
        _verify(data, sha256, f"block {index}")
        if is_zero(data):
            with _client_errors():
                self.maps.put_snapshot_chunks(snapshot.id, {index: None})
            return None
        for attempt in range(1, _PUT_BLOCK_TRIES + 1):
            self._store_chunk(snapshot.key_scope, sha256, data)
            try:
                with _client_errors():
                    self.maps.put_snapshot_chunks(
                        snapshot.id,
                        {index: sha256},
                        check_chunks=lambda ids, gen: self._require_chunks(snapshot, ids, gen),
                    )
                break
            except MissingChunksError:
                # Collected between store and record (it was old and unreferenced).
                if attempt == _PUT_BLOCK_TRIES:
                    raise
                LOG.info("block's chunk was collected before it was recorded; storing again")
        return sha256

    def get_block(self, account: str, snapshot_id: str, index: int) -> tuple[str, bytes]:
        """The chunk id and data of block ``index``; NotFoundError if it is all zero."""
        snapshot = self.get_snapshot(account, snapshot_id)
        self.block_length(snapshot, index)
        with _client_errors():
            chunk = self.maps.lookup(None, index, snapshot_id=snapshot.id)
        if chunk is None:
            raise NotFoundError(
                f"block {index} is not in snapshot {snapshot.id}: it reads as zeroes"
            )
        try:
            return chunk, self._read_chunk(snapshot.key_scope, chunk)
        except ObjectNotFoundError as e:
            LOG.error(
                "chunk named by a snapshot is missing from the store",
                extra={"snapshot": snapshot.id, "index": index, "chunk": chunk},
            )
            raise StoredChunkError(
                f"chunk {chunk} of block {index} of snapshot {snapshot.id} is missing from "
                "the object store; the provider's operator must restore it"
            ) from e

    def list_blocks(self, account: str, snapshot_id: str, start: int, limit: int) -> BlockPage:
        """The snapshot's non-zero blocks from index ``start``, at most ``limit``."""
        snapshot = self.get_snapshot(account, snapshot_id)
        _check_page(start, limit)
        with _client_errors():
            blocks, after = self.maps.list_snapshot_chunks(snapshot.id, start, limit)
        return BlockPage(list(blocks), after)

    def changed_blocks(
        self,
        account: str,
        snapshot_id: str,
        first_snapshot_id: str | None,
        start: int,
        limit: int,
    ) -> BlockPage:
        """Blocks that differ between ``first_snapshot_id`` (or nothing) and the snapshot,
        from index ``start``, at most ``limit``; the chunk id is None where it became zero."""
        snapshot = self.get_snapshot(account, snapshot_id)
        if first_snapshot_id is not None:
            self.get_snapshot(account, first_snapshot_id)
        _check_page(start, limit)
        with _client_errors():
            changed = self.maps.list_changed_chunks(first_snapshot_id, snapshot.id)
        rest = [item for item in changed if item[0] >= start]
        after = rest[limit][0] if len(rest) > limit else None
        return BlockPage(rest[:limit], after)

    def complete_snapshot(self, account: str, snapshot_id: str) -> SnapshotInfo:
        """Makes a pending snapshot immutable; completing it again is harmless."""
        snapshot = self.get_snapshot(account, snapshot_id)
        self.maps.complete_snapshot(snapshot.id)
        return self.maps.get_snapshot(account, snapshot.id)

    def delete_snapshot(self, account: str, snapshot_id: str) -> None:
        self.maps.delete_snapshot(self.get_snapshot(account, snapshot_id).id)

    # Chunk objects

    def _store_chunk(
        self, scope: str, chunk_id: str, data: BytesLike, *, frame: BytesLike | None = None
    ) -> bool:
        """Stores the chunk unless an intact copy is there; True if none was. An old copy
        is rewritten (see REFRESH_AGE) but still counts as there.

        A new object is put without waiting for it to be durable: the commit that names it
        makes it so (``_require_chunks``). Replacing an object (an old or a damaged copy)
        is durable at once, since a committed map may name it already.
        """
        key = chunk_key(self.keys, scope, chunk_id)
        generation = self._generation(scope)  # read before the put
        put_new = getattr(self.store, "put_new", None)
        if put_new is not None:  # one request where the store can (S3): no look first
            blob = encode_chunk(data, self.keys.key(scope), frame=frame)
            if put_new(key, blob):
                self._put_fresh(scope, chunk_id, generation)
                LOG.debug("chunk stored", extra={"scope": scope, "chunk": chunk_id})
                return True
        info = self.store.stat(key)
        damaged = False
        if info is not None and time.time() - info.modified < REFRESH_AGE:
            damaged = bool(self.store.sync([key], check=is_intact))
            if not damaged:
                return False
            LOG.warning(
                "stored chunk is damaged; replacing it", extra={"scope": scope, "chunk": chunk_id}
            )
        blob = encode_chunk(data, self.keys.key(scope), frame=frame)
        self.store.put(key, blob, durable=info is not None)
        self._put_fresh(scope, chunk_id, generation)
        LOG.debug(
            "chunk stored" if info is None else "chunk rewritten",
            extra={"scope": scope, "chunk": chunk_id, "bytes": len(data)},
        )
        return info is None or damaged

    def _store_pack(self, scope: str, chunks: list[_Checked]) -> PackStored:
        """Stores checked chunks of a scope in one pack object, leaving out those packed
        there recently (see ``packs``)."""
        ids = [c.id for c in chunks]
        for attempt in range(1, _PUT_BLOCK_TRIES + 1):
            fresh_after = utcnow() - timedelta(seconds=REFRESH_AGE)
            pack_id, new = self.maps.packs.begin(scope, ids, fresh_after)
            if pack_id is None:
                return PackStored(stored=[], present=ids)
            wanted = set(new)
            # A chunk sent as plaintext is stored as such: the gateway sends every chunk
            # that compresses as zstd, so trying again would only cost CPU.
            payloads = [
                (c.id, prepare_payload(c.data, frame=c.frame, compress=c.recompress))
                for c in chunks
                if c.id in wanted
            ]
            obj, entries = encode_pack(
                payloads,
                self.keys.key(scope),
                name_of=lambda c: self.keys.object_name(scope, c),
            )
            try:
                self.store.put(pack_key(scope, pack_id), obj, durable=True)
            except BaseException:
                with contextlib.suppress(Exception):  # else garbage collection takes it
                    self.maps.packs.abandon(pack_id)
                raise
            if self.maps.packs.finish(pack_id, len(obj), scope, entries):
                with self._fresh_lock:
                    for c, offset, length in entries:
                        self._remember_location(scope, c, Location(pack_id, offset, length))
                LOG.debug(
                    "chunk pack stored",
                    extra={
                        "scope": scope,
                        "pack": pack_id,
                        "chunks": len(entries),
                        "bytes": len(obj),
                    },
                )
                return PackStored(stored=new, present=[c for c in ids if c not in wanted])
            # A collection took the row before the object was marked written (only with
            # a grace period shorter than this upload took): store the chunks again.
            LOG.info(
                "chunk pack was collected before it was finished; storing it again",
                extra={"scope": scope, "pack": pack_id, "attempt": attempt},
            )
        raise ObjectStoreError(
            f"chunk pack for key scope {scope} was collected {_PUT_BLOCK_TRIES} times before "
            "it was finished; garbage collection's grace period is too short for uploads"
        )

    def _remember_location(self, scope: str, chunk_id: str, location: Location) -> None:
        """Caches a location (call with ``_fresh_lock`` held)."""
        self._locations[(scope, chunk_id)] = location
        self._locations.move_to_end((scope, chunk_id))
        while len(self._locations) > _LOCATIONS_MAX:
            self._locations.popitem(last=False)

    def _location(self, scope: str, chunk_id: str, *, fresh: bool = False) -> Location | None:
        """Where the scope's chunk is packed (cached unless ``fresh``); None if loose."""
        if not fresh:
            with self._fresh_lock:
                cached = self._locations.get((scope, chunk_id))
            if cached is not None:
                return cached
        location = self.maps.packs.locate(scope, chunk_id)
        with self._fresh_lock:
            if location is None:
                self._locations.pop((scope, chunk_id), None)
            else:
                self._remember_location(scope, chunk_id, location)
        return location

    def _read_blob(self, scope: str, chunk_id: str) -> bytes:
        """The stored (encoded) chunk: its range of a pack, or its loose object."""
        location = self._location(scope, chunk_id)
        if location is not None:
            try:
                return self._read_range(scope, location)
            except ObjectNotFoundError:
                # The pack was collected after the lookup (the chunk was moved, or
                # unreferenced and stored again since): look again.
                location = self._location(scope, chunk_id, fresh=True)
                if location is not None:
                    return self._read_range(scope, location)
        key = chunk_key(self.keys, scope, chunk_id)
        try:
            return self.store.get(key)
        except ObjectNotFoundError:
            pass
        try:
            return self.store.get(legacy_chunk_key(scope, chunk_id))
        except ObjectNotFoundError:
            # ``migrate-object-names`` may have renamed it between the two reads.
            return self.store.get(key)

    def _read_range(self, scope: str, location: Location) -> bytes:
        return self.store.get_range(
            pack_key(scope, location.pack_id), location.offset, location.length
        )

    def _read_chunk(self, scope: str, chunk_id: str) -> bytes:
        blob = self._read_blob(scope, chunk_id)
        try:
            return decode_chunk(blob, self.keys.key(scope), expected_id=chunk_id)
        except ChunkError as e:
            LOG.error(
                "stored chunk is unreadable", extra={"scope": scope, "chunk": chunk_id, "error": e}
            )
            raise StoredChunkError(
                f"stored chunk {chunk_id} (key scope {scope}) is damaged or does not decrypt "
                f"with the provider's master key: {e}"
            ) from e

    def _generation(self, scope: str) -> int:
        now = time.monotonic()
        cached = self._generations.get(scope)
        if cached is not None and now - cached[0] < _GENERATION_TTL:
            return cached[1]
        generation = self.maps.gc_generation(scope)
        self._generations[scope] = (now, generation)
        return generation

    def _put_fresh(self, scope: str, chunk_id: str, generation: int) -> None:
        with self._fresh_lock:
            self._fresh[(scope, chunk_id)] = generation
            self._fresh.move_to_end((scope, chunk_id))
            while len(self._fresh) > _FRESH_MAX:
                self._fresh.popitem(last=False)

    def _require_chunks(
        self, owner: VolumeInfo | SnapshotInfo, chunk_ids: list[str], generation: int
    ) -> None:
        """MissingChunksError unless the store holds every one of ``chunk_ids`` in the
        key scope of ``owner`` (a volume, or a snapshot taking blocks), whole; makes them
        durable.

        ``generation`` is the scope's GC generation, read with its maps locked. A chunk
        this process put after reading that same generation is there: the collector bumps
        the generation (under the same locks) before it deletes anything of the scope, so
        the store is not asked again (a HEAD per chunk on S3)."""
        scope = owner.key_scope
        with self._fresh_lock:
            trusted = {c for c in chunk_ids if self._fresh.get((scope, c)) == generation}
        found = {c: chunk_key(self.keys, scope, c) for c in trusted}
        found.update(self._find(scope, [c for c in chunk_ids if c not in trusted]))
        missing = [c for c in chunk_ids if c not in found]
        if not missing:
            # Chunks are put without fsync; here, before a map names them, they are made
            # durable, and checked: a put cut short by a power loss leaves a damaged file.
            keys = [found[c] for c in chunk_ids]
            failed = set(self.store.sync(keys, check=is_intact))
            missing = [c for c, k in zip(chunk_ids, keys, strict=True) if k in failed]
            if missing:
                LOG.error(
                    "chunks named by a commit are damaged in the store; refusing it",
                    extra={"scope": owner.key_scope, "chunks": missing[:_MISSING_NAMED]},
                )
        if not missing:
            return
        named = ", ".join(missing[:_MISSING_NAMED])
        extra = len(missing) - _MISSING_NAMED
        more = f" and {extra} more" if extra > 0 else ""
        if isinstance(owner, VolumeInfo):
            what = f"volume {owner.id}: the commit"
            fix = (
                f"upload them with PUT /v1/volumes/{owner.id}/chunks/{{chunk_id}} and retry "
                "the commit"
            )
        else:
            what = f"snapshot {owner.id}: the block"
            fix = "put the block again"
        raise MissingChunksError(
            f"{what} names {len(missing)} chunk(s) the store does not hold intact: "
            f"{named}{more}; {fix}",
            missing,
        )

    def _find(self, scope: str, chunk_ids: list[str]) -> dict[str, str]:
        """The object key of each of ``chunk_ids`` that the store holds loose: its keyed
        name, or else its legacy name (asked only for those not under a keyed name)."""
        keyed = [chunk_key(self.keys, scope, c) for c in chunk_ids]
        found = {c: k for c, k, ok in zip(chunk_ids, keyed, self._exist(keyed), strict=True) if ok}
        rest = [c for c in chunk_ids if c not in found]
        legacy = [legacy_chunk_key(scope, c) for c in rest]
        found.update(
            (c, k) for c, k, ok in zip(rest, legacy, self._exist(legacy), strict=True) if ok
        )
        return found

    def _exist(self, keys: list[str]) -> list[bool]:
        if len(keys) <= 1:
            return [self.store.exists(k) for k in keys]
        return list(self._pool.map(self.store.exists, keys))


@dataclass(frozen=True, slots=True)
class _Checked:
    """A chunk of a pack, checked (``_checked_body``): its plaintext, the zstd frame to
    store as its payload (or None) and whether to compress the plaintext again."""

    id: str
    data: BytesLike
    frame: BytesLike | None
    recompress: bool


def _checked_body(
    volume: VolumeInfo,
    chunk_id: str,
    body: BytesLike,
    *,
    zstd: bool,
    what: str,
    body_sha256: str | None = None,
    inflate_limit: int | None = None,
) -> tuple[BytesLike, BytesLike | None]:
    """A chunk body checked for the volume: its plaintext, and the body itself if that is
    one zstd frame declaring its size (stored as sent); see ``BlockService.put_chunk``.

    A zstd body inflates to at most ``inflate_limit`` bytes (default: the chunk size),
    however many frames it holds and whatever they declare; past it, PayloadTooLargeError.
    """
    if len(body) > (zstd_bound(volume.chunk_size) if zstd else volume.chunk_size):
        raise body_too_large(what, volume.chunk_size)
    limit = volume.chunk_size if inflate_limit is None else inflate_limit
    frame: BytesLike | None = None
    data = body
    if zstd:
        inflated = inflate_frame(body, limit)
        if inflated is None:
            data = inflate_body(body, limit, what)
        else:
            data, frame = inflated, body
    if len(data) > volume.chunk_size:
        raise BadRequestError(
            f"{what} has {len(data)} bytes, more than volume {volume.id}'s chunk size of "
            f"{volume.chunk_size}; split the data into chunks"
        )
    if not zstd and body_sha256 is not None:  # the body is the plaintext
        _check_digest(body_sha256, chunk_id, what)
    else:
        _check_digest(sha256_id(data), chunk_id, what)
    if is_zero(data):
        raise BadRequestError(
            f"{what} is all zero; zero chunks are not stored: commit null for its index instead"
        )
    return data, frame


def inflate_body(body: BytesLike, limit: int, what: str) -> bytes:
    """Decompresses a ``Content-Encoding: zstd`` body (one or more frames), refusing more
    than ``limit`` bytes of output (PayloadTooLargeError) and invalid zstd (400)."""
    out = bytearray()
    try:
        # The window a frame may ask for is capped too: a frame that declares no content
        # size makes the decoder allocate its window, up to 128 MiB by zstd's default.
        window = max(_MIN_WINDOW, 1 << max(limit - 1, 1).bit_length())
        decompressor = zstandard.ZstdDecompressor(max_window_size=min(window, _MAX_WINDOW))
        reader = decompressor.stream_reader(body, read_across_frames=True)
        with reader:
            while piece := reader.read(limit + 1 - len(out)):
                out += piece
                if len(out) > limit:
                    raise PayloadTooLargeError(
                        f"{what} is larger than {limit} bytes, the most this call accepts "
                        "(the chunk size); send at most one chunk of data"
                    )
    except zstandard.ZstdError as e:
        raise BadRequestError(
            f"{what}: the body is sent with Content-Encoding zstd but is not valid zstd ({e}); "
            "compress it with zstd or drop the header"
        ) from e
    return bytes(out)


def is_intact(blob: bytes) -> bool:
    """True if a stored chunk's structure and checksum are whole (no key needed)."""
    try:
        check_chunk(blob)
    except ChunkCorruptError:
        return False
    return True


def zstd_bound(size: int) -> int:
    """The most bytes a zstd stream of ``size`` bytes of data may take (with framing)."""
    small = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + small + _ZSTD_FRAMING


def pack_too_large() -> PayloadTooLargeError:
    """The refusal of a pack whose chunks inflate past MAX_PACK_DATA (413)."""
    return PayloadTooLargeError(
        f"chunk pack holds more than {MAX_PACK_DATA} bytes of data; send fewer chunks per pack"
    )


def body_too_large(what: str, limit: int) -> PayloadTooLargeError:
    """The refusal of a body with more than ``limit`` bytes of data (413)."""
    return PayloadTooLargeError(
        f"{what} is larger than {limit} bytes, the most this call accepts (the chunk size); "
        "send at most one chunk of data"
    )


def _verify(data: bytes, expected: str, what: str) -> None:
    _check_digest(sha256_id(data), expected, what)


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise ChecksumMismatchError(
            f"{what}: the data's SHA-256 is {actual}, the request says {expected}; the upload "
            "was damaged or the checksum computed over other data: send it again"
        )


def _parse_index(key: str | int) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and _INDEX.fullmatch(key):
        return int(key)
    raise BadRequestError(
        f"change key {key!r} is not a chunk index: use the decimal index as the key"
    )


def _check_pending(snapshot: SnapshotInfo) -> None:
    if snapshot.status != SnapshotStatus.PENDING:
        raise SnapshotStateError(
            f"snapshot {snapshot.id} is {snapshot.status}; put blocks only into pending "
            "snapshots (start a new one with POST /v1/snapshots)"
        )


def _check_page(start: int, limit: int) -> None:
    if start < 0 or not 1 <= limit <= MAX_PAGE:
        raise BadRequestError(
            f"page start={start}, limit={limit}: start must be >= 0 and limit 1 to {MAX_PAGE}"
        )
