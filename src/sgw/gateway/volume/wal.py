"""The write log: one append-only circular log per gateway on the upload-buffer disk.

Layout of the log file (a regular file or a block device)::

    [0, 4 KiB)       superblock slot 0
    [4 KiB, 8 KiB)   superblock slot 1
    [64 KiB, end)    the circular data area

Positions in the data area are *virtual*: they grow forever, and ``virt % data_size`` is
the place in the data area. A record never straddles the end of the data area; when one
does not fit, the writer skips to the start of the next lap. Each record header carries
its own virtual position, its sequence number and the epoch (incremented at every open),
and a CRC32C covers header and payload. Recovery walks from the tail in the superblock:
the next record must have the next sequence number, its own position, an epoch no older
than its predecessor's and a good CRC, else the walk ends there (a torn tail). Stale
records of a previous lap fail the position check; stale records left behind a torn tail
by a run that crashed fail the epoch check once newer records have been written over the
tail.

The superblock holds the tail (the oldest record not yet destaged) and the epoch of the
record just before it, the least epoch the walk accepts at the tail; it is written to the
two slots alternately and made durable before freed space is reused, so recovery never
starts from a tail whose records were overwritten. The log remembers where its writer
skipped to the next lap (and recovery where it found such a skip), so the destager never
mistakes a torn header left at the end of a lap for a record. A new log file is formatted
under a temporary name and renamed into place, so a crash at first start leaves no file
without a superblock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from crc32c import crc32c

from sgw.common.errors import HandoverError, LogCorruptError, LogFullError, StorageError
from sgw.common.files import fsync_directory

LOG = logging.getLogger(__name__)

SUPER_SLOT_SIZE = 4096
DATA_START = 64 * 1024
# Smallest useful log: room for a few maximum-size records (32 MiB each) and headers.
MIN_DATA_SIZE = 128 * 1024 * 1024

# magic, version, generation, epoch, data_size, tail, tail_seq, tail_epoch (the epoch of the
# record just before the tail: the least the record at the tail may have)
_SUPER = struct.Struct("<8sIQIQQQI")
_SUPER_MAGIC = b"SGWLOG01"
_SUPER_VERSION = 1

# magic, kind, flags, reserved, epoch, seq, virt, volume, offset, length, crc
HEADER = struct.Struct("<IBBHIQQIQQI")
HEADER_SIZE = HEADER.size
_REC_MAGIC = 0x4C575753  # "SWWL"

KIND_DATA = 1  # payload follows; length = payload length
KIND_ZERO = 2  # range reads as zeroes, space stays allocated; no payload
KIND_TRIM = 3  # range reads as zeroes, space may be released; no payload
# A snapshot marker: the volume as of this record is to become a snapshot. Its payload
# (``length`` bytes, offset 0) describes the snapshot; it changes no data.
KIND_SNAPSHOT = 4
_KINDS = (KIND_DATA, KIND_ZERO, KIND_TRIM, KIND_SNAPSHOT)
PAYLOAD_KINDS = (KIND_DATA, KIND_SNAPSHOT)


@dataclass(frozen=True, slots=True)
class Record:
    """One record as found in the log; ``payload_pos`` is the file offset of its payload."""

    kind: int
    seq: int
    virt: int
    volume: int
    offset: int
    length: int
    payload_pos: int
    epoch: int = 0

    @property
    def size(self) -> int:
        """Bytes the record occupies in the data area."""
        return HEADER_SIZE + (self.length if self.kind in PAYLOAD_KINDS else 0)


@dataclass(frozen=True)
class LogState:
    """Where blue's write log stands after its last append and sync (every appended
    record is durable)."""

    epoch: int
    head: int
    next_seq: int
    tail: int
    tail_seq: int
    tail_epoch: int
    skips: dict[int, int]


def _crc_header(header: bytes | bytearray | memoryview) -> int:
    return crc32c(bytes(header[: HEADER_SIZE - 4]))


class WriteLog:
    """The circular log file: append, group commit, read back, free after destage."""

    def __init__(self, fd: int, path: str, data_size: int, epoch: int, generation: int) -> None:
        self._fd = fd
        self.path = path
        self.data_size = data_size
        self.epoch = epoch
        self._generation = generation
        self.tail = 0  # virtual position of the oldest live record
        self.tail_seq = 0
        self.tail_epoch = 0  # least epoch of the record at the tail
        self.head = 0  # virtual position where the next record goes
        self.next_seq = 0
        self._durable_seq = -1  # every record with seq <= this is on stable storage
        self._sync_task: asyncio.Task[None] | None = None
        self._space_waiters: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.syncs = 0
        self._max_epoch = epoch
        # Where the writer left the rest of a lap unused -> where it went on.
        self._skips: dict[int, int] = {}

    # -- creation and recovery -------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int) -> None:
        """Formats ``path`` as an empty log; a regular file is created and preallocated.

        A new file is formatted under a temporary name and renamed into place, so that a
        crash in the middle never leaves a file at ``path`` without a superblock.
        """
        is_new = not os.path.exists(path)
        target = f"{path}.new" if is_new else path
        fd = os.open(target, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if is_new else 0), 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, size)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:  # a filesystem without fallocate: sparse is fine
                    LOG.warning("log preallocation failed", extra={"error": str(exc)})
            else:
                size = _device_size(fd)
            data_size = size - DATA_START
            if data_size < MIN_DATA_SIZE:
                raise StorageError(
                    f"write log {path} is {size} bytes; it must be at least "
                    f"{(MIN_DATA_SIZE + DATA_START) >> 20} MiB"
                )
            # Wipe both slots and the first header so that nothing old is mistaken for ours.
            os.pwrite(fd, bytes(DATA_START), 0)
            log = cls(fd, path, data_size, epoch=0, generation=0)
            log._write_super()
            os.fsync(fd)
        finally:
            os.close(fd)
        if is_new:
            os.replace(target, path)
            fsync_directory(path)

    @classmethod
    def open(cls, path: str, *, standby: bool = False) -> tuple[WriteLog, list[Record]]:
        """Opens the log, finds the live records (tail to the end of the valid chain).

        Returns the log, ready for appends with a new epoch, and the live records in order.
        ``standby`` (the successor of a running daemon, which still appends): the log is
        only read, nothing is written until ``adopt`` hands it over.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            sup = _read_super(fd, path)
            generation, epoch, data_size, tail, tail_seq, tail_epoch = sup
            log = cls(fd, path, data_size, epoch, generation)
            log.tail, log.tail_seq, log.tail_epoch = tail, tail_seq, tail_epoch
            records = list(log._scan())
            if records:
                last = records[-1]
                log.head = last.virt + last.size
                log.next_seq = last.seq + 1
            else:
                log.head, log.next_seq = tail, tail_seq
            log._durable_seq = log.next_seq - 1
            if not standby:
                # A new epoch, durable before the first append, fences off stale records.
                log.epoch = max(epoch, log._max_epoch) + 1
                log._write_super()
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        LOG.info(
            "write log opened" + (" (standby)" if standby else ""),
            extra={
                "path": path,
                "records": len(records),
                "used_bytes": log.used,
                "epoch": log.epoch,
            },
        )
        return log, records

    def state(self) -> LogState:
        """Where the log stands, for the successor (blue, fenced and synced)."""
        return LogState(
            epoch=self.epoch,
            head=self.head,
            next_seq=self.next_seq,
            tail=self.tail,
            tail_seq=self.tail_seq,
            tail_epoch=self.tail_epoch,
            skips=dict(self._skips),
        )

    def records_since(self, pos: int, seq: int, state: LogState) -> list[Record]:
        """The records from ``pos`` (seq ``seq``) to blue's head, read with blue's skips
        (green catching up); HandoverError unless they end exactly where blue's did."""
        self._skips = dict(state.skips)
        try:
            records = self.read_records(pos, seq, state.head, max_bytes=1 << 62)
        except LogCorruptError as exc:
            raise HandoverError(f"catching up the write log: {exc}") from exc
        end, end_seq = (
            (pos, seq)
            if not records
            else (records[-1].virt + records[-1].size, records[-1].seq + 1)
        )
        if end_seq != state.next_seq or self._skips.get(end, end) != state.head:
            raise HandoverError(
                f"catching up the write log ended at record {end_seq} ({end}), blue's "
                f"head is record {state.next_seq} ({state.head})"
            )
        return records

    def adopt(self, state: LogState) -> None:
        """Takes over blue's log as it stands (green, after catching up): appends go on
        after blue's last record, in blue's epoch (its tail is clean: every record synced)."""
        self.epoch = state.epoch
        self.head, self.next_seq = state.head, state.next_seq
        self.tail, self.tail_seq, self.tail_epoch = state.tail, state.tail_seq, state.tail_epoch
        self._skips = dict(state.skips)
        self._durable_seq = state.next_seq - 1

    def _scan(self) -> Iterator[Record]:
        pos, seq, min_epoch = self.tail, self.tail_seq, self.tail_epoch
        while True:
            found = self._record_at(pos, seq, min_epoch)
            if found is None and pos % self.data_size != 0:
                lap = (pos // self.data_size + 1) * self.data_size
                found = self._record_at(lap, seq, min_epoch)
                if found is not None:
                    self._skips[pos] = lap
            if found is None:
                return
            rec, min_epoch = found
            self._max_epoch = max(self._max_epoch, min_epoch)
            yield rec
            pos, seq = rec.virt + rec.size, seq + 1

    def _record_at(self, virt: int, seq: int, min_epoch: int) -> tuple[Record, int] | None:
        room = self.data_size - virt % self.data_size
        if room < HEADER_SIZE:
            return None
        phys = DATA_START + virt % self.data_size
        raw = os.pread(self._fd, HEADER_SIZE, phys)
        if len(raw) < HEADER_SIZE:
            return None
        magic, kind, _flags, _res, epoch, rseq, rvirt, vol, off, length, crc = HEADER.unpack(raw)
        if magic != _REC_MAGIC or kind not in _KINDS or rseq != seq or rvirt != virt:
            return None
        if epoch < min_epoch:
            return None
        value = _crc_header(raw)
        if kind in PAYLOAD_KINDS:
            if HEADER_SIZE + length > room:
                return None
            payload = os.pread(self._fd, length, phys + HEADER_SIZE)
            if len(payload) < length:
                return None
            value = crc32c(payload, value)
        if value != crc:
            return None
        return Record(kind, seq, virt, vol, off, length, phys + HEADER_SIZE, epoch), epoch

    # -- superblock ------------------------------------------------------------------

    def _write_super(
        self, tail: int | None = None, tail_seq: int | None = None, tail_epoch: int | None = None
    ) -> None:
        self._generation += 1
        body = _SUPER.pack(
            _SUPER_MAGIC,
            _SUPER_VERSION,
            self._generation,
            self.epoch,
            self.data_size,
            self.tail if tail is None else tail,
            self.tail_seq if tail_seq is None else tail_seq,
            self.tail_epoch if tail_epoch is None else tail_epoch,
        )
        block = body + struct.pack("<I", crc32c(body))
        slot = self._generation % 2
        os.pwrite(self._fd, block.ljust(SUPER_SLOT_SIZE, b"\0"), slot * SUPER_SLOT_SIZE)

    # -- space -------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of the data area held by live records (and skipped lap ends)."""
        return self.head - self.tail

    def _placement(self, size: int) -> int:
        """Virtual position where a record of ``size`` bytes would go."""
        if size > self.data_size:
            raise LogFullError(
                f"a record of {size} bytes cannot fit a write log of {self.data_size} bytes"
            )
        pos = self.head
        if self.data_size - pos % self.data_size < size:
            pos = (pos // self.data_size + 1) * self.data_size
        return pos

    def fits(self, size: int) -> bool:
        """True if a record of ``size`` bytes (header included) can be appended now."""
        return self._placement(size) + size - self.tail <= self.data_size

    def wait_for_space(self, size: int) -> asyncio.Future[None]:
        """Queues a writer for ``size`` bytes (FIFO). The future is done when the writer is
        first in line and its record fits; it must then append without yielding to the
        event loop and call ``waiter_done`` (also if it gives up)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._space_waiters.append((size, fut))
        self._wake_space_waiters()
        return fut

    def waiter_done(self) -> None:
        """The first writer in line has appended (or given up): the next one may go."""
        if self._space_waiters:
            self._space_waiters.popleft()
        self._wake_space_waiters()

    def _wake_space_waiters(self) -> None:
        while self._space_waiters:
            size, fut = self._space_waiters[0]
            if fut.cancelled():
                self._space_waiters.popleft()
                continue
            if not fut.done() and self.fits(size):
                fut.set_result(None)
            return

    @property
    def space_waiters(self) -> int:
        """Writers waiting for space: the destager should hurry."""
        return len(self._space_waiters)

    # -- appending -----------------------------------------------------------------

    def append(
        self,
        kind: int,
        volume: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> Record:
        """Appends one record (the caller checked ``fits``); returns where it went.

        The record is in the page cache when this returns; ``sync`` makes it durable.
        """
        plen = length if kind in PAYLOAD_KINDS else 0
        size = HEADER_SIZE + plen
        virt = self._placement(size)
        if virt + size - self.tail > self.data_size:
            raise LogFullError("write log has no room for this record; wait for space first")
        seq = self.next_seq
        header = bytearray(
            HEADER.pack(_REC_MAGIC, kind, 0, 0, self.epoch, seq, virt, volume, offset, length, 0)
        )
        crc = _crc_header(header)
        if payload is not None:
            crc = crc32c(payload, crc)
        struct.pack_into("<I", header, HEADER_SIZE - 4, crc)
        phys = DATA_START + virt % self.data_size
        if payload is not None:
            written = os.pwritev(self._fd, [header, payload], phys)
        else:
            written = os.pwrite(self._fd, header, phys)
        if written != size:
            raise StorageError(f"short write to write log {self.path}: {written} of {size}")
        if virt != self.head:
            self._skips[self.head] = virt
        self.head = virt + size
        self.next_seq = seq + 1
        return Record(kind, seq, virt, volume, offset, length, phys + HEADER_SIZE, self.epoch)

    async def sync(self) -> None:
        """Returns once every record appended before the call is durable (group commit)."""
        target = self.next_seq - 1
        while self._durable_seq < target:
            if self._sync_task is None:
                self._sync_task = asyncio.get_running_loop().create_task(self._sync_once())
            await asyncio.shield(self._sync_task)

    async def _sync_once(self) -> None:
        upto = self.next_seq - 1
        try:
            await asyncio.to_thread(os.fdatasync, self._fd)
            self.syncs += 1
            self._durable_seq = max(self._durable_seq, upto)
        finally:
            self._sync_task = None

    def sync_now(self) -> None:
        """Blocking ``sync`` for shutdown paths outside the event loop."""
        os.fdatasync(self._fd)
        self._durable_seq = self.next_seq - 1

    # -- reading back and freeing ------------------------------------------------------

    def fileno(self) -> int:
        """The log's file descriptor (for kernel copies to the base stores)."""
        return self._fd

    def read(self, pos: int, length: int) -> bytes:
        """Reads ``length`` bytes at file offset ``pos`` (a payload, or part of one)."""
        return os.pread(self._fd, length, pos)

    def readinto(self, buf: memoryview, pos: int) -> int:
        """Reads into ``buf`` from file offset ``pos``."""
        return os.preadv(self._fd, [buf], pos)

    def read_records(self, start: int, start_seq: int, end: int, max_bytes: int) -> list[Record]:
        """Headers of the records from ``start`` (seq ``start_seq``) until ``end`` or about
        ``max_bytes`` of data area; used by the destager, whose records are known good."""
        out: list[Record] = []
        pos, seq = start, start_seq
        limit = start + max_bytes
        while pos < end and (not out or pos < limit):
            lap = self._skips.get(pos)
            if lap is not None:  # the writer left the rest of this lap unused
                pos = lap
                continue
            phys = DATA_START + pos % self.data_size
            raw = os.pread(self._fd, HEADER_SIZE, phys)
            magic, kind, _f, _r, epoch, rseq, rvirt, vol, off, length, _crc = HEADER.unpack(raw)
            if magic != _REC_MAGIC or rseq != seq or rvirt != pos:
                raise LogCorruptError(f"write log record {seq} is missing at {pos}")
            rec = Record(kind, seq, pos, vol, off, length, phys + HEADER_SIZE, epoch)
            out.append(rec)
            pos, seq = pos + rec.size, seq + 1
        return out

    def persist_tail(self, last: Record) -> None:
        """Records durably that everything up to ``last`` is destaged: the tail moves past
        it (blocking: run it off the event loop).

        The space before the new tail stays reserved until ``release`` runs on the event
        loop, so no append can overwrite records that a crash right now would still look
        for. The superblock also keeps ``last``'s epoch, the least epoch the record at the
        tail may have, so that a stale record sitting right at the new tail stays dead.
        """
        self._write_super(last.virt + last.size, last.seq + 1, last.epoch)
        os.fdatasync(self._fd)

    def release(self, last: Record) -> None:
        """On the event loop, after ``persist_tail(last)``: frees the space, wakes writers."""
        tail = last.virt + last.size
        self.tail, self.tail_seq, self.tail_epoch = tail, last.seq + 1, last.epoch
        self._skips = {p: lap for p, lap in self._skips.items() if p >= tail}
        self._wake_space_waiters()

    def close(self) -> None:
        """Closes the file; pending appends should have been synced."""
        os.close(self._fd)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_super(fd: int, path: str) -> tuple[int, int, int, int, int, int]:
    best: tuple[int, int, int, int, int, int] | None = None
    for slot in (0, 1):
        raw = os.pread(fd, _SUPER.size + 4, slot * SUPER_SLOT_SIZE)
        if len(raw) < _SUPER.size + 4:
            continue
        body, (crc,) = raw[: _SUPER.size], struct.unpack_from("<I", raw, _SUPER.size)
        if crc32c(body) != crc:
            continue
        magic, version, generation, epoch, data_size, tail, tail_seq, tail_epoch = _SUPER.unpack(
            body
        )
        if magic != _SUPER_MAGIC or version != _SUPER_VERSION:
            continue
        if best is None or generation > best[0]:
            best = (generation, epoch, data_size, tail, tail_seq, tail_epoch)
    if best is None:
        raise LogCorruptError(
            f"{path} has no valid write-log superblock; it is not a write log of this "
            "gateway (or both superblock copies are damaged)"
        )
    return best
