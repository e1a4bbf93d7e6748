"""The destager: moves log records to the base stores and frees log space.

One pass: read a batch of record headers in sequence order (from the tail), merge them
per volume so that only the newest version of each block is written (the index says which
record that is), hand the merged batch to the upload step (none in stored mode without a
remote store; the remote data plane plugs in here), apply it to the base stores (a kernel
copy from the log file: no payload passes through Python) and make them durable, drop the
index entries that still point into the batch, then persist the new tail and release the
space. Log space is never released before the base stores (and the upload step) have the
data. A batch ends at the first snapshot marker it meets, so the upload step sees the
volume exactly as of the marker and can have the provider snapshot that commit.

Pipelining (an upload step with ``send`` and ``finish``, the ``Uploader``): batch N+1's
chunks are built and uploaded while batch N is committed, its base stores synced and its
log space released. Batch N is copied to the stored volumes' base stores before N+1 is
built (the chunker reads them for the parts of chunks N+1 does not write); the copy is
harmless if N's commit then fails, since N stays in the log and is destaged again. A
batch that touches a cached volume (its map changes at the commit) or re-syncs a whole
volume is finished before the next one is built. Any failure ends the pipeline: the
batch in flight is dropped and destaging starts again from the tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sgw.common.errors import SgwError, VolumeStateError
from sgw.gateway.volume.cached_base import CachedBaseStore, ChunkMapUpdate
from sgw.gateway.volume.engine import VolumeEngine
from sgw.gateway.volume.index import BLOCK, BLOCK_SHIFT, SMALL_ZERO_BLOCKS, zero_marker
from sgw.gateway.volume.snapshots import SnapshotState
from sgw.gateway.volume.wal import KIND_DATA, KIND_SNAPSHOT, KIND_TRIM, Record

LOG = logging.getLogger(__name__)

# Values of VolumeChanges.blocks that are not log offsets.
ZERO_KEEP = -1  # the block reads as zeroes, space stays allocated
ZERO_PUNCH = -2  # the block reads as zeroes, space may be released
# Largest run handed to one copy (bytes).
_MAX_RUN = 8 * 1024 * 1024
# After a failed batch (the provider down, a disk error) the destager waits this long,
# doubling per consecutive failure up to RETRY_MAX (seconds, with jitter): quick recovery
# from a blip, no hot loop and little log noise during an outage of hours.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
RETRY_MAX_STALLED = 2.0  # seconds, while writers wait for log space


@dataclass(slots=True)
class Run:
    """``length`` bytes at volume ``offset``: from log file offset ``source`` (>= 0), or
    zeroes (ZERO_KEEP / ZERO_PUNCH)."""

    offset: int
    length: int
    source: int


@dataclass
class VolumeChanges:
    """The merged effect of a batch on one volume; zero ranges are applied first.

    ``zero_ranges``: ``(offset, length, punch)`` of large zeroed ranges, in log order.
    ``blocks``: block number -> log file offset of its newest bytes, or ZERO_KEEP /
    ZERO_PUNCH. Only the newest version of each block is kept: a block that a newer record
    overwrote is left to that record (the log is synced before the tail moves, so that
    newer record is durable by then).
    """

    zero_ranges: list[tuple[int, int, bool]] = field(default_factory=list)
    blocks: dict[int, int] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """The blocks coalesced into runs, adjacent on the volume and in the log."""
        out: list[Run] = []
        cur: Run | None = None
        blocks = self.blocks
        for b in sorted(blocks):
            v = blocks[b]
            offset = b << BLOCK_SHIFT
            if (
                cur is not None
                and offset == cur.offset + cur.length
                and cur.length < _MAX_RUN
                and (v == cur.source + cur.length if v >= 0 else v == cur.source)
            ):
                cur.length += BLOCK
                continue
            cur = Run(offset, BLOCK, v)
            out.append(cur)
        return out


@dataclass
class Batch:
    """Records from ``records[0]`` to ``records[-1]``, merged per volume id.

    ``updates``: for cached volumes, the chunk versions the upload step committed (it put
    their data into the chunk cache); applying the batch points the volume's map at them.
    """

    records: list[Record]
    volumes: dict[int, VolumeChanges]
    updates: dict[int, ChunkMapUpdate] = field(default_factory=dict)
    # A batch without records (a re-sync of volumes changed in pass-through) is named by
    # the log position it was made at.
    at_seq: int = 0

    @property
    def first_seq(self) -> int:
        """Sequence number of the first record (or ``at_seq``)."""
        return self.records[0].seq if self.records else self.at_seq

    @property
    def last_seq(self) -> int:
        """Sequence number of the last record (or ``at_seq - 1``)."""
        return self.records[-1].seq if self.records else self.at_seq - 1

    @property
    def nbytes(self) -> int:
        """Payload bytes in the batch."""
        return sum(r.length for r in self.records if r.kind == KIND_DATA)


UploadStep = Callable[[Batch], Awaitable[None]]


class PipelinedUpload(Protocol):
    """An upload step in two halves (``Uploader``): the destager overlaps one batch's
    ``finish`` with the next one's ``send``."""

    async def send(self, batch: Batch) -> Any: ...

    async def finish(self, batch: Batch, sent: Any) -> None: ...


def merge(engine: VolumeEngine, records: list[Record], point_in_time: bool = False) -> Batch:
    """Merges records per volume (runs on the event loop, which owns the index).

    By default a block is taken from the batch only if the index says its newest version is
    there: a version that a later record overwrote is skipped (the later record carries
    the block). ``point_in_time`` keeps each block's last version within the batch
    instead, so that the merged batch is the volume exactly as of its last record: what an
    upload that ends at a snapshot marker needs.
    """
    volumes: dict[int, VolumeChanges] = {}
    for rec in records:
        vol = engine.by_id.get(rec.volume)
        if vol is None:
            continue
        changes = volumes.get(rec.volume)
        if changes is None:
            changes = volumes[rec.volume] = VolumeChanges()
        if rec.kind == KIND_SNAPSHOT:  # changes no data; its volume must be uploaded
            continue
        first, n = rec.offset >> BLOCK_SHIFT, rec.length >> BLOCK_SHIFT
        current = vol.index.blocks.get
        out = changes.blocks
        if rec.kind == KIND_DATA:
            pos = rec.payload_pos
            for b in range(first, first + n):
                if point_in_time or current(b) == pos:
                    out[b] = pos
                pos += BLOCK
        elif n <= SMALL_ZERO_BLOCKS:
            punch = rec.kind == KIND_TRIM
            marker = zero_marker(rec.virt, punch)
            value = ZERO_PUNCH if punch else ZERO_KEEP
            for b in range(first, first + n):
                if point_in_time or current(b) == marker:
                    out[b] = value
        else:
            if point_in_time:  # older versions in the batch are now zeroes
                end = first + n
                if n <= len(out):
                    for b in range(first, end):
                        out.pop(b, None)
                else:
                    for b in [b for b in out if first <= b < end]:
                        del out[b]
            changes.zero_ranges.append((rec.offset, rec.length, rec.kind == KIND_TRIM))
    return Batch(records, volumes)


class Destager:
    """Background task that keeps the write log from filling up."""

    def __init__(
        self,
        engine: VolumeEngine,
        *,
        batch_bytes: int = 32 * 1024 * 1024,
        start_fill: float = 0.5,
        idle_seconds: float = 1.0,
        upload: UploadStep | None = None,
        pass_through_after: float = 60.0,
    ) -> None:
        self.engine = engine
        self.batch_bytes = batch_bytes
        self.start_bytes = int(engine.log.data_size * start_fill)
        self.idle_seconds = idle_seconds
        self.upload = upload
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._uploading: asyncio.Future[Any] | None = None
        self.failures = 0  # consecutive failed batches
        self.last_error = ""  # why the last batch failed (while failures > 0)
        self.errors_total = 0  # failed passes since the start (the health metrics)
        self.last_append = time.monotonic()
        self.batches = 0
        self.bytes_destaged = 0
        self.batches_overlapped = 0  # sent while the batch before was being finished
        # Pass-through: uploads have failed for pass_through_after seconds while writers
        # waited for log space; stored volumes are destaged to their disks alone.
        self.pass_through_after = pass_through_after
        self.pass_through = False
        self._failing_since: float | None = None
        self._next_try = 0.0
        self._hurry_until = -1  # destage at once up to this log record (hurry())
        # Pipelining: the batch being finished in the background, and where the log's
        # next batch starts meanwhile (past it).
        self._finishing: asyncio.Task[None] | None = None
        self._cursor: tuple[int, int] | None = None  # (position, sequence number)
        # Pausing (the blue-green swap): no new batch starts; the one in flight ends.
        self._holding = False
        self._busy = False  # a batch is being destaged

    def start(self) -> None:
        """Starts the background loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="destager")

    async def stop(self) -> None:
        """Lets the current batch finish, then stops. An upload still in progress (the
        provider may be slow or down) is abandoned: its batch stays in the log."""
        self._stopping = True
        self._wake.set()
        self._stopped.set()
        if self._uploading is not None:
            self._uploading.cancel()
        if self._finishing is not None:
            self._finishing.cancel()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._finishing is not None:
            await asyncio.gather(self._finishing, return_exceptions=True)

    async def pause(self, grace: float) -> bool:
        """Stops at a safe point for the blue-green swap: no new batch starts, the one in
        flight (and a pipelined one being finished) ends within ``grace`` seconds, else it
        is abandoned as ``stop`` does (its records stay in the log). True if it ended."""
        self._holding = True
        self._wake.set()
        deadline = time.monotonic() + grace
        while (self._busy or self._finishing is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        clean = not self._busy and self._finishing is None
        await self.stop()
        return clean

    def resume(self) -> None:
        """Starts again after ``pause`` (the swap was called off)."""
        self._holding = False
        self._stopping = False
        self._stopped.clear()
        self.start()

    def kick(self) -> None:
        """Tells the destager that there may be work (cheap; call after appends)."""
        self.last_append = time.monotonic()
        log = self.engine.log
        if log.used >= self.start_bytes or log.space_waiters:
            self._wake.set()

    def kick_now(self) -> None:
        """Wakes the destager now (a snapshot marker should not wait for the log to fill)."""
        self._wake.set()

    def hurry(self) -> None:
        """Destages every record the log holds now, without waiting for it to fill or for
        writes to pause (a volume about to be deleted is drained)."""
        self._hurry_until = max(self._hurry_until, self.engine.log.next_seq - 1)
        self._wake.set()

    def _due(self) -> bool:
        if self._finishing is not None:  # a batch in flight: finish it, or start the next
            return True
        if self._holding:
            return False
        log = self.engine.log
        if log.used == 0:  # a re-sync of pass-through changes may be due
            return self.upload is not None and bool(self._dirty_volumes())
        return self._worth_destaging(log.used, log.tail_seq)

    def _worth_destaging(self, used: int, next_seq: int) -> bool:
        """Whether ``used`` bytes of log from record ``next_seq`` on should be destaged
        now (rather than left to absorb rewrites)."""
        log = self.engine.log
        if used >= self.start_bytes or log.space_waiters or self.engine.pending_snapshots():
            return True
        if next_seq <= self._hurry_until:
            return True
        return time.monotonic() - self.last_append >= self.idle_seconds

    async def _run(self) -> None:
        while not self._stopping:
            if self.pass_through and not self._holding:
                self._busy = True
                try:
                    await self._pass_through_step()
                finally:
                    self._busy = False
                continue
            if not self._due():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.1)
                continue
            try:
                self._busy = True
                try:
                    await self.destage_once()
                finally:
                    self._busy = False
                self._succeeded()
            except Exception as exc:
                delay = self._failed(exc)
                if self._should_pass_through():
                    self._enter_pass_through()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), timeout=delay)

    def _succeeded(self) -> None:
        self.failures = 0
        self.last_error = ""
        self._failing_since = None

    def _failed(self, exc: Exception) -> float:
        """Counts and logs a failed pass; returns how long to wait before the next try."""
        self.failures += 1
        self.errors_total += 1
        self.last_error = str(exc) or type(exc).__name__
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        # Writers waiting for log space want the provider's return noticed soon.
        cap = RETRY_MAX_STALLED if self.engine.log.space_waiters else RETRY_MAX
        delay: float = min(cap, RETRY_FIRST * 2.0 ** (self.failures - 1))
        delay *= random.uniform(0.5, 1.0)
        extra = {"retry_in_s": round(delay, 2), "failures": self.failures}
        if isinstance(exc, SgwError):  # expected kinds: the message says it all
            LOG.warning("destage failed: %s", exc, extra=extra)
        else:
            LOG.exception("destage failed", extra=extra)
        self._next_try = time.monotonic() + delay
        return delay

    # -- pass-through ------------------------------------------------------------------

    def _should_pass_through(self) -> bool:
        return (
            self.upload is not None
            and bool(self.engine.log.space_waiters)
            and self._failing_since is not None
            and time.monotonic() - self._failing_since >= self.pass_through_after
            and any(v.cached is None for v in self.engine.volumes.values())
        )

    def _enter_pass_through(self) -> None:
        self.pass_through = True
        LOG.warning(
            "provider unreachable and the write log is full: stored volumes go to "
            "pass-through (written to their disks only, changes tracked for a re-sync)",
            extra={"failing_for_s": round(time.monotonic() - (self._failing_since or 0), 1)},
        )

    async def _pass_through_step(self) -> None:
        """One step in pass-through: try the provider again when the backoff says so (an
        upload that also re-syncs what changed meanwhile), else destage locally."""
        log = self.engine.log
        if time.monotonic() >= self._next_try:
            try:
                await self.destage_once()
            except Exception as exc:
                self._failed(exc)
            else:
                self._succeeded()
                self.pass_through = False
                LOG.info("provider reachable again: pass-through ended")
                return
        if log.used >= self.start_bytes or log.space_waiters:
            try:
                if await self.destage_local_once():
                    return
            except Exception as exc:
                LOG.exception("pass-through destage failed", extra={"error": str(exc)})
        self._wake.clear()
        wait = max(0.05, min(0.5, self._next_try - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def destage_local_once(self) -> bool:
        """Pass-through: destages the next batch of stored volumes' records to their disks
        without uploading; the ranges it changes are recorded (durably, before the log
        space is freed) for the re-sync. Snapshot markers met here fail: the provider cannot
        snapshot what it does not have. Returns False if nothing could be destaged (the
        oldest record belongs to a cached volume, which only an upload can destage)."""
        engine = self.engine
        records = await self._next_records(local_only=True)
        if not records:
            return False
        batch = merge(engine, records)
        await self._ensure_restored(batch)
        changed = False
        for vol_id, changes in batch.volumes.items():
            entry = engine.registry[engine.by_id[vol_id].name]
            if entry.remote_id is None or not entry.remote_synced:
                continue  # its first upload sends everything anyway
            for offset, length, _punch in changes.zero_ranges:
                entry.add_dirty(offset, offset + length)
            for run in changes.runs():
                entry.add_dirty(run.offset, run.offset + run.length)
            changed = True
        if changed:
            await asyncio.to_thread(engine.save_registry)
        await asyncio.to_thread(self._apply, batch)
        await self._release(
            batch, "the volume was in pass-through (provider unreachable, write log full)"
        )
        return True

    async def drain(self) -> None:
        """Destages everything in the log now (tests, shutdown of a volume)."""
        while self.engine.log.used:
            await self.destage_once()

    def _dirty_volumes(self) -> list[int]:
        """Stored volumes with changes made in pass-through, not uploaded yet."""
        registry = self.engine.registry
        return [
            v.id
            for v in self.engine.volumes.values()
            if v.cached is None and registry[v.name].dirty
        ]

    async def destage_once(self) -> bool:
        """Destages one batch; returns False if there was nothing to do."""
        engine = self.engine
        log = engine.log
        if log.used == 0:
            dirty = self._dirty_volumes() if self.upload is not None else []
            if not dirty:
                return False
            assert self.upload is not None
            # Nothing in the log, but changes made in pass-through to re-sync.
            empty = Batch([], {v: VolumeChanges() for v in dirty}, at_seq=log.tail_seq)
            await self.upload(empty)
            return True
        pipelined = _pipelined(self.upload)
        if pipelined is not None:
            return await self._destage_pipelined(pipelined)
        records = await self._next_records()
        if not records:
            return False
        # An upload must see each batch as a real point in time; a local apply may skip
        # versions that later records overwrite.
        batch = merge(engine, records, point_in_time=self.upload is not None)
        await self._ensure_restored(batch)
        if self.upload is not None:
            for vol_id in self._dirty_volumes():  # re-synced along with this batch
                batch.volumes.setdefault(vol_id, VolumeChanges())
            self._uploading = asyncio.ensure_future(self.upload(batch))
            try:
                await self._uploading
            finally:
                self._uploading = None
        self._apply_cached(batch)
        await asyncio.to_thread(self._apply, batch)
        # With an upload step the snapshot at the batch's end was made already.
        failed = None if self.upload else "the gateway had no provider configured to keep it"
        await self._release(batch, failed)
        return True

    async def _destage_pipelined(self, upload: PipelinedUpload) -> bool:
        """One batch through the pipeline (see the module doc): sent while the batch
        before it finishes, then copied to the base stores, then left to finish in the
        background unless nothing follows it or it must finish first."""
        try:
            if self._cursor is not None:  # past the batch in flight: anything worth it?
                remaining = self.engine.log.head - self._cursor[0]
                if (
                    remaining <= 0
                    or self._holding
                    or not self._worth_destaging(remaining, self._cursor[1])
                ):
                    await self._settle()
                    return True
            records = await self._next_records(start=self._cursor)
            if not records:
                if self._finishing is None:
                    return False
                await self._settle()
                return True
            batch = merge(self.engine, records, point_in_time=True)
            await self._ensure_restored(batch)
            for vol_id in self._dirty_volumes():  # re-synced along with this batch
                batch.volumes.setdefault(vol_id, VolumeChanges())
            if self._finishing is not None:
                self.batches_overlapped += 1
            self._uploading = asyncio.ensure_future(upload.send(batch))
            try:
                sent = await self._uploading
            finally:
                self._uploading = None
            await self._settle()  # the batch before: committed, synced, released
            await asyncio.to_thread(self._apply, batch, sync=False)
            last = batch.records[-1]
            self._cursor = (last.virt + last.size, last.seq + 1)
            self._finishing = asyncio.get_running_loop().create_task(
                self._finish(upload, batch, sent), name="destage-finish"
            )
            if getattr(sent, "barrier", True) or self._cursor[0] >= self.engine.log.head:
                await self._settle()
            return True
        except BaseException:
            self._cursor = None
            if self._finishing is not None:  # the batch before it, if any, ends first
                with contextlib.suppress(Exception):
                    await self._settle()
            raise

    async def _finish(self, upload: PipelinedUpload, batch: Batch, sent: Any) -> None:
        await upload.finish(batch, sent)
        self._apply_cached(batch)
        await asyncio.to_thread(self._sync_bases, batch)
        await self._release(batch, None)  # a marker's snapshot was made by finish()

    async def _settle(self) -> None:
        """Waits for the batch being finished; its failure is raised here (and the next
        batch starts again from the tail)."""
        task, self._finishing = self._finishing, None
        try:
            if task is not None:
                await task
        finally:
            self._cursor = None  # nothing in flight: the next batch starts at the tail

    async def _next_records(
        self, *, local_only: bool = False, start: tuple[int, int] | None = None
    ) -> list[Record]:
        """The next batch's records from the tail. A batch never crosses a snapshot marker:
        it ends at the first one. ``local_only`` (pass-through) also ends it before the
        first record of a cached volume, which only an upload can destage."""
        log = self.engine.log
        if log.used == 0:
            return []
        pos, seq = start if start is not None else (log.tail, log.tail_seq)
        if pos >= log.head:
            return []
        records = await asyncio.to_thread(log.read_records, pos, seq, log.head, self.batch_bytes)
        by_id = self.engine.by_id
        for i, rec in enumerate(records):
            if local_only:
                vol = by_id.get(rec.volume)
                if vol is not None and vol.cached is not None:
                    del records[i:]
                    break
            if rec.kind == KIND_SNAPSHOT:
                del records[i + 1 :]
                break
        return records

    async def _release(self, batch: Batch, snapshot_failure: str | None) -> None:
        """The batch is on the base stores (and uploaded): drops its index entries, moves
        the tail past it durably and frees its space. A snapshot marker at its end that
        was not made fails with ``snapshot_failure``."""
        engine = self.engine
        log = engine.log
        for rec in batch.records:
            engine.reclaim(rec)
        last = batch.records[-1]
        await asyncio.to_thread(log.persist_tail, last)
        log.release(last)
        if last.kind == KIND_SNAPSHOT and snapshot_failure is not None:
            engine.snapshot_for(last).finish(SnapshotState.FAILED, snapshot_failure)
        self.batches += 1
        self.bytes_destaged += batch.nbytes
        LOG.debug(
            "destaged batch",
            extra={"records": len(batch.records), "bytes": batch.nbytes, "used": log.used},
        )

    async def _ensure_restored(self, batch: Batch) -> None:
        """Volumes still restoring from a snapshot: the chunks the batch changes are made
        local first, so the batch lands on the snapshot's data (and an upload reads it)."""
        for vol_id, changes in batch.volumes.items():
            restore = self.engine.by_id[vol_id].restore
            if restore is None:
                continue
            for offset, length, _punch in changes.zero_ranges:
                await restore.ensure(offset, length)
            for run in changes.runs():
                await restore.ensure(run.offset, run.length)

    def _apply_cached(self, batch: Batch) -> None:
        """Cached volumes (on the loop, which reads their maps): the new chunk versions
        are in the cache already; the map now points at them."""
        for vol_id in batch.volumes:
            vol = self.engine.by_id[vol_id]
            if vol.cached is None:
                continue
            update = batch.updates.get(vol_id)
            if update is None:
                raise VolumeStateError(
                    f"volume {vol.name} is cached and can only be destaged by uploading it; "
                    "configure [remote]"
                )
            vol.cached.apply_update(update)

    def _apply(self, batch: Batch, *, sync: bool = True) -> None:
        """Copies the batch to the stored volumes' base stores (made durable with ``sync``;
        else ``_sync_bases`` does it later)."""
        log_fd = self.engine.log.fileno()
        for vol_id, changes in batch.volumes.items():
            base = self.engine.by_id[vol_id].base
            if isinstance(base, CachedBaseStore):
                continue
            for offset, length, punch in changes.zero_ranges:
                base.zero(offset, length, punch)
            for run in changes.runs():
                if run.source >= 0:
                    base.copy_from(log_fd, run.source, run.offset, run.length)
                else:
                    base.zero(run.offset, run.length, run.source == ZERO_PUNCH)
            if sync:
                base.sync()

    def _sync_bases(self, batch: Batch) -> None:
        for vol_id in batch.volumes:
            base = self.engine.by_id[vol_id].base
            if not isinstance(base, CachedBaseStore):
                base.sync()


def _pipelined(upload: UploadStep | None) -> PipelinedUpload | None:
    """The upload step, if it can be pipelined (it has ``send`` and ``finish``)."""
    if upload is not None and hasattr(upload, "send") and hasattr(upload, "finish"):
        return upload
    return None
