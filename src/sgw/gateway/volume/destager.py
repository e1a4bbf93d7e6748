"""The destager: moves log records to the base stores and frees log space.

One pass: read a batch of records in sequence order (from the tail), merge them per volume
so that a block written many times is written once, hand the merged batch to the upload
step (none in stored mode without a remote store; the remote data plane plugs in here),
apply it to the base stores and make them durable, drop the index entries that still
point into the batch, then persist the new tail and release the space. Log space is never
released before the base stores (and the upload step) have the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sgw.gateway.volume.engine import VolumeEngine
from sgw.gateway.volume.index import BLOCK, BLOCK_SHIFT, SMALL_ZERO_BLOCKS
from sgw.gateway.volume.wal import HEADER_SIZE, KIND_DATA, KIND_TRIM, Record, WriteLog

LOG = logging.getLogger(__name__)

# os.pwritev takes at most IOV_MAX (1024) buffers per call.
_IOV_MAX = 1024


@dataclass
class VolumeChanges:
    """The merged effect of a batch on one volume, applied zero ranges first.

    ``zero_ranges``: ``(offset, length, punch)`` of large zeroed ranges, in log order.
    ``blocks``: block number -> its new 4 KiB (a view into the batch buffer), or
    ``True``/``False`` for a block zeroed with/without punching. Every entry is newer than
    any zero range that covers it.
    """

    zero_ranges: list[tuple[int, int, bool]] = field(default_factory=list)
    blocks: dict[int, memoryview | bool] = field(default_factory=dict)

    def add(self, rec: Record, payload: memoryview | None) -> None:
        first, n = rec.offset >> BLOCK_SHIFT, rec.length >> BLOCK_SHIFT
        blocks = self.blocks
        if payload is not None:
            for i in range(n):
                blocks[first + i] = payload[i << BLOCK_SHIFT : (i + 1) << BLOCK_SHIFT]
            return
        punch = rec.kind == KIND_TRIM
        if n <= SMALL_ZERO_BLOCKS:
            for i in range(n):
                blocks[first + i] = punch
            return
        end = first + n
        if n <= len(blocks):
            for b in range(first, end):
                blocks.pop(b, None)
        else:
            for b in [b for b in blocks if first <= b < end]:
                del blocks[b]
        self.zero_ranges.append((rec.offset, rec.length, punch))

    def runs(self) -> list[Run]:
        """The per-block entries coalesced into runs of adjacent blocks, in block order."""
        out: list[Run] = []
        cur: Run | None = None
        for b in sorted(self.blocks):
            v = self.blocks[b]
            offset = b << BLOCK_SHIFT
            if cur is not None and offset == cur.offset + cur.length:
                if isinstance(v, memoryview):
                    if cur.views is not None and len(cur.views) < _IOV_MAX:
                        cur.views.append(v)
                        cur.length += BLOCK
                        continue
                elif cur.views is None and cur.punch == v:
                    cur.length += BLOCK
                    continue
            if isinstance(v, memoryview):
                cur = Run(offset, BLOCK, [v], False)
            else:
                cur = Run(offset, BLOCK, None, v)
            out.append(cur)
        return out


@dataclass(slots=True)
class Run:
    """Adjacent blocks with new data (``views``) or zeroed (``views`` is None)."""

    offset: int
    length: int
    views: list[memoryview] | None
    punch: bool


@dataclass
class Batch:
    """Records from ``records[0]`` to ``records[-1]`` merged per volume id."""

    records: list[Record]
    volumes: dict[int, VolumeChanges]
    nbytes: int

    @property
    def end(self) -> tuple[int, int]:
        """The new tail (position and sequence number) once the batch is destaged."""
        last = self.records[-1]
        return last.virt + last.size, last.seq + 1


UploadStep = Callable[[Batch], Awaitable[None]]


def read_batch(log: WriteLog, tail: int, tail_seq: int, head: int, max_bytes: int) -> Batch:
    """Reads and merges the records from the tail (blocking; runs in a worker thread)."""
    records = log.read_records(tail, tail_seq, head, max_bytes)
    volumes: dict[int, VolumeChanges] = {}
    nbytes = 0
    i = 0
    while i < len(records):
        # Read physically contiguous records with one pread.
        j = i + 1
        while (
            j < len(records)
            and records[j].payload_pos
            == records[j - 1].payload_pos + _payload_len(records[j - 1]) + HEADER_SIZE
        ):
            j += 1
        first, last = records[i], records[j - 1]
        start = first.payload_pos
        span = last.payload_pos + _payload_len(last) - start
        buf = memoryview(log.read(start, span))
        for rec in records[i:j]:
            changes = volumes.setdefault(rec.volume, VolumeChanges())
            if rec.kind == KIND_DATA:
                off = rec.payload_pos - start
                changes.add(rec, buf[off : off + rec.length])
                nbytes += rec.length
            else:
                changes.add(rec, None)
        i = j
    return Batch(records, volumes, nbytes)


def _payload_len(rec: Record) -> int:
    return rec.length if rec.kind == KIND_DATA else 0


class Destager:
    """Background task that keeps the write log from filling up."""

    def __init__(
        self,
        engine: VolumeEngine,
        *,
        batch_bytes: int = 32 * 1024 * 1024,
        start_fill: float = 0.05,
        idle_seconds: float = 1.0,
        upload: UploadStep | None = None,
    ) -> None:
        self.engine = engine
        self.batch_bytes = batch_bytes
        self.start_bytes = int(engine.log.data_size * start_fill)
        self.idle_seconds = idle_seconds
        self.upload = upload
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.last_append = time.monotonic()
        self.batches = 0
        self.bytes_destaged = 0

    def start(self) -> None:
        """Starts the background loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="destager")

    async def stop(self) -> None:
        """Lets the current batch finish, then stops."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def kick(self) -> None:
        """Tells the destager that there may be work (cheap; call after appends)."""
        self.last_append = time.monotonic()
        log = self.engine.log
        if log.used >= self.start_bytes or log.space_waiters:
            self._wake.set()

    def _due(self) -> bool:
        log = self.engine.log
        if log.used == 0:
            return False
        if log.used >= self.start_bytes or log.space_waiters:
            return True
        return time.monotonic() - self.last_append >= self.idle_seconds

    async def _run(self) -> None:
        while not self._stopping:
            if not self._due():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.1)
                continue
            try:
                await self.destage_once()
            except Exception:
                LOG.exception("destage failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def drain(self) -> None:
        """Destages everything in the log now (tests, shutdown of a volume)."""
        while self.engine.log.used:
            await self.destage_once()

    async def destage_once(self) -> bool:
        """Destages one batch; returns False if the log was empty."""
        engine = self.engine
        log = engine.log
        if log.used == 0:
            return False
        batch = await asyncio.to_thread(
            read_batch, log, log.tail, log.tail_seq, log.head, self.batch_bytes
        )
        if not batch.records:
            return False
        if self.upload is not None:
            await self.upload(batch)
        await asyncio.to_thread(self._apply, batch)
        for rec in batch.records:
            engine.reclaim(rec)
        tail, tail_seq = batch.end
        await asyncio.to_thread(log.persist_tail, tail, tail_seq)
        log.release(tail, tail_seq)
        self.batches += 1
        self.bytes_destaged += batch.nbytes
        LOG.debug(
            "destaged batch",
            extra={"records": len(batch.records), "bytes": batch.nbytes, "used": log.used},
        )
        return True

    def _apply(self, batch: Batch) -> None:
        for vol_id, changes in batch.volumes.items():
            vol = self.engine.by_id.get(vol_id)
            if vol is None:
                continue
            base = vol.base
            for offset, length, punch in changes.zero_ranges:
                base.zero(offset, length, punch)
            for run in changes.runs():
                if run.views is None:
                    base.zero(run.offset, run.length, run.punch)
                elif len(run.views) == 1:
                    base.write(run.offset, run.views[0])
                else:
                    base.write(run.offset, b"".join(run.views))
            base.sync()
