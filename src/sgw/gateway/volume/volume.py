"""A volume: reads merge the write log over the base store; writes go to the log.

Everything here runs inline on the event loop: log appends and reads that hit the page
cache cost a few microseconds, far less than a thread hop. Records are block aligned
(4 KiB): an unaligned write reads the partial edge blocks and appends whole blocks, so the
index stays per block and a destage never has to merge partial blocks.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from sgw.gateway.volume.base import BaseStore
from sgw.gateway.volume.cached_base import CachedBaseStore
from sgw.gateway.volume.index import (
    BLOCK,
    BLOCK_SHIFT,
    SEG_BASE,
    SEG_LOG,
    SEG_ZERO,
    ExtentIndex,
)
from sgw.gateway.volume.wal import (
    HEADER_SIZE,
    KIND_DATA,
    KIND_SNAPSHOT,
    KIND_TRIM,
    KIND_ZERO,
    Record,
    WriteLog,
)

LOG = logging.getLogger(__name__)

# NBD base:allocation flags.
STATE_HOLE = 1
STATE_ZERO = 2
# Block status answers at most this much per request when the log holds blocks of the volume
# (the protocol lets a server describe a prefix of the range).
STATUS_SCAN_LIMIT = 64 * 1024 * 1024
_MASK = BLOCK - 1


LOADING_MAP = "loading the remote chunk map"


class IoStats:
    """A volume's running I/O totals as its NBD clients see them: counted where the
    requests are answered (plain attribute increments, no lock: one event loop), read by
    the health metrics (sgw.gateway.health) when they sample."""

    __slots__ = ("read_bytes", "read_ns", "reads", "write_bytes", "write_ns", "writes")

    def __init__(self) -> None:
        self.reads = 0
        self.read_bytes = 0
        self.read_ns = 0  # summed latency: request parsed to reply queued
        self.writes = 0
        self.write_bytes = 0
        self.write_ns = 0  # summed latency: request parsed to data in the log


class VolumeStatus(enum.StrEnum):
    """What a volume can do right now (reported to the provider by the control channel)."""

    AVAILABLE = "AVAILABLE"  # reads and writes served normally
    BOOTSTRAPPING = "BOOTSTRAPPING"  # cached: the remote map is being loaded; reads wait
    WRITES_STALLED = "WRITES_STALLED"  # cached: log full and uploads failing; reads go on
    PASS_THROUGH = "PASS_THROUGH"  # stored: log full, writes go to the local disk only
    RESTORING = "RESTORING"  # stored, from a snapshot: served, missing chunks fetched first


class LazyRestore(Protocol):
    """A stored volume's restore from a snapshot, while chunks are still missing locally."""

    def is_restored(self, offset: int, length: int) -> bool:
        """True if every chunk under the range is known to be local (no I/O)."""
        ...

    async def ensure(self, offset: int, length: int) -> None:
        """Makes every chunk under the range local."""
        ...


class Volume:
    """One exported volume of the gateway."""

    def __init__(self, name: str, vol_id: int, size: int, base: BaseStore, log: WriteLog) -> None:
        self.name = name
        self.id = vol_id
        self.size = size
        self.base = base
        self.log = log
        self.index = ExtentIndex()
        # The cached-mode store, or None: the NBD read path checks it before inline reads.
        self.cached = base if isinstance(base, CachedBaseStore) else None
        self.status = VolumeStatus.BOOTSTRAPPING if self.cached else VolumeStatus.AVAILABLE
        self.status_reason = LOADING_MAP if self.cached else ""
        # Set while a stored volume restores from a snapshot: its base may not be read or
        # written before ``restore.ensure`` covered the range.
        self.restore: LazyRestore | None = None
        # Sequence number of the volume's newest log record (-1: none): the log holds
        # records of the volume while this is at or past the log's tail.
        self.last_seq = -1
        self.io = IoStats()

    @property
    def mode(self) -> str:
        """``cached`` or ``stored``."""
        return "cached" if self.cached is not None else "stored"

    def set_status(self, status: VolumeStatus, reason: str = "") -> None:
        """Changes the status; a change of status (not of its reason alone, which may carry
        a changing error text) is logged as one structured line."""
        previous = self.status
        self.status, self.status_reason = status, reason
        if status == previous:
            return
        level = logging.WARNING if status == VolumeStatus.WRITES_STALLED else logging.INFO
        LOG.log(
            level,
            "volume status changed",
            extra={
                "volume": self.name,
                "status": str(status),
                "previous": str(previous),
                "reason": reason,
            },
        )

    @property
    def dirty_bytes(self) -> int:
        """Bytes of this volume held only in the write log (not yet destaged: for a cached
        volume, not yet uploaded). Zeroed ranges in the log cost no data and are not
        counted."""
        return len(self.index.blocks) << BLOCK_SHIFT

    def base_spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ``(offset, length)`` parts of a read that come from the base store."""
        first = offset >> BLOCK_SHIFT
        last = (offset + length + _MASK) >> BLOCK_SHIFT
        if not self.index.touches(first, last - first):
            return [(offset, length)]
        end = offset + length
        out: list[tuple[int, int]] = []
        for kind, fb, n, _pos in self.index.segments(first, last - first):
            if kind == SEG_BASE:
                s = max(fb << BLOCK_SHIFT, offset)
                e = min((fb + n) << BLOCK_SHIFT, end)
                out.append((s, e - s))
        return out

    # -- reads -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The volume's current bytes at ``offset`` (acknowledged writes included)."""
        index = self.index
        if not index.blocks and not index.intervals:
            return self.base.read(offset, length)
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return buf

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fills ``view`` with the volume's bytes at ``offset``."""
        length = len(view)
        end = offset + length
        first = offset >> BLOCK_SHIFT
        last = (end + _MASK) >> BLOCK_SHIFT
        for kind, fb, n, pos in self.index.segments(first, last - first):
            s = max(fb << BLOCK_SHIFT, offset)
            e = min((fb + n) << BLOCK_SHIFT, end)
            dst = view[s - offset : e - offset]
            if kind == SEG_BASE:
                self.base.readinto(dst, s)
            elif kind == SEG_LOG:
                self.log.readinto(dst, pos + (s - (fb << BLOCK_SHIFT)))
            else:
                dst[:] = bytes(e - s)

    # -- writes ----------------------------------------------------------------------

    @staticmethod
    def log_bytes_for_write(offset: int, length: int) -> int:
        """Bytes of log a write of this range needs (edges rounded out to blocks)."""
        start = offset & ~_MASK
        end = (offset + length + _MASK) & ~_MASK
        return HEADER_SIZE + end - start

    @staticmethod
    def log_bytes_for_zero() -> int:
        """Bytes of log a zero or trim needs at most (two edge blocks and a range record)."""
        return 3 * HEADER_SIZE + 2 * BLOCK

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> Record:
        """Appends ``data`` at ``offset`` to the log; the caller checked that it fits."""
        length = len(data)
        if offset & _MASK or length & _MASK:
            start = offset & ~_MASK
            end = (offset + length + _MASK) & ~_MASK
            buf = bytearray(end - start)
            view = memoryview(buf)
            if offset != start:
                self.readinto(view[:BLOCK], start)
            if offset + length != end and (end - BLOCK > start or offset == start):
                self.readinto(view[-BLOCK:], end - BLOCK)
            view[offset - start : offset - start + length] = data
            data, offset, length = buf, start, end - start
        rec = self.log.append(KIND_DATA, self.id, offset, length, data)
        self.last_seq = rec.seq
        self.index.add_data(offset >> BLOCK_SHIFT, length >> BLOCK_SHIFT, rec.payload_pos)
        return rec

    def write_zeroes(self, offset: int, length: int, punch: bool) -> None:
        """NBD WRITE_ZEROES: the range reads as zeroes; ``punch`` lets whole blocks become
        holes (no NO_HOLE flag). Partial edge blocks are rewritten."""
        end = offset + length
        inner_start = (offset + _MASK) & ~_MASK
        inner_end = end & ~_MASK
        if inner_start >= inner_end:
            self.write(offset, bytes(length))
            return
        if offset != inner_start:
            self.write(offset, bytes(inner_start - offset))
        if end != inner_end:
            self.write(inner_end, bytes(end - inner_end))
        self.zero_blocks(inner_start, inner_end - inner_start, punch)

    def trim(self, offset: int, length: int) -> None:
        """NBD TRIM: whole blocks in the range become holes that read as zeroes; partial
        edge blocks are left alone (a trim is advisory)."""
        inner_start = (offset + _MASK) & ~_MASK
        inner_end = (offset + length) & ~_MASK
        if inner_start < inner_end:
            self.zero_blocks(inner_start, inner_end - inner_start, True)

    def zero_blocks(self, offset: int, length: int, punch: bool) -> None:
        """Appends a zero record for a block-aligned range."""
        kind = KIND_TRIM if punch else KIND_ZERO
        rec = self.log.append(kind, self.id, offset, length)
        self.last_seq = rec.seq
        self.index.add_zero(offset >> BLOCK_SHIFT, length >> BLOCK_SHIFT, rec.virt, punch)

    # -- index upkeep (recovery and destage) --------------------------------------------

    def replay(self, rec: Record) -> None:
        """Puts a record found at recovery back into the index."""
        if rec.kind == KIND_SNAPSHOT:
            return
        first, n = rec.offset >> BLOCK_SHIFT, rec.length >> BLOCK_SHIFT
        if rec.kind == KIND_DATA:
            self.index.add_data(first, n, rec.payload_pos)
        else:
            self.index.add_zero(first, n, rec.virt, rec.kind == KIND_TRIM)

    def reclaim(self, rec: Record) -> None:
        """Forgets index entries that still point at a destaged record."""
        if rec.kind == KIND_SNAPSHOT:
            return
        first, n = rec.offset >> BLOCK_SHIFT, rec.length >> BLOCK_SHIFT
        if rec.kind == KIND_DATA:
            self.index.reclaim_data(first, n, rec.payload_pos)
        else:
            self.index.reclaim_zero(first, n, rec.virt, rec.kind == KIND_TRIM)

    # -- block status ------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` extents (NBD base:allocation) from ``offset``; they may
        cover only a prefix of ``length``. Never claims zeroes that are not."""
        out: list[tuple[int, int]] = []
        if not self.index.blocks and not self.index.intervals:
            self._base_status(out, offset, length)
            return _merge_extents(out)
        length = min(length, STATUS_SCAN_LIMIT)
        end = offset + length
        first = offset >> BLOCK_SHIFT
        last = (end + _MASK) >> BLOCK_SHIFT
        for kind, fb, n, pos in self.index.segments(first, last - first):
            s = max(fb << BLOCK_SHIFT, offset)
            e = min((fb + n) << BLOCK_SHIFT, end)
            if kind == SEG_LOG:
                out.append((e - s, 0))
            elif kind == SEG_ZERO:
                out.append((e - s, STATE_ZERO | (STATE_HOLE if pos else 0)))
            else:
                self._base_status(out, s, e - s)
        return _merge_extents(out)

    def _base_status(self, out: list[tuple[int, int]], offset: int, length: int) -> None:
        if self.restore is not None and not self.restore.is_restored(offset, length):
            out.append((length, 0))  # not local yet: data, whatever the disk says
            return
        for n, hole in self.base.allocated(offset, length):
            out.append((n, STATE_HOLE | STATE_ZERO if hole else 0))


def _merge_extents(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for n, flags in extents:
        if n <= 0:
            continue
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + n, flags)
        else:
            merged.append((n, flags))
    return merged
