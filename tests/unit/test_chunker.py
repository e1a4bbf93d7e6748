"""The chunker: a batch laid over the base store gives exactly the new chunk versions."""

from __future__ import annotations

import itertools
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgw.gateway.volume.chunker import iter_chunks, touched_chunks
from sgw.gateway.volume.destager import ZERO_KEEP, VolumeChanges, merge
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.index import BLOCK

VOL_BLOCKS = 600  # > SMALL_ZERO_BLOCKS, so large zero ranges (intervals) happen too
LOG_SIZE = 129 << 20

op = st.tuples(
    st.sampled_from(["write", "zero", "trim"]),
    st.integers(0, VOL_BLOCKS - 1),
    st.integers(1, 400),
    st.integers(1, 255),
)


class CountingReader:
    """A base store that records what was read."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def readinto(self, buf: memoryview, offset: int) -> None:
        self.reads.append((offset, len(buf)))
        buf[:] = self.data[offset : offset + len(buf)]


class NoReads:
    def readinto(self, buf: memoryview, offset: int) -> None:
        raise AssertionError(f"read {len(buf)} bytes at {offset}; nothing should be read")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(op, min_size=1, max_size=20),
    chunk_blocks=st.sampled_from([1, 3, 7, 16, 256]),
    seed=st.integers(0, 1 << 30),
)
def test_chunks_equal_the_volume_after_the_batch(
    tmp_path: Path, ops: list[tuple[str, int, int, int]], chunk_blocks: int, seed: int
) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh engine for every example
    size = VOL_BLOCKS * BLOCK
    engine = VolumeEngine.open(
        str(d), str(d / "log"), LOG_SIZE, [VolumeSpec("v", size, str(d / "v.img"))]
    )
    try:
        vol = engine.volumes["v"]
        rng = random.Random(seed)
        # The base holds an older state: some blocks of data, the rest holes.
        before = bytearray(size)
        for _ in range(rng.randrange(0, 30)):
            b = rng.randrange(VOL_BLOCKS)
            block = rng.randbytes(BLOCK)
            before[b * BLOCK : (b + 1) * BLOCK] = block
        vol.base.write(0, before)
        after = bytearray(before)
        for kind, first, count, fill in ops:
            n = min(count, VOL_BLOCKS - first)
            off, length = first * BLOCK, n * BLOCK
            if kind == "write":
                vol.write(off, bytes([fill]) * length)
                after[off : off + length] = bytes([fill]) * length
            elif kind == "zero":
                vol.write_zeroes(off, length, punch=bool(fill & 1))
                after[off : off + length] = bytes(length)
            else:
                vol.trim(off, length)
                after[off : off + length] = bytes(length)
        log = engine.log
        records = log.read_records(log.tail, log.tail_seq, log.head, 1 << 40)
        changes = merge(engine, records, point_in_time=True).volumes[vol.id]
        chunk_size = chunk_blocks * BLOCK
        base = CountingReader(before)
        out = list(iter_chunks(changes, base, log, size=size, chunk_size=chunk_size))

        indexes = [i for i, _ in out]
        assert indexes == sorted(set(indexes))
        rebuilt = bytearray(before)
        for index, data in out:
            start = index * chunk_size
            expect = after[start : start + chunk_size]
            if data is None:
                assert expect == bytes(len(expect)), f"chunk {index} is not zero"
                rebuilt[start : start + len(expect)] = bytes(len(expect))
            else:
                assert data == expect, f"chunk {index} differs"
                assert any(data)
                rebuilt[start : start + len(data)] = data
        # Chunks left out are unchanged by the batch.
        assert rebuilt == after
        # The base is read whole-chunk at a time, and only for chunks the batch touches.
        for offset, length in base.reads:
            assert offset % chunk_size == 0
            assert offset // chunk_size in indexes
            assert length == min(chunk_size, size - offset)
    finally:
        engine.close()
        shutil.rmtree(d)  # 129 MiB of preallocated log per example


def test_a_one_tib_trim_streams_without_reading_or_building_chunks() -> None:
    size = 1 << 40
    changes = VolumeChanges(zero_ranges=[(0, size, True)])
    gen = iter_chunks(changes, NoReads(), NoReads(), size=size, chunk_size=1 << 20)
    head = list(itertools.islice(gen, 5000))
    assert head == [(i, None) for i in range(5000)]
    assert touched_chunks(changes, size, 1 << 20) == [(0, 1 << 20)]


def test_chunks_fully_overwritten_by_blocks_need_no_base_read() -> None:
    chunk = 4 * BLOCK
    log_bytes = bytes(range(256)) * (4 * BLOCK // 256)

    class Log:
        def readinto(self, buf: memoryview, pos: int) -> int:
            buf[:] = log_bytes[pos : pos + len(buf)]
            return len(buf)

    # Chunk 0 all from the log; chunk 1 half zeroed by blocks, half from the base.
    changes = VolumeChanges(
        blocks={0: 0, 1: BLOCK, 2: 2 * BLOCK, 3: 3 * BLOCK, 4: ZERO_KEEP, 5: ZERO_KEEP}
    )
    base = CountingReader(b"\x07" * (8 * BLOCK))
    out = list(iter_chunks(changes, base, Log(), size=8 * BLOCK, chunk_size=chunk))
    assert out[0] == (0, log_bytes)
    assert out[1] == (1, bytes(2 * BLOCK) + b"\x07" * (2 * BLOCK))
    assert base.reads == [(chunk, chunk)]


def test_zero_range_partly_covering_a_chunk_keeps_the_rest_of_the_base() -> None:
    size = 10 * BLOCK  # chunks of 4 blocks: the last one is 2 blocks long
    base = CountingReader(b"\x01" * size)
    changes = VolumeChanges(zero_ranges=[(2 * BLOCK, 7 * BLOCK, False)])
    out = dict(iter_chunks(changes, base, NoReads(), size=size, chunk_size=4 * BLOCK))
    assert out[0] == b"\x01" * (2 * BLOCK) + bytes(2 * BLOCK)
    assert out[1] is None  # whole chunk zeroed: not read
    assert out[2] == bytes(BLOCK) + b"\x01" * BLOCK
    assert base.reads == [(0, 4 * BLOCK), (8 * BLOCK, 2 * BLOCK)]
