"""Garbage collection of chunk objects that no volume or snapshot map references any more.

A pass (``collect``) first sweeps map segments no map names (``sweep_segments``), then
walks the store's chunk objects one key scope at a time (keys are
``chunks/<scope>/k/<name[:2]>/<name>``, and ``chunks/<scope>/<id[:2]>/<id>`` for objects
stored before keyed names, so a sorted listing groups them by scope) and compares them
with the chunks the maps *of that scope* reference: an object named by a keyed hash
(``KeyRing.object_name``) with the names of the referenced chunk ids, an object named by
its chunk id with the ids. The same content stored under two scopes is two objects, and
each is judged by its own scope's maps.

An object is deleted only if it is unreferenced and older than the grace period. Safety
against writers running at the same time does not rest on the grace period: every
deletion happens inside ``ChunkMaps.delete_unreferenced_chunks``, which locks every map
of the scope and re-reads its references first, while commits check that their chunks
exist with their map locked (see ``service``). So a map never names a missing chunk, even
with a grace of zero. A pass that deletes anything of a scope first bumps the scope's GC
generation in that same transaction: a provider skips asking the store about chunks it
put itself only while the generation it read before the put is unchanged. The grace
period spares what an upload sent but has not committed
yet: without it such a commit is refused (400 ``missing_chunks``) and the client uploads
again, which is correct but wasteful.

"Older" is the object's last write time as the store reports it (file mtime, S3
LastModified) against this machine's clock; the grace period must exceed the clock skew
between the two, and the longest time a client takes from uploading a chunk to committing
it. A chunk uploaded again while it is old is rewritten, which renews its time
(``service.REFRESH_AGE``).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import OperationalError

from sgw.common.errors import ObjectStoreError
from sgw.provider.blockstore.keys import KeyRing
from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.blockstore.objects import ObjectInfo, ObjectStore
from sgw.provider.blockstore.packs import PACKS_PREFIX, build_pack, is_sparse, pack_key
from sgw.provider.blockstore.service import (
    CHUNKS_PREFIX,
    chunk_key,
    is_intact,
    legacy_chunk_key,
    parse_chunk_key,
)

__all__ = ["DEFAULT_GRACE_SECONDS", "GcReport", "collect"]

LOG = logging.getLogger(__name__)

# Seconds an unreferenced chunk object is kept after its last write. A gateway commits a
# destage batch seconds to minutes after uploading it; a day also covers a first full
# upload of a large volume on a slow link, clock skew and a provider that was down.
DEFAULT_GRACE_SECONDS = 24 * 3600.0
# Candidates deleted per locked transaction: the scope's writers wait for one batch, so
# it must be quick even on S3 (one request per delete), and each batch re-reads the scope's
# references once.
DELETE_BATCH = 500

_PACK_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class GcReport:
    """What one pass found and did (counts of chunk objects unless said otherwise)."""

    dry_run: bool = False
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    segments_swept: int = 0  # map segment rows (not objects) no map named
    scopes: int = 0
    objects: int = 0
    referenced: int = 0
    young: int = 0  # unreferenced but within the grace period: kept
    rescued: int = 0  # unreferenced at the listing, referenced at the locked re-check
    deleted: int = 0  # in a dry run: would be deleted
    bytes_deleted: int = 0
    foreign: int = 0  # objects under chunks/ and packs/ that are not ours: left alone
    locations_deleted: int = 0  # packed chunks no map references (in a dry run: would be)
    packs: int = 0  # pack rows at the start of the pass
    packs_deleted: int = 0  # packs with no referenced chunk left (in a dry run: would be)
    pack_bytes_deleted: int = 0
    orphan_packs: int = 0  # pack objects without a row (an upload cut short): deleted
    packs_rewritten: int = 0  # less than half live: live chunks copied to a new pack
    pack_bytes_freed: int = 0  # by those rewrites, once their old packs go (next pass)
    errors: int = 0  # deletes or scopes that failed (logged); the next pass retries
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people and logs."""
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"gc{' (dry run)' if self.dry_run else ''}: {verb} {self.deleted} of "
            f"{self.objects} chunk objects ({self.bytes_deleted} bytes) in {self.scopes} key "
            f"scopes; kept {self.referenced} referenced, {self.young} within the "
            f"{self.grace_seconds:g} s grace period, {self.rescued} referenced meanwhile; "
            f"packs: {verb} {self.locations_deleted} unreferenced packed chunks' locations "
            f"and {self.packs_deleted} of {self.packs} pack objects ({self.pack_bytes_deleted} "
            f"bytes), {self.orphan_packs} orphaned packs, rewrote {self.packs_rewritten} sparse "
            f"packs ({self.pack_bytes_freed} bytes to free); "
            f"{self.foreign} foreign objects, {self.segments_swept} map segments swept, "
            f"{self.errors} errors, {self.seconds:.1f} s"
        )


def collect(
    maps: ChunkMaps,
    store: ObjectStore,
    keys: KeyRing,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> GcReport:
    """One garbage collection pass over ``store``; what it did.

    Safe to run while the provider serves (and in several processes at once). ``dry_run``
    deletes nothing, sweeps no segments and reports what a pass would delete now.
    ``clock`` (POSIX seconds) is what object times are compared with. ``keys`` names the
    objects of referenced chunks (the provider's master key).
    """
    if grace_seconds < 0:
        raise ValueError(f"grace period {grace_seconds} s: give 0 or more seconds")
    started = time.monotonic()
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    if not dry_run:
        report.segments_swept = maps.sweep_segments()
    # Objects written after this instant are spared whatever the listing finds later.
    cutoff = clock() - grace_seconds
    for scope, infos in itertools.groupby(_chunk_objects(store, report), key=lambda p: p[0]):
        report.scopes += 1
        try:
            _collect_scope(maps, store, keys, scope, infos, cutoff=cutoff, report=report)
        except OperationalError as e:  # e.g. a PostgreSQL deadlock victim: next pass
            report.errors += 1
            LOG.warning("gc skipped the rest of a key scope: %s", e, extra={"scope": scope})
    _collect_packs(maps, store, keys, cutoff=cutoff, report=report)
    report.seconds = time.monotonic() - started
    LOG.info(report.summary())
    return report


def _collect_scope(
    maps: ChunkMaps,
    store: ObjectStore,
    keys: KeyRing,
    scope: str,
    infos: Iterator[tuple[str, str, ObjectInfo]],
    *,
    cutoff: float,
    report: GcReport,
) -> None:
    # A prefilter only: the locked re-check in delete_unreferenced_chunks decides. An
    # object's key is compared with both keys a referenced chunk may be stored under.
    def keys_of(chunk_id: str) -> tuple[str, str]:
        return (chunk_key(keys, scope, chunk_id), legacy_chunk_key(scope, chunk_id))

    referenced = {k for c in maps.referenced_chunk_ids(scope) for k in keys_of(c)}
    candidates: dict[str, int] = {}
    for _, key, info in infos:
        if key in referenced:
            report.referenced += 1
        elif info.modified > cutoff:
            report.young += 1
        else:
            candidates[key] = info.size
            if len(candidates) >= DELETE_BATCH:
                _delete(maps, store, scope, candidates, report, keys_of=keys_of)
                candidates = {}
    _delete(maps, store, scope, candidates, report, keys_of=keys_of)


def _delete(
    maps: ChunkMaps,
    store: ObjectStore,
    scope: str,
    candidates: dict[str, int],
    report: GcReport,
    *,
    keys_of: Callable[[str], tuple[str, str]],
) -> None:
    if not candidates:
        return
    if report.dry_run:
        report.deleted += len(candidates)
        report.bytes_deleted += sum(candidates.values())
        return
    failed: list[str] = []

    def delete(key: str) -> None:
        try:
            store.delete(key)
        except ObjectStoreError as e:
            failed.append(key)
            LOG.warning("gc could not delete a chunk: %s", e, extra={"scope": scope})

    called = maps.delete_unreferenced_chunks(scope, candidates, delete, names_of=keys_of)
    not_deleted = set(failed)
    deleted = [c for c in called if c not in not_deleted]
    report.deleted += len(deleted)
    report.bytes_deleted += sum(candidates[c] for c in deleted)
    report.rescued += len(candidates) - len(called)
    report.errors += len(failed)
    if len(called) < len(candidates):
        LOG.info(
            "gc spared chunks committed while it ran",
            extra={"scope": scope, "chunks": len(candidates) - len(called)},
        )


def _collect_packs(
    maps: ChunkMaps, store: ObjectStore, keys: KeyRing, *, cutoff: float, report: GcReport
) -> None:
    """Packed chunks: drops the locations of unreferenced chunks stored before the
    cutoff, then deletes the packs left without any (row first, then object: see
    ``packs``), then pack objects that have no row at all."""
    before = datetime.fromtimestamp(cutoff, UTC)
    report.packs = maps.packs.count()
    for scope in maps.packs.pack_scopes():
        try:
            referenced = set(maps.referenced_chunk_ids(scope))  # a prefilter, as above
            stale = [c for c in maps.packs.stale_locations(scope, before) if c not in referenced]
            if report.dry_run:
                report.locations_deleted += len(stale)
                _dry_run_packs(maps, scope, before, set(stale), report)
                continue
            for i in range(0, len(stale), DELETE_BATCH):
                batch = stale[i : i + DELETE_BATCH]
                report.locations_deleted += len(maps.delete_unreferenced_locations(scope, batch))
            for pack_id, size in maps.delete_empty_packs(scope, before):
                try:
                    store.delete(pack_key(scope, pack_id))
                except ObjectStoreError as e:  # an orphan now: a later pass deletes it
                    report.errors += 1
                    LOG.warning("gc could not delete a pack: %s", e, extra={"scope": scope})
                    continue
                report.packs_deleted += 1
                report.pack_bytes_deleted += size
            _rewrite_sparse_packs(maps, store, keys, scope, before, report=report)
        except OperationalError as e:
            report.errors += 1
            LOG.warning("gc skipped a key scope's packs: %s", e, extra={"scope": scope})
    _sweep_orphan_packs(maps, store, cutoff=cutoff, report=report)


def _dry_run_packs(
    maps: ChunkMaps, scope: str, before: datetime, stale: set[str], report: GcReport
) -> None:
    """What a pass would do to the scope's packs once the ``stale`` locations went."""
    for pack in maps.packs.contents(scope, before):
        live = sum(n for c, _, n in pack.chunks if c not in stale)
        if not any(c not in stale for c, _, _ in pack.chunks):
            report.packs_deleted += 1
            report.pack_bytes_deleted += pack.size
        elif is_sparse(pack.size, live):
            report.packs_rewritten += 1
            report.pack_bytes_freed += pack.size - live


def _rewrite_sparse_packs(
    maps: ChunkMaps,
    store: ObjectStore,
    keys: KeyRing,
    scope: str,
    before: datetime,
    *,
    report: GcReport,
) -> None:
    """Copies the live chunks of packs that are less than half live into a new pack
    each and moves their locations there; the old pack, left without locations, goes in
    a later pass (``delete_empty_packs``), so a reader that looked a location up just
    before still finds its bytes meanwhile (and one that does not looks again)."""
    for sparse in maps.packs.contents(scope, before):
        if not (sparse.written and is_sparse(sparse.size, sum(n for _, _, n in sparse.chunks))):
            continue
        try:
            data = store.get(pack_key(scope, sparse.id))
        except ObjectStoreError as e:
            report.errors += 1
            LOG.error("gc cannot read a pack to rewrite it: %s", e, extra={"scope": scope})
            continue
        blobs = [(c, data[o : o + n]) for c, o, n in sparse.chunks]
        damaged = [c for c, blob in blobs if not is_intact(blob)]
        if damaged:  # copying would hide it: keep the pack and say so
            report.errors += 1
            LOG.error(
                "gc found damaged chunks in a pack; not rewriting it",
                extra={"scope": scope, "pack": sparse.id, "chunks": damaged[:10]},
            )
            continue
        obj, entries = build_pack(blobs, name_of=lambda c: keys.object_name(scope, c))
        new_id = maps.packs.new_row(scope)
        try:
            store.put(pack_key(scope, new_id), obj, durable=True)
        except ObjectStoreError as e:
            maps.packs.abandon(new_id)
            report.errors += 1
            LOG.warning("gc could not write a rewritten pack: %s", e, extra={"scope": scope})
            continue
        if maps.packs.move(sparse.id, new_id, len(obj), scope, entries) is None:
            continue  # its row was collected meanwhile: the object is an orphan now
        report.packs_rewritten += 1
        report.pack_bytes_freed += sparse.size - len(obj)


def _sweep_orphan_packs(
    maps: ChunkMaps, store: ObjectStore, *, cutoff: float, report: GcReport
) -> None:
    """Deletes pack objects older than the cutoff that have no row. A row is made before
    its object is written and never made again, so such an object is garbage: an upload
    that died before it finished, or one whose row a collection took meanwhile."""
    batch: list[ObjectInfo] = []

    def sweep() -> None:
        rows = maps.packs.known_packs([info.key.rsplit("/", 1)[1] for info in batch])
        for info in batch:
            if info.key.rsplit("/", 1)[1] in rows:
                continue
            report.orphan_packs += 1
            report.pack_bytes_deleted += info.size
            if report.dry_run:
                continue
            try:
                store.delete(info.key)
            except ObjectStoreError as e:
                report.errors += 1
                LOG.warning("gc could not delete an orphaned pack: %s", e)
        batch.clear()

    for info in store.list_with_times(PACKS_PREFIX):
        parts = info.key.split("/")
        if len(parts) != 3 or not _PACK_ID.fullmatch(parts[2]):
            report.foreign += 1
            continue
        if info.modified <= cutoff:
            batch.append(info)
            if len(batch) >= DELETE_BATCH:
                sweep()
    sweep()


def _chunk_objects(store: ObjectStore, report: GcReport) -> Iterator[tuple[str, str, ObjectInfo]]:
    """(scope, object key, info) of every chunk object, keyed or legacy name, grouped by
    scope (sorted keys)."""
    for info in store.list_with_times(CHUNKS_PREFIX):
        scope = parse_chunk_key(info.key)
        if scope is None:
            report.foreign += 1
            continue
        report.objects += 1
        yield scope, info.key, info
