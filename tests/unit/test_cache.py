"""The chunk cache: LRU order, size bound, pins, persistence, torn and corrupted files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sgw.gateway.volume.chunk_cache import ChunkCache

KIB = 1024


def chunk(seed: int, size: int = 64 * KIB) -> tuple[str, bytes]:
    data = (seed.to_bytes(4, "big") * (size // 4))[:size]
    return hashlib.sha256(data).hexdigest(), data


def read(cache: ChunkCache, cid: str, size: int, offset: int = 0) -> bytes | None:
    buf = bytearray(size)
    if not cache.read_into(cid, offset, memoryview(buf), may_verify=True):
        return None
    return bytes(buf)


def test_hit_miss_and_partial_read(tmp_path: Path) -> None:
    cache = ChunkCache.open(str(tmp_path / "c"), 1 << 20)
    cid, data = chunk(1)
    assert read(cache, cid, 10) is None
    cache.put(cid, data)
    assert read(cache, cid, 4096, 8192) == data[8192 : 8192 + 4096]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.clean_bytes) == (1, 1, 1, len(data))


def test_lru_eviction_keeps_the_size_bound(tmp_path: Path) -> None:
    cache = ChunkCache.open(str(tmp_path / "c"), 4 * 64 * KIB)
    chunks = [chunk(i) for i in range(6)]
    for cid, data in chunks[:4]:
        cache.put(cid, data)
    # Touch chunk 0, so chunk 1 is now the least recently used.
    assert read(cache, chunks[0][0], 16) is not None
    cache.put(*chunks[4])
    assert chunks[1][0] not in cache and chunks[0][0] in cache
    cache.put(*chunks[5])
    assert chunks[2][0] not in cache
    assert cache.clean_bytes <= cache.capacity
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").rglob("*") if f.is_file())
    assert on_disk == cache.clean_bytes == 4 * 64 * KIB
    assert cache.stats().evictions == 2
    assert not (Path(cache.file_path(chunks[1][0]))).exists()


def test_pinned_entries_are_not_evicted(tmp_path: Path) -> None:
    cache = ChunkCache.open(str(tmp_path / "c"), 2 * 64 * KIB)
    a, b, c = chunk(1), chunk(2), chunk(3)
    cache.put(*a, pin=True)
    cache.put(*b)
    cache.put(*c)  # over the bound: b goes although a is older
    assert a[0] in cache and b[0] not in cache and c[0] in cache
    cache.unpin(a[0])
    cache.put(*b)
    assert a[0] not in cache


def test_persistence_rebuilds_lru_from_the_directory(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    cache = ChunkCache.open(path, 1 << 20)
    chunks = [chunk(i) for i in range(4)]
    for n, (cid, data) in enumerate(chunks):
        cache.put(cid, data)
        os.utime(cache.file_path(cid), (1000 + n, 1000 + n))  # insertion order on disk
    reopened = ChunkCache.open(path, 1 << 20)
    assert reopened.clean_bytes == 4 * 64 * KIB
    assert all(cid in reopened for cid, _ in chunks)
    assert not reopened.ready(chunks[0][0])  # unverified until first use
    assert read(reopened, chunks[2][0], 64 * KIB) == chunks[2][1]
    assert reopened.ready(chunks[2][0])
    # A smaller capacity at reopen evicts the oldest files first.
    small = ChunkCache.open(path, 2 * 64 * KIB)
    assert [cid in small for cid, _ in chunks] == [False, False, True, True]


def test_torn_temp_files_and_strangers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "c"
    cache = ChunkCache.open(str(path), 1 << 20)
    cid, data = chunk(7)
    cache.put(cid, data)
    torn = Path(cache.file_path(cid) + ".abcd1234.tmp")
    torn.write_bytes(data[:1000])
    other_id, _ = chunk(8)
    (path / other_id[:2]).mkdir(exist_ok=True)
    (path / other_id[:2] / f"{other_id}.deadbeef.tmp").write_bytes(b"half")
    (path / "junk").write_bytes(b"x")
    reopened = ChunkCache.open(str(path), 1 << 20)
    assert not torn.exists() and not (path / "junk").exists()
    assert other_id not in reopened
    assert reopened.stats().entries == 1
    assert read(reopened, cid, len(data)) == data


def test_corrupted_file_is_detected_and_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    cache = ChunkCache.open(path, 1 << 20)
    cid, data = chunk(9)
    cache.put(cid, data)
    with open(cache.file_path(cid), "r+b") as f:  # bit rot, or a write lost in a crash
        f.seek(5000)
        f.write(b"\xff")
    reopened = ChunkCache.open(path, 1 << 20)
    # On the event loop (no hashing allowed) an unverified entry is a miss.
    buf = memoryview(bytearray(16))
    assert not reopened.read_into(cid, 0, buf, may_verify=False)
    assert not reopened.verify(cid)
    assert cid not in reopened and not os.path.exists(reopened.file_path(cid))
    assert reopened.stats().corrupt == 1
    # Fetched again, the good copy is served.
    reopened.put(cid, data)
    assert read(reopened, cid, len(data)) == data


def test_truncated_file_is_corrupt_too(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    cache = ChunkCache.open(path, 1 << 20)
    cid, data = chunk(10)
    cache.put(cid, data)
    os.truncate(cache.file_path(cid), 100)
    reopened = ChunkCache.open(path, 1 << 20)
    assert read(reopened, cid, 16) is None
    assert cid not in reopened
