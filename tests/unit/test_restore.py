"""Unit tests of the lazy restore along an implicit binary tree, on real files in tmp_path.

The snapshot is an in-memory dict of random chunks (some all zero); the volume file starts
full of garbage, so a chunk that was not restored never reads right by accident.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common.errors import (
    ChunkCorruptError,
    RemoteUnavailableError,
    StorageError,
    VolumeStateError,
)
from sgw.gateway.volume.base import FileBaseStore
from sgw.gateway.volume.restore_tree import (
    MARK_SECTOR,
    TreeRestore,
    tree_children,
    tree_depth,
    tree_path,
    tree_root,
)

KIB = 1 << 10
TOKEN = bytes(range(16))


class Snapshot:
    """Random chunks, about one in five all zero; ``fetch`` counts every call."""

    def __init__(self, size: int, chunk_size: int, seed: int = 1, delay: float = 0.0) -> None:
        rng = random.Random(seed)
        self.size = size
        self.chunk_size = chunk_size
        self.n = -(-size // chunk_size)
        self.chunks: list[bytes | None] = []
        for i in range(self.n):
            length = min(chunk_size, size - i * chunk_size)
            self.chunks.append(None if rng.random() < 0.2 else rng.randbytes(length))
        self.delay = delay
        self.fetched: Counter[int] = Counter()
        self.fail: dict[int, int] = {}  # chunk -> failures still to come
        self.short: set[int] = set()  # chunks answered once with a wrong length
        self._rng = random.Random(seed + 1)

    async def fetch(self, index: int) -> bytes | None:
        self.fetched[index] += 1
        if self.delay:
            await asyncio.sleep(self._rng.uniform(0, self.delay))
        if self.fail.get(index):
            self.fail[index] -= 1
            raise RemoteUnavailableError(f"chunk {index}: provider unreachable")
        data = self.chunks[index]
        if index in self.short and data is not None:
            self.short.discard(index)
            return data[:-1]
        return data

    def image(self, offset: int = 0, length: int | None = None) -> bytes:
        whole = b"".join(
            bytes(min(self.chunk_size, self.size - i * self.chunk_size)) if c is None else c
            for i, c in enumerate(self.chunks)
        )
        return whole[offset : None if length is None else offset + length]


class CountingStore(FileBaseStore):
    """A FileBaseStore that counts reads and writes."""

    reads = 0
    writes = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return super().read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        super().write(offset, data)


def volume_file(tmp_path: Path, size: int) -> str:
    """A volume file full of garbage."""
    path = tmp_path / "volume"
    path.write_bytes(random.Random(99).randbytes(size))
    return str(path)


def open_store(path: str, size: int) -> CountingStore:
    return CountingStore(path, size, create=False)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the tree ------------------------------------------------------------------------------


@given(st.integers(0, 3000))
@settings(max_examples=200, deadline=None)
def test_tree_holds_every_chunk_exactly_once(n: int) -> None:
    seen: list[int] = []
    root = tree_root(n)
    stack = [] if root is None else [root]
    while stack:
        node = stack.pop()
        assert node.lo <= node.chunk < node.hi
        seen.append(node.chunk)
        for kid in tree_children(node):
            assert node.lo <= kid.lo < kid.hi <= node.hi
            assert not kid.lo <= node.chunk < kid.hi
            stack.append(kid)
    assert sorted(seen) == list(range(n))


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_path_goes_from_the_root_to_the_chunk(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 10**7), label="n")
    index = data.draw(st.integers(0, n - 1), label="index")
    path = tree_path(n, index)
    assert path[0] == tree_root(n)
    assert path[-1].chunk == index
    assert [node.chunk for node in path[:-1]].count(index) == 0
    for parent, kid in itertools.pairwise(path):
        assert kid in tree_children(parent)
    assert len(path) <= tree_depth(n) == math.ceil(math.log2(n + 1))


def test_depth_bound_is_reached() -> None:
    for n in range(1, 300):
        assert max(len(tree_path(n, i)) for i in range(n)) == tree_depth(n)


def test_path_outside_the_tree_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        tree_path(5, 5)
    with pytest.raises(ValueError, match="outside"):
        tree_path(0, 0)
    assert tree_root(0) is None
    assert tree_depth(0) == 0


# -- marks ---------------------------------------------------------------------------------


def test_mark_checks_magic_token_index_and_crc(tmp_path: Path) -> None:
    size = 4 * 4 * KIB
    store = open_store(volume_file(tmp_path, size), size)
    tr = TreeRestore(store, size, 4 * KIB, TOKEN, Snapshot(size, 4 * KIB).fetch)
    mark = tr.mark(3)
    assert len(mark) == MARK_SECTOR
    assert tr.is_marked(mark, 3)
    assert tr.is_marked(mark + bytes(4096 - MARK_SECTOR), 3)
    assert not tr.is_marked(mark, 2)
    other = TreeRestore(store, size, 4 * KIB, bytes(16), Snapshot(size, 4 * KIB).fetch)
    assert not other.is_marked(mark, 3)
    for pos in range(36):  # magic, token, index, crc: every byte counts
        damaged = bytearray(mark)
        damaged[pos] ^= 0x01
        assert not tr.is_marked(damaged, 3), pos
    assert not tr.is_marked(mark[:35], 3)
    rng = random.Random(5)
    assert not any(tr.is_marked(rng.randbytes(4096), 3) for _ in range(200))


# -- restoring -----------------------------------------------------------------------------

SHAPES = [
    # (chunks, chunk size, size): odd counts, one chunk, a short last chunk
    pytest.param(1, 8 * KIB, 8 * KIB, id="n1"),
    pytest.param(2, 8 * KIB, 16 * KIB, id="n2"),
    pytest.param(3, 16 * KIB, 48 * KIB, id="n3"),
    pytest.param(7, 16 * KIB, 6 * 16 * KIB + 4 * KIB, id="n7-short-tail"),
    pytest.param(1000, 4 * KIB, 1000 * 4 * KIB, id="n1000"),
    pytest.param(37, 64 * KIB, 36 * 64 * KIB + 12 * KIB, id="n37-short-tail"),
]


@pytest.mark.parametrize(("n", "chunk_size", "size"), SHAPES)
def test_background_restores_the_snapshot_exactly(
    tmp_path: Path, n: int, chunk_size: int, size: int
) -> None:
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=n)
    assert snap.n == n

    async def main() -> None:
        tr = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        assert (tr.total, tr.restored, tr.done) == (n, 0, False)
        await tr.begin()
        await tr.run_background(concurrency=3)
        assert (tr.restored, tr.done) == (n, True)
        assert snap.fetched == Counter(range(n))
        # A restart of a finished restore finds everything restored and fetches nothing.
        again = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await again.run_background()
        await again.ensure(0, size)
        assert again.done
        assert snap.fetched == Counter(range(n))

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_ensure_serves_random_ranges_before_the_background(tmp_path: Path) -> None:
    chunk_size, size = 8 * KIB, 299 * 8 * KIB + 4 * KIB
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=7)
    rng = random.Random(3)

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        for _ in range(60):
            offset = rng.randrange(size)
            length = rng.randrange(1, 3 * chunk_size)
            await tr.ensure(offset, length)
            end = min(size, offset + length)
            assert store.read(offset, end - offset) == snap.image(offset, end - offset)
        await tr.ensure(size - 10, 100)  # past the end: clipped
        assert store.read(size - 4 * KIB, 4 * KIB) == snap.image(size - 4 * KIB)
        assert not tr.done
        assert 0 < len(snap.fetched) < snap.n  # lazy: only the paths that were read
        assert max(snap.fetched.values()) == 1

    asyncio.run(main())


def test_ensure_fetches_the_path_once_then_nothing(tmp_path: Path) -> None:
    n, chunk_size = 1000, 4 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=11)

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        done: set[int] = set()
        for target in [0, 999, 500, 123, 124, 777]:
            before = Counter(snap.fetched)
            assert tr.is_restored(target * chunk_size, chunk_size) == (target in done)
            await tr.ensure(target * chunk_size + 5, 1)
            assert tr.is_restored(target * chunk_size, chunk_size)
            fetched = set((snap.fetched - before).keys())
            on_path = {node.chunk for node in tree_path(n, target)}
            assert fetched == on_path - done
            assert len(fetched) <= tree_depth(n)
            done |= on_path
            after = target + 1  # the range reaches into the next chunk
            assert tr.is_restored(target * chunk_size, chunk_size + 1) == (
                after == n or after in done
            )
            assert store.read(target * chunk_size, chunk_size) == snap.image(
                target * chunk_size, chunk_size
            )
            # Again: known restored in memory, no fetch and no disk access at all.
            reads, writes, fetches = store.reads, store.writes, snap.fetched.total()
            await tr.ensure(target * chunk_size, chunk_size)
            assert (store.reads, store.writes, snap.fetched.total()) == (reads, writes, fetches)
        assert tr.restored == len(done)
        assert tr.is_restored(size, 10) and tr.is_restored(0, 0)  # nothing to restore there

    asyncio.run(main())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_concurrent_ensures_and_background_fetch_each_chunk_once(tmp_path: Path, seed: int) -> None:
    n, chunk_size = 257, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=seed, delay=0.002)
    rng = random.Random(seed)

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        ranges = [(rng.randrange(size), rng.randrange(1, 4 * chunk_size)) for _ in range(20)]
        ranges += ranges[:8]  # the same ranges twice
        ranges += [(o + chunk_size // 2, length) for o, length in ranges[:8]]  # overlapping

        async def reader(offset: int, length: int) -> None:
            await asyncio.sleep(rng.uniform(0, 0.02))
            await tr.ensure(offset, length)
            end = min(size, offset + length)
            assert store.read(offset, end - offset) == snap.image(offset, end - offset)

        await asyncio.gather(
            tr.run_background(concurrency=4), *(reader(o, length) for o, length in ranges)
        )
        assert tr.done
        assert snap.fetched == Counter(range(n))
        assert tr.syncs < n  # restores in flight together share their syncs

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_fetch_failure_is_raised_leaves_the_node_marked_and_is_retried(tmp_path: Path) -> None:
    n, chunk_size = 63, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=4)
    target = 40
    failing = tree_path(n, target)[3].chunk
    snap.fail[failing] = 1

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        with pytest.raises(RemoteUnavailableError, match=f"chunk {failing}"):
            await tr.ensure(target * chunk_size, 10)
        assert tr.is_marked(store.read(failing * chunk_size, MARK_SECTOR), failing)
        assert store.read(target * chunk_size, chunk_size) != snap.image(
            target * chunk_size, chunk_size
        )
        await tr.ensure(target * chunk_size, 10)
        assert store.read(target * chunk_size, chunk_size) == snap.image(
            target * chunk_size, chunk_size
        )
        # The background stops at the first failure; run again, it finishes.
        other = next(i for i in range(n) if i not in snap.fetched)
        snap.fail[other] = 1
        with pytest.raises(RemoteUnavailableError):
            await tr.run_background(concurrency=2)
        assert not tr.done
        await tr.run_background(concurrency=2)
        assert tr.done
        assert snap.fetched[failing] == 2 and snap.fetched[other] == 2

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_chunk_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    n, chunk_size = 7, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=8)
    root = tree_path(n, 0)[0].chunk
    snap.chunks[root] = b"\x01" * chunk_size
    snap.short.add(root)

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        with pytest.raises(ChunkCorruptError, match=f"chunk {root} has {chunk_size - 1} bytes"):
            await tr.ensure(0, size)
        assert tr.is_marked(store.read(root * chunk_size, MARK_SECTOR), root)
        await tr.run_background()

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_restart_resumes_without_fetching_restored_chunks(tmp_path: Path) -> None:
    n, chunk_size = 200, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=9)
    rng = random.Random(9)

    async def main() -> None:
        tr = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        for _ in range(15):
            await tr.ensure(rng.randrange(size), 1)
        first = set(snap.fetched)
        snap.fetched.clear()
        # A restart: a new restorer over the same file and token, no begin.
        resumed = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await resumed.run_background(concurrency=2)
        assert resumed.done
        assert not first & set(snap.fetched)
        assert first | set(snap.fetched) == set(range(n))
        assert max(snap.fetched.values()) == 1

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_newer_data_in_restored_chunks_survives_a_restart(tmp_path: Path) -> None:
    n, chunk_size = 31, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=10)
    written: dict[int, bytes] = {}

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        other = TreeRestore(store, size, chunk_size, bytes(16), snap.fetch)
        for target in [0, 15, 7, 29]:
            await tr.ensure(target * chunk_size, chunk_size)
            # What the destager writes next: the chunk's first block, even one that
            # looks like another restore's mark.
            data = other.mark(target) + random.Random(target).randbytes(4096 - MARK_SECTOR)
            store.write(target * chunk_size, data)
            written[target] = data
        store.sync()
        resumed = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await resumed.run_background()

    asyncio.run(main())
    expected = bytearray(snap.image())
    for target, data in written.items():
        expected[target * chunk_size : target * chunk_size + len(data)] = data
    assert file_bytes(path) == bytes(expected)


def test_zero_chunks_are_holes_past_their_first_block(tmp_path: Path) -> None:
    n, chunk_size = 15, 64 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=12)
    zero = [i for i, c in enumerate(snap.chunks) if c is None]
    assert zero

    async def main() -> None:
        store = open_store(path, size)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        await tr.run_background()
        for i in zero:
            assert store.allocated(i * chunk_size + 4 * KIB, chunk_size - 4 * KIB) == [
                (chunk_size - 4 * KIB, True)
            ]

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_stop_returns_early_and_a_later_run_finishes(tmp_path: Path) -> None:
    n, chunk_size = 127, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=13, delay=0.001)

    async def main() -> None:
        tr = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        stop = asyncio.Event()
        fetch = snap.fetch

        async def stopping_fetch(index: int) -> bytes | None:
            if snap.fetched.total() >= 20:
                stop.set()
            return await fetch(index)

        tr._fetch = stopping_fetch
        await tr.run_background(stop=stop)
        assert not tr.done
        assert 20 <= tr.restored < n
        assert not tr._restoring  # nothing left running
        await tr.run_background()
        assert tr.done
        assert snap.fetched == Counter(range(n))

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


class FailingSyncStore(FileBaseStore):
    """A FileBaseStore whose next sync fails with EIO."""

    fail_sync = False

    def sync(self) -> None:
        if self.fail_sync:
            self.fail_sync = False
            raise OSError(errno.EIO, "Input/output error")
        super().sync()


def test_failed_sync_stops_the_restore_until_a_restart(tmp_path: Path) -> None:
    n, chunk_size = 15, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=14)

    async def main() -> None:
        store = FailingSyncStore(path, size, create=False)
        tr = TreeRestore(store, size, chunk_size, TOKEN, snap.fetch)
        await tr.begin()
        store.fail_sync = True
        with pytest.raises(StorageError, match="cannot sync volume disk"):
            await tr.ensure(0, 1)
        with pytest.raises(StorageError, match="restart the gateway"):
            await tr.ensure(0, 1)
        with pytest.raises(StorageError, match="restart the gateway"):
            await tr.run_background()
        resumed = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await resumed.run_background()

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_cancelled_ensure_and_aclose_leave_a_resumable_disk(tmp_path: Path) -> None:
    n, chunk_size = 31, 8 * KIB
    size = n * chunk_size
    path = volume_file(tmp_path, size)
    snap = Snapshot(size, chunk_size, seed=15)
    stuck = tree_path(n, 3)[2].chunk

    async def main() -> None:
        never = asyncio.Event()

        async def hanging_fetch(index: int) -> bytes | None:
            if index == stuck:
                await never.wait()
            return await snap.fetch(index)

        tr = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, hanging_fetch)
        await tr.begin()
        reader = asyncio.create_task(tr.ensure(3 * chunk_size, 1))
        await asyncio.sleep(0.1)
        assert not reader.done() and tr._restoring
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await tr.aclose()
        assert not tr._restoring and not tr._fetches
        resumed = TreeRestore(open_store(path, size), size, chunk_size, TOKEN, snap.fetch)
        await resumed.run_background()

    asyncio.run(main())
    assert file_bytes(path) == snap.image()


def test_empty_snapshot_is_done_at_once(tmp_path: Path) -> None:
    path = volume_file(tmp_path, 4 * KIB)

    async def main() -> None:
        tr = TreeRestore(open_store(path, 4 * KIB), 0, 4 * KIB, TOKEN, Snapshot(0, 4096).fetch)
        assert (tr.total, tr.done) == (0, True)
        await tr.begin()
        await tr.ensure(0, 4 * KIB)
        await tr.run_background()

    asyncio.run(main())
    assert file_bytes(path) == random.Random(99).randbytes(4 * KIB)  # untouched


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    size = 64 * KIB
    store = open_store(volume_file(tmp_path, size), size)
    fetch = Snapshot(size, 8 * KIB).fetch
    with pytest.raises(ValueError, match="16 bytes"):
        TreeRestore(store, size, 8 * KIB, b"short", fetch)
    with pytest.raises(VolumeStateError, match="chunk size 1000"):
        TreeRestore(store, size, 1000, TOKEN, fetch)
    with pytest.raises(VolumeStateError, match="size 5000"):
        TreeRestore(store, 5000, 8 * KIB, TOKEN, fetch)
    with pytest.raises(VolumeStateError, match="less than the snapshot"):
        TreeRestore(store, 2 * size, 8 * KIB, TOKEN, fetch)
    tr = TreeRestore(store, size, 8 * KIB, TOKEN, fetch)
    with pytest.raises(ValueError, match="bad range"):
        asyncio.run(tr.ensure(-1, 10))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(tr.run_background(concurrency=0))
