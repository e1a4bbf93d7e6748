"""Unit tests of the write log, the volume engine and the destager, on files in tmp_path.

A "crash" here is closing the files without syncing or destaging anything: the page cache
keeps what was written, exactly as after kill -9. A torn write (power loss) is simulated by
overwriting the part of a record that did not reach the disk.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
from pathlib import Path

import pytest
from crc32c import crc32c

from sgw.common.errors import LogCorruptError, LogFullError
from sgw.gateway.volume.destager import Batch, Destager
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.index import BLOCK, SMALL_ZERO_BLOCKS, ExtentIndex
from sgw.gateway.volume.volume import Volume
from sgw.gateway.volume.wal import (
    DATA_START,
    HEADER,
    HEADER_SIZE,
    KIND_DATA,
    KIND_TRIM,
    KIND_ZERO,
    MIN_DATA_SIZE,
    SUPER_SLOT_SIZE,
    Record,
    WriteLog,
)

LOG_SIZE = DATA_START + MIN_DATA_SIZE  # the smallest log: one lap is MIN_DATA_SIZE bytes
DATA_SIZE = MIN_DATA_SIZE
MIB = 1 << 20
BIG = 8 * MIB  # a payload size that fills a lap in 15 records
VOL_SIZE = 64 * MIB


# -- helpers ------------------------------------------------------------------------------


def pattern(tag: int, n: int) -> bytes:
    """``n`` bytes that differ for every ``tag`` (cheap for megabytes)."""
    seed = random.Random(tag).randbytes(4096)
    return (seed * (n // 4096 + 1))[:n]


def new_log(tmp_path: Path) -> str:
    path = str(tmp_path / "writelog")
    WriteLog.create(path, LOG_SIZE)
    return path


def key(rec: Record) -> tuple[int, int, int, int, int, int]:
    return (rec.kind, rec.seq, rec.virt, rec.volume, rec.offset, rec.length)


def crash_log(log: WriteLog) -> None:
    """Kill -9 of the owner: the file is closed, nothing is synced or destaged."""
    log.close()


def destage_log(log: WriteLog, upto: Record) -> None:
    """What the destager does to the log once everything up to ``upto`` is applied."""
    log.persist_tail(upto)
    log.release(upto)


def tear(path: str, pos: int, length: int) -> None:
    """A torn write: ``length`` bytes at file offset ``pos`` never reached the disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(length), pos)
    finally:
        os.close(fd)


def tear_payload(path: str, rec: Record) -> None:
    """Power loss in the middle of ``rec``: its header is there, its last page is not."""
    end = rec.payload_pos + rec.length
    last_page = max(end - 1, rec.payload_pos) & ~(BLOCK - 1)
    start = max(last_page, rec.payload_pos)
    tear(path, start, end - start)


def spec(tmp_path: Path, name: str = "vol0", size: int = VOL_SIZE) -> VolumeSpec:
    return VolumeSpec(name, size, str(tmp_path / "volumes" / f"{name}.img"))


def open_engine(tmp_path: Path, size: int = VOL_SIZE) -> VolumeEngine:
    return VolumeEngine.open(
        str(tmp_path), str(tmp_path / "writelog"), LOG_SIZE, [spec(tmp_path, size=size)]
    )


def crash_engine(engine: VolumeEngine) -> None:
    """Kill -9 of the daemon: files closed, nothing synced, nothing destaged."""
    engine.log.close()
    for vol in engine.volumes.values():
        vol.base.close()


def base_bytes(tmp_path: Path, name: str = "vol0") -> bytes:
    return (tmp_path / "volumes" / f"{name}.img").read_bytes()


class Model:
    """The bytes a volume must read back."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def trim(self, offset: int, length: int) -> None:
        start = (offset + BLOCK - 1) & ~(BLOCK - 1)
        end = (offset + length) & ~(BLOCK - 1)
        if start < end:
            self.zero(start, end - start)


def check_volume(vol: Volume, model: Model, chunk: int = 4 * MIB) -> None:
    for off in range(0, vol.size, chunk):
        got = bytes(vol.read(off, chunk))
        want = bytes(model.data[off : off + chunk])
        if got != want:
            bad = next(i for i in range(chunk) if got[i] != want[i])
            pytest.fail(f"volume differs from the model at byte {off + bad}")


# -- appends and recovery --------------------------------------------------------------------


def test_records_survive_a_crash_in_order(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, recs = WriteLog.open(path)
    assert recs == []
    written = [
        log.append(KIND_DATA, 1, 0, BLOCK, pattern(1, BLOCK)),
        log.append(KIND_ZERO, 1, 8 * BLOCK, 2 * BLOCK),
        log.append(KIND_DATA, 2, 4 * BLOCK, 3 * BLOCK, pattern(2, 3 * BLOCK)),
        log.append(KIND_TRIM, 2, 0, 1 << 30),
    ]
    assert [r.seq for r in written] == [0, 1, 2, 3]
    crash_log(log)

    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(r) for r in written]
    assert log.read(recs[0].payload_pos, BLOCK) == pattern(1, BLOCK)
    assert log.read(recs[2].payload_pos, 3 * BLOCK) == pattern(2, 3 * BLOCK)
    assert (log.head, log.next_seq) == (written[-1].virt + written[-1].size, 4)
    nxt = log.append(KIND_DATA, 1, 0, BLOCK, pattern(3, BLOCK))
    assert (nxt.seq, nxt.virt) == (4, log.head - nxt.size)
    log.close()


def test_a_record_larger_than_the_log_is_refused(tmp_path: Path) -> None:
    log, _ = WriteLog.open(new_log(tmp_path))
    with pytest.raises(LogFullError):
        log.fits(DATA_SIZE + 1)
    with pytest.raises(LogFullError):
        log.append(KIND_DATA, 1, 0, DATA_SIZE, b"")
    assert log.fits(DATA_SIZE - HEADER_SIZE)
    log.close()


@pytest.mark.parametrize("damage", ["payload", "header_crc", "header_length", "truncated"])
def test_torn_tail_is_discarded_and_earlier_records_survive(tmp_path: Path, damage: str) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    good = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK)) for i in range(5)]
    last = log.append(KIND_DATA, 1, 9 * BLOCK, 2 * BLOCK, pattern(99, 2 * BLOCK))
    crash_log(log)

    header_pos = last.payload_pos - HEADER_SIZE
    if damage == "payload":
        tear_payload(path, last)
    elif damage == "header_crc":
        tear(path, header_pos + HEADER_SIZE - 2, 2)
    elif damage == "header_length":  # a damaged length field
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, struct.pack("<Q", 3 * BLOCK), header_pos + HEADER_SIZE - 12)
        os.close(fd)
    else:  # the file ends in the middle of the payload
        os.truncate(path, last.payload_pos + 100)

    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(r) for r in good]
    for i, r in enumerate(recs):
        assert log.read(r.payload_pos, BLOCK) == pattern(i, BLOCK)
    # The next record takes the torn one's place and sequence number.
    nxt = log.append(KIND_DATA, 1, 0, BLOCK, pattern(7, BLOCK))
    assert (nxt.seq, nxt.virt) == (last.seq, last.virt)
    log.sync_now()
    crash_log(log)
    _, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(r) for r in good] + [key(nxt)]


def test_a_torn_record_in_the_middle_ends_the_chain(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    recs = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK)) for i in range(6)]
    crash_log(log)
    tear_payload(path, recs[2])
    _, found = WriteLog.open(path)
    assert [key(r) for r in found] == [key(r) for r in recs[:2]]


# -- wrap-around -------------------------------------------------------------------------------


def fill_lap(log: WriteLog, first_tag: int = 0) -> list[Record]:
    """Appends 8 MiB records until the next one would not fit in this lap."""
    out: list[Record] = []
    lap = log.head // DATA_SIZE
    while (log.head + HEADER_SIZE + BIG) // DATA_SIZE == lap and log.fits(HEADER_SIZE + BIG):
        out.append(log.append(KIND_DATA, 1, 0, BIG, pattern(first_tag + len(out), BIG)))
    return out


def test_stale_records_of_an_earlier_lap_are_not_resurrected(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    lap0 = fill_lap(log)
    assert len(lap0) == 15
    destage_log(log, lap0[-1])
    # The next record does not fit at the end of the lap: it goes to the start of lap 1,
    # over lap0[0]; the one after it goes over lap0[1].
    r15 = log.append(KIND_DATA, 1, 0, BIG, pattern(100, BIG))
    r16 = log.append(KIND_DATA, 1, 0, BIG, pattern(101, BIG))
    assert r15.virt == DATA_SIZE and r15.payload_pos == lap0[0].payload_pos
    assert r16.payload_pos == lap0[1].payload_pos
    log.sync_now()
    crash_log(log)

    # lap0[2:] are intact on disk right behind r16: they must not be chained after it.
    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(r15), key(r16)]
    assert log.read(r16.payload_pos, BIG) == pattern(101, BIG)

    # Destage both: the tail now sits exactly on the stale lap0[2].
    destage_log(log, r16)
    assert log.tail % DATA_SIZE == lap0[2].virt
    crash_log(log)
    log, recs = WriteLog.open(path)
    assert recs == []
    assert log.used == 0 and log.head == r16.virt + r16.size
    log.close()


def test_a_stale_record_with_a_matching_seq_fails_the_position_check(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    lap0 = fill_lap(log)
    destage_log(log, lap0[-1])
    r15 = log.append(KIND_DATA, 1, 0, BIG, pattern(100, BIG))
    destage_log(log, r15)
    crash_log(log)
    # Forge lap0[1] (right behind r15) to carry the sequence number recovery looks for,
    # with a good CRC: only its position (one lap behind) gives it away.
    stale = lap0[1]

    def forge(virt: int) -> None:
        fd = os.open(path, os.O_RDWR)
        hdr_pos = stale.payload_pos - HEADER_SIZE
        fields = list(HEADER.unpack(os.pread(fd, HEADER_SIZE, hdr_pos)))
        fields[5], fields[6], fields[-1] = r15.seq + 1, virt, 0  # seq, virt, crc
        raw = HEADER.pack(*fields)
        crc = crc32c(os.pread(fd, stale.length, stale.payload_pos), crc32c(raw[:-4]))
        os.pwrite(fd, raw[:-4] + struct.pack("<I", crc), hdr_pos)
        os.close(fd)

    forge(stale.virt)
    log, recs = WriteLog.open(path)
    assert recs == []
    crash_log(log)
    # The forgery is otherwise good: with the position of this lap it is accepted.
    forge(stale.virt + DATA_SIZE)
    log, recs = WriteLog.open(path)
    assert [(r.seq, r.virt) for r in recs] == [(r15.seq + 1, stale.virt + DATA_SIZE)]
    log.close()


def test_recovery_follows_a_skip_to_the_next_lap(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    lap0 = fill_lap(log)
    small = log.append(KIND_DATA, 1, 0, BLOCK, pattern(50, BLOCK))  # still fits in lap 0
    destage_log(log, lap0[5])
    skipped = log.append(KIND_DATA, 1, 0, BIG, pattern(51, BIG))  # goes to lap 1
    assert skipped.virt == DATA_SIZE
    log.sync_now()
    crash_log(log)
    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(r) for r in lap0[6:]] + [key(small), key(skipped)]
    log.close()


def test_the_destager_follows_a_skip_that_sits_at_the_tail(tmp_path: Path) -> None:
    """Destaged up to exactly where the writer left the rest of a lap unused: the next
    record to destage is on the next lap, and reading from the tail finds it."""
    log, _ = WriteLog.open(new_log(tmp_path))
    lap0 = fill_lap(log)
    destage_log(log, lap0[5])
    skipped = log.append(KIND_DATA, 1, 0, BIG, pattern(51, BIG))
    assert skipped.virt == DATA_SIZE
    destage_log(log, lap0[-1])
    assert log.tail == lap0[-1].virt + lap0[-1].size < DATA_SIZE
    recs = log.read_records(log.tail, log.tail_seq, log.head, DATA_SIZE)
    assert [key(r) for r in recs] == [key(skipped)]
    log.close()


def test_a_record_that_fills_the_space_exactly_fits(tmp_path: Path) -> None:
    log, _ = WriteLog.open(new_log(tmp_path))
    assert log.fits(DATA_SIZE)
    fill_lap(log)
    rest = DATA_SIZE - log.head
    assert log.fits(rest) and not log.fits(rest + 1)
    last = log.append(KIND_DATA, 1, 0, rest - HEADER_SIZE, pattern(7, rest - HEADER_SIZE))
    assert last.virt + last.size == DATA_SIZE  # in this lap, not skipped to the next
    # The log is full (nothing destaged): an append that did not wait is refused.
    with pytest.raises(LogFullError, match="no room"):
        log.append(KIND_DATA, 1, 0, BLOCK, pattern(8, BLOCK))
    log.close()


def test_the_destager_refuses_a_record_that_is_not_the_expected_one(tmp_path: Path) -> None:
    """``read_records`` checks each header's magic, sequence number and position."""
    log, _ = WriteLog.open(new_log(tmp_path))
    recs = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK)) for i in range(3)]
    fields = list(HEADER.unpack(log.read(DATA_START + recs[1].virt, HEADER_SIZE)))
    for index, value in ((0, 0), (5, recs[1].seq + 7), (6, recs[1].virt + BLOCK)):
        tampered = list(fields)
        tampered[index] = value  # magic, seq, virtual position: one at a time
        os.pwrite(log.fileno(), HEADER.pack(*tampered), DATA_START + recs[1].virt)
        with pytest.raises(LogCorruptError, match=f"record {recs[1].seq} is missing"):
            log.read_records(0, 0, log.head, DATA_SIZE)
    log.close()


def test_sync_after_a_blocking_sync_waits_only_for_newer_records(tmp_path: Path) -> None:
    async def main() -> None:
        log, _ = WriteLog.open(new_log(tmp_path))
        log.append(KIND_DATA, 1, 0, BLOCK, pattern(1, BLOCK))
        log.sync_now()
        syncs = log.syncs
        await log.sync()  # nothing new: already durable
        assert log.syncs == syncs
        log.append(KIND_DATA, 1, BLOCK, BLOCK, pattern(2, BLOCK))
        await log.sync()  # the new record needs its own fdatasync
        assert log.syncs == syncs + 1
        log.close()

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_hold_up_the_next(tmp_path: Path) -> None:
    async def main() -> None:
        log, _ = WriteLog.open(new_log(tmp_path))
        lap0 = fill_lap(log)
        assert not log.fits(HEADER_SIZE + BIG)
        first = log.wait_for_space(HEADER_SIZE + BIG)
        second = log.wait_for_space(HEADER_SIZE + BIG)
        first.cancel()
        destage_log(log, lap0[5])  # frees space: the cancelled one is skipped over
        assert second.done() and log.space_waiters == 1
        log.close()

    asyncio.run(main())


# -- the epoch rule ---------------------------------------------------------------------------


def _torn_run(path: str) -> list[Record]:
    """Run A: four equal records, crash; the second is torn, the last two stay intact."""
    log, _ = WriteLog.open(path)
    recs = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(10 + i, BLOCK)) for i in range(4)]
    crash_log(log)
    tear_payload(path, recs[1])
    return recs


def test_epoch_rule_stale_records_behind_a_torn_tail_stay_dead(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    a = _torn_run(path)

    # Run B finds only a[0], writes nothing and crashes: the stale a[2:] stay dead.
    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(a[0])]
    crash_log(log)

    # Run C writes one record of the same size over the torn a[1] (so a[2] sits exactly
    # where C's next record would go, with the sequence number it would have) and crashes.
    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(a[0])]
    b1 = log.append(KIND_DATA, 1, 20 * BLOCK, BLOCK, pattern(20, BLOCK))
    assert (b1.virt, b1.seq, b1.size) == (a[1].virt, a[1].seq, a[1].size)
    log.sync_now()
    crash_log(log)

    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(a[0]), key(b1)]
    crash_log(log)


def test_epoch_rule_holds_after_the_new_records_are_destaged(tmp_path: Path) -> None:
    """Same as above, but run C destages its record before crashing: the tail then points
    at the stale a[2], and nothing in the log before it tells recovery its epoch is old."""
    path = new_log(tmp_path)
    a = _torn_run(path)
    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [key(a[0])]
    b1 = log.append(KIND_DATA, 1, 20 * BLOCK, BLOCK, pattern(20, BLOCK))
    log.sync_now()
    destage_log(log, b1)
    assert (log.tail, log.tail_seq) == (a[2].virt, a[2].seq)
    crash_log(log)

    log, recs = WriteLog.open(path)
    assert [key(r) for r in recs] == [], "stale records of a crashed run were resurrected"
    crash_log(log)


def test_epoch_rule_engine_flushed_write_is_not_overwritten_by_stale_data(
    tmp_path: Path,
) -> None:
    """The same as seen by a client: after a power loss tore one write, the next run
    writes, flushes and destages block 2; a later restart must still read that data."""

    async def run_a() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        for i in range(4):
            vol.write(i * BLOCK, pattern(10 + i, BLOCK))
        await engine.flush()
        crash_engine(engine)

    async def run_b() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        assert bytes(vol.read(0, BLOCK)) == pattern(10, BLOCK)
        assert bytes(vol.read(BLOCK, 3 * BLOCK)) == bytes(3 * BLOCK)  # torn tail dropped
        vol.write(2 * BLOCK, pattern(20, BLOCK))
        await engine.flush()
        destager = Destager(engine)
        await destager.drain()
        engine.close()  # even a clean shutdown

    asyncio.run(run_a())
    log, recs = WriteLog.open(str(tmp_path / "writelog"))
    log.close()
    tear_payload(str(tmp_path / "writelog"), recs[1])
    asyncio.run(run_b())

    engine = open_engine(tmp_path)
    vol = engine.volumes["vol0"]
    try:
        assert bytes(vol.read(0, BLOCK)) == pattern(10, BLOCK)
        assert bytes(vol.read(BLOCK, BLOCK)) == bytes(BLOCK)
        assert bytes(vol.read(2 * BLOCK, BLOCK)) == pattern(20, BLOCK), (
            "a write flushed by the previous run reads back as stale data of a torn run"
        )
        assert bytes(vol.read(3 * BLOCK, BLOCK)) == bytes(BLOCK)
    finally:
        engine.close()


# -- superblock ---------------------------------------------------------------------------


def super_generation(path: str, slot: int) -> int:
    """The generation field of a superblock slot (magic 8 bytes, version 4, generation 8)."""
    with open(path, "rb") as f:
        f.seek(slot * SUPER_SLOT_SIZE + 12)
        return int(struct.unpack("<Q", f.read(8))[0])


@pytest.mark.parametrize("slot", [0, 1])
def test_one_damaged_superblock_slot_still_opens(tmp_path: Path, slot: int) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    recs = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK)) for i in range(3)]
    log.sync_now()
    crash_log(log)
    tear(path, slot * SUPER_SLOT_SIZE + 20, 8)

    log, found = WriteLog.open(path)
    assert [key(r) for r in found] == [key(r) for r in recs]
    epoch = log.epoch
    crash_log(log)
    # The reopen rewrote a slot; the log keeps opening with a rising epoch.
    log, found = WriteLog.open(path)
    assert [key(r) for r in found] == [key(r) for r in recs]
    assert log.epoch > epoch
    log.close()


def test_newest_superblock_slot_damaged_falls_back_to_an_older_tail(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    recs = [log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK)) for i in range(4)]
    log.sync_now()
    destage_log(log, recs[1])  # newest slot: tail at recs[2]
    crash_log(log)
    newest = max((0, 1), key=lambda slot: super_generation(path, slot))
    tear(path, newest * SUPER_SLOT_SIZE + 20, 8)
    log, found = WriteLog.open(path)
    # The older tail is still valid: the records behind it were never overwritten.
    assert [key(r) for r in found] == [key(r) for r in recs]
    log.close()


@pytest.mark.parametrize("content", ["zeroes", "random", "empty", "both_slots_damaged"])
def test_a_file_that_is_not_a_log_is_refused(tmp_path: Path, content: str) -> None:
    path = str(tmp_path / "notalog")
    if content == "zeroes":
        Path(path).write_bytes(bytes(DATA_START + 4 * BLOCK))
    elif content == "random":
        Path(path).write_bytes(random.Random(1).randbytes(DATA_START + 4 * BLOCK))
    elif content == "empty":
        Path(path).write_bytes(b"")
    else:
        WriteLog.create(path, LOG_SIZE)
        log, _ = WriteLog.open(path)
        log.close()
        tear(path, 0, DATA_START)
    with pytest.raises(LogCorruptError):
        WriteLog.open(path)


# -- group commit -----------------------------------------------------------------------------


def test_group_commit_many_concurrent_syncs_few_fdatasyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one fdatasync is in flight (held until the test lets it go), 199 more writers
    append and ask for a sync: they all share the next fdatasync, two in all; a sync with
    nothing new appended costs none."""
    path = new_log(tmp_path)
    log, _ = WriteLog.open(path)
    real = os.fdatasync
    # (next_seq when the fdatasync started, finished?) per call
    calls: list[list[int]] = []
    first_started, release_first = threading.Event(), threading.Event()

    def held_fdatasync(fd: int) -> None:
        entry = [log.next_seq, 0]
        calls.append(entry)
        if len(calls) == 1:
            first_started.set()
            if not release_first.wait(30):
                raise TimeoutError("the test never let the first fdatasync go")
        real(fd)
        entry[1] = 1

    monkeypatch.setattr(os, "fdatasync", held_fdatasync)
    writers = 200
    waiting = 0
    all_waiting = asyncio.Event()

    async def writer(i: int) -> None:
        nonlocal waiting
        rec = log.append(KIND_DATA, 1, i * BLOCK, BLOCK, pattern(i, BLOCK))
        waiting += 1
        if waiting == writers:
            all_waiting.set()
        await log.sync()  # runs up to its first await in this step: its target is taken
        # Durable: an fdatasync that started after this append has finished.
        assert any(start > rec.seq and done for start, done in calls), i

    async def main() -> None:
        tasks = [asyncio.create_task(writer(0))]
        assert await asyncio.to_thread(first_started.wait, 30), "no fdatasync started"
        tasks += [asyncio.create_task(writer(i)) for i in range(1, writers)]
        await asyncio.wait_for(all_waiting.wait(), 30)
        assert not any(done for _, done in calls)  # the first is still held
        release_first.set()
        await asyncio.gather(*tasks)
        before = log.syncs
        await asyncio.gather(*(log.sync() for _ in range(50)))  # nothing new: no fdatasync
        assert log.syncs == before

    asyncio.run(main())
    # The one in flight covered writer 0 alone; the next, every other writer.
    assert [start for start, _ in calls] == [1, writers]
    assert log.syncs == len(calls) == 2
    log.close()


def test_sync_failure_reaches_every_waiter_and_a_retry_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = WriteLog.open(new_log(tmp_path))
    real = os.fdatasync
    fail = [True]

    def flaky(fd: int) -> None:
        if fail[0]:
            raise OSError(5, "EIO")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)

    async def main() -> None:
        log.append(KIND_DATA, 1, 0, BLOCK, pattern(1, BLOCK))
        results = await asyncio.gather(*(log.sync() for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        fail[0] = False
        await log.sync()
        assert log.syncs == 1

    asyncio.run(main())
    log.close()


# -- waiting for space ---------------------------------------------------------------------


def test_full_log_waits_until_the_destager_frees_space(tmp_path: Path) -> None:
    model = Model(VOL_SIZE)

    async def main() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        log = engine.log
        n = 0
        while log.fits(Volume.log_bytes_for_write(0, BIG)):
            data = pattern(n, BIG)
            vol.write((n % 8) * BIG, data)
            model.write((n % 8) * BIG, data)
            n += 1
        assert n == 15
        need = Volume.log_bytes_for_write(0, BIG)
        first = log.wait_for_space(need)
        second = log.wait_for_space(HEADER_SIZE + BLOCK)
        await asyncio.sleep(0.3)
        assert not first.done() and not second.done()
        assert log.space_waiters == 2

        # Only the waiters make it destage: not full enough, never idle long enough.
        destager = Destager(engine, start_fill=1.0, idle_seconds=3600.0, batch_bytes=16 * MIB)
        destager.start()
        await asyncio.wait_for(asyncio.shield(first), 10)
        assert destager.batches >= 1
        # FIFO: the second waiter fits too, but waits until the first one has appended.
        await asyncio.sleep(0.05)
        assert not second.done()
        data = pattern(100, BIG)
        vol.write(3 * BIG, data)
        model.write(3 * BIG, data)
        log.waiter_done()
        await asyncio.wait_for(asyncio.shield(second), 10)
        vol.write(5 * BLOCK + 7, b"abc")
        model.write(5 * BLOCK + 7, b"abc")
        log.waiter_done()
        assert log.space_waiters == 0
        check_volume(vol, model)
        await destager.stop()
        await engine.flush()
        crash_engine(engine)

    asyncio.run(main())
    engine = open_engine(tmp_path)
    check_volume(engine.volumes["vol0"], model)
    engine.close()


# -- the destager --------------------------------------------------------------------------


def _merge_workload(vol: Volume, model: Model) -> None:
    def write(off: int, data: bytes) -> None:
        vol.write(off, data)
        model.write(off, data)

    for i in range(10):  # block 7, ten times
        write(7 * BLOCK, pattern(700 + i, BLOCK))
    write(100 * BLOCK, pattern(1, 4 * BLOCK))
    write(1500 * BLOCK, pattern(2, BLOCK))  # under the big trim below: gone
    vol.zero_blocks(200 * BLOCK, 10 * BLOCK, punch=False)
    model.zero(200 * BLOCK, 10 * BLOCK)
    write(205 * BLOCK, pattern(3, BLOCK))  # newer than the zero: stays
    vol.trim(1000 * BLOCK + 100, 2001 * BLOCK)  # big: an interval; partial edges untouched
    model.trim(1000 * BLOCK + 100, 2001 * BLOCK)
    write(2000 * BLOCK, pattern(4, BLOCK))  # newer than the trim: stays
    vol.write_zeroes(5000 * BLOCK - 10, 600 * BLOCK + 20, punch=False)  # big, no punch
    model.zero(5000 * BLOCK - 10, 600 * BLOCK + 20)
    write(5100 * BLOCK + 5, pattern(5, 3 * BLOCK))  # unaligned, inside the zeroed range
    vol.trim(6000 * BLOCK, 2 * BLOCK)  # small trim: per block
    model.trim(6000 * BLOCK, 2 * BLOCK)
    write(6001 * BLOCK, pattern(6, BLOCK))


def test_destager_merges_a_batch(tmp_path: Path) -> None:
    model = Model(VOL_SIZE)
    writes: list[tuple[int, int]] = []
    zeroes: list[tuple[int, int, bool]] = []
    batches: list[Batch] = []

    async def upload(batch: Batch) -> None:
        batches.append(batch)

    async def main() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        # Something to see in the base first: blocks the trims and zeroes must clear.
        for off in (1000, 1500, 1999, 3000, 5000, 5300, 5599, 6000, 6001):
            vol.write(off * BLOCK, pattern(off, BLOCK))
            model.write(off * BLOCK, pattern(off, BLOCK))
        destager = Destager(engine, upload=upload)
        await destager.drain()
        assert not vol.index.blocks and not vol.index.intervals

        _merge_workload(vol, model)
        spy_base(vol, writes, zeroes)
        batches.clear()
        assert await destager.destage_once()
        assert engine.log.used == 0, "everything fits one batch"
        assert not vol.index.blocks and not vol.index.intervals
        check_volume(vol, model)
        engine.close()

    asyncio.run(main())
    (batch,) = batches
    changes = batch.volumes[1]
    assert set(changes.blocks) == {
        7,
        *range(100, 104),
        *range(200, 210),
        2000,
        4999,
        *range(5100, 5104),
        5600,
        6000,
        6001,
    }
    assert changes.zero_ranges == [
        (1001 * BLOCK, 2000 * BLOCK, True),
        (5000 * BLOCK, 600 * BLOCK, False),
    ]
    covering_7 = [w for w in writes if w[0] <= 7 * BLOCK < w[0] + w[1]]
    assert covering_7 == [(7 * BLOCK, BLOCK)], "block 7 must be written once"
    written = sorted(b for off, n in writes for b in range(off // BLOCK, (off + n) // BLOCK))
    assert len(written) == len(set(written)), "a block was written twice in one batch"
    assert len(written) == 14
    assert (1001 * BLOCK, 2000 * BLOCK, True) in zeroes
    assert base_bytes(tmp_path) == bytes(model.data)


def spy_base(
    vol: Volume, writes: list[tuple[int, int]], zeroes: list[tuple[int, int, bool]]
) -> None:
    """Records what the destager writes to the base store (whichever way it copies)."""
    base = vol.base
    inside = [False]
    real_write, real_zero = base.write, base.zero

    def spy_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        if not inside[0]:
            writes.append((offset, len(data)))
        real_write(offset, data)

    def spy_zero(offset: int, length: int, punch: bool) -> None:
        zeroes.append((offset, length, punch))
        real_zero(offset, length, punch)

    base.write = spy_write  # type: ignore[method-assign]
    base.zero = spy_zero  # type: ignore[method-assign]
    real_copy = getattr(base, "copy_from", None)
    if real_copy is not None:

        def spy_copy(src_fd: int, src_offset: int, offset: int, length: int) -> None:
            writes.append((offset, length))
            inside[0] = True
            try:
                real_copy(src_fd, src_offset, offset, length)
            finally:
                inside[0] = False

        base.copy_from = spy_copy  # type: ignore[method-assign]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_ops_destage_and_recovery_match_a_model(tmp_path: Path, seed: int) -> None:
    """Random writes, zeroes and trims; random destage steps (small batches) and crashes;
    the volume always reads as the model, and after drain() the base file is the model."""
    rng = random.Random(seed)
    size = 8 * MIB
    model = Model(size)

    def op(vol: Volume) -> None:
        kind = rng.random()
        aligned = rng.random() < 0.4
        if kind < 0.7:
            n = rng.choice([rng.randint(1, 3 * BLOCK), rng.randint(1, 64) * BLOCK])
            off = rng.randrange(0, size - n + 1)
            if aligned:
                off &= ~(BLOCK - 1)
                n = min(n, size - off)
            data = rng.randbytes(n)
            vol.write(off, data)
            model.write(off, data)
            return
        n = rng.choice([rng.randint(1, 8 * BLOCK), rng.randint(SMALL_ZERO_BLOCKS, 600) * BLOCK])
        off = rng.randrange(0, size - n + 1)
        if aligned:
            off &= ~(BLOCK - 1)
        if kind < 0.85:
            vol.write_zeroes(off, n, punch=rng.random() < 0.5)
            model.zero(off, n)
        else:
            vol.trim(off, n)
            model.trim(off, n)

    async def session(final: bool) -> None:
        engine = open_engine(tmp_path, size)
        vol = engine.volumes["vol0"]
        check_volume(vol, model, chunk=MIB)
        destager = Destager(engine, batch_bytes=rng.choice([64 * 1024, 256 * 1024, MIB]))
        for _ in range(rng.randint(50, 150)):
            op(vol)
            if rng.random() < 0.1:
                await destager.destage_once()
                check_volume(vol, model, chunk=MIB)
        check_volume(vol, model, chunk=MIB)
        if final:
            await destager.drain()
            assert engine.log.used == 0
            assert not vol.index.blocks and not vol.index.intervals
            engine.close()
        else:
            crash_engine(engine)

    for i in range(4):
        asyncio.run(session(final=i == 3))
    assert base_bytes(tmp_path) == bytes(model.data)


def test_reclaim_keeps_entries_owned_by_newer_records(tmp_path: Path) -> None:
    """Writes that land while a batch is being uploaded (after it was read, before it is
    applied and reclaimed) keep their index entries and win over the batch."""
    model = Model(VOL_SIZE)

    async def main() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]

        def write(off: int, data: bytes) -> None:
            vol.write(off, data)
            model.write(off, data)

        write(0, pattern(1, 8 * BLOCK))
        vol.zero_blocks(20 * BLOCK, 4 * BLOCK, punch=True)
        vol.zero_blocks(1000 * BLOCK, 1000 * BLOCK, punch=True)  # an interval
        model.zero(20 * BLOCK, 4 * BLOCK)
        model.zero(1000 * BLOCK, 1000 * BLOCK)

        async def upload(batch: Batch) -> None:
            assert len(batch.records) == 3
            write(2 * BLOCK, pattern(2, BLOCK))  # newer data over batch data
            write(21 * BLOCK, pattern(3, BLOCK))  # newer data over a batch zero
            vol.zero_blocks(22 * BLOCK, BLOCK, punch=False)  # newer zero over a batch zero
            model.zero(22 * BLOCK, BLOCK)
            write(1500 * BLOCK, pattern(4, BLOCK))  # newer data inside a batch interval
            vol.zero_blocks(1700 * BLOCK, 300 * BLOCK, punch=True)  # newer interval
            model.zero(1700 * BLOCK, 300 * BLOCK)
            vol.zero_blocks(4 * BLOCK, 2 * BLOCK, punch=True)  # newer zero over batch data
            model.zero(4 * BLOCK, 2 * BLOCK)

        destager = Destager(engine, upload=upload)
        assert await destager.destage_once()
        check_volume(vol, model)
        idx: ExtentIndex = vol.index
        assert set(idx.blocks) == {2, 4, 5, 21, 22, 1500}
        assert [(iv.start, iv.end) for iv in idx.intervals] == [(1700, 2000)]
        await engine.flush()
        crash_engine(engine)

    asyncio.run(main())
    engine = open_engine(tmp_path)
    check_volume(engine.volumes["vol0"], model)

    async def drain() -> None:
        await Destager(engine).drain()

    asyncio.run(drain())
    engine.close()
    assert base_bytes(tmp_path) == bytes(model.data)


def test_index_reclaim_only_drops_its_own_entries() -> None:
    idx = ExtentIndex()
    idx.add_data(5, 2, 10_000)
    idx.add_data(6, 1, 50_000)  # newer record for block 6
    idx.reclaim_data(5, 2, 10_000)
    assert idx.blocks == {6: 50_000}
    idx.add_zero(10, 2, virt=100, trim=False)
    idx.add_zero(11, 1, virt=200, trim=True)
    idx.reclaim_zero(10, 2, virt=100, trim=False)
    assert list(idx.blocks) == [6, 11]
    idx.add_zero(0, 1000, virt=300, trim=True)
    idx.add_zero(500, 1000, virt=400, trim=False)
    idx.add_data(600, 1, 70_000)
    idx.reclaim_zero(0, 1000, virt=300, trim=True)
    assert [(iv.start, iv.end, iv.virt) for iv in idx.intervals] == [(500, 1500, 400)]
    assert idx.blocks == {600: 70_000}


# -- destaging past records a crash left behind ----------------------------------------------


def test_destager_skips_a_torn_record_the_writer_skipped_over(tmp_path: Path) -> None:
    """Power loss tore the last record of a lap. The next run puts its first record (too
    big for the rest of the lap) at the start of the next lap. The destager must destage
    that record, not the torn one, and the flushed data must survive a restart."""
    model = Model(VOL_SIZE)
    log_path = str(tmp_path / "writelog")

    async def run_a() -> Record:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        for i in range(4):  # 120 MiB: less than 8 MiB of the lap is left
            vol.write(0, pattern(i, 30 * MIB))
            model.write(0, pattern(i, 30 * MIB))
        await Destager(engine).drain()
        assert HEADER_SIZE + BLOCK < DATA_SIZE - engine.log.head < HEADER_SIZE + BIG
        rec = vol.write(0, pattern(10, BLOCK))  # never durable: power loss tears it
        crash_engine(engine)
        return rec

    async def run_b() -> None:
        engine = open_engine(tmp_path)
        vol = engine.volumes["vol0"]
        assert engine.log.used == 0
        check_volume(vol, model)
        rec = vol.write(0, pattern(11, BIG))  # does not fit in the lap: next lap
        model.write(0, pattern(11, BIG))
        assert rec.virt % DATA_SIZE == 0
        await engine.flush()
        destager = Destager(engine)
        for _ in range(3):
            await asyncio.wait_for(destager.destage_once(), 10)
        assert engine.log.used == 0, "the destager is stuck behind the torn record"
        check_volume(vol, model)
        crash_engine(engine)

    torn = asyncio.run(run_a())
    tear_payload(log_path, torn)
    asyncio.run(run_b())
    engine = open_engine(tmp_path)
    try:
        check_volume(engine.volumes["vol0"], model)
    finally:
        engine.close()


# -- helpers under test ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 1), (4095, 2), (100, BLOCK), (BLOCK, 3 * BLOCK + 1)]
)
def test_unaligned_write_keeps_the_rest_of_its_blocks(
    tmp_path: Path, offset: int, length: int
) -> None:
    engine = open_engine(tmp_path)
    vol = engine.volumes["vol0"]
    model = Model(VOL_SIZE)
    vol.write(0, pattern(1, 8 * BLOCK))
    model.write(0, pattern(1, 8 * BLOCK))
    data = pattern(2, length)
    rec = vol.write(offset, data)
    model.write(offset, data)
    assert rec.offset % BLOCK == 0 and rec.length % BLOCK == 0
    assert rec.length <= Volume.log_bytes_for_write(offset, length) - HEADER_SIZE
    check_volume(vol, model, chunk=MIB)
    engine.close()
