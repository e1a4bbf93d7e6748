"""The chunk cache: clean copies of committed chunks on the cache disk, bounded, LRU.

For now the cache is a directory of chunk files (``<dir>/<id[:2]>/<id>``, the chunk's
plaintext, so a read of 4 KiB is one ``pread``); a raw cache device with its own
allocator can replace it behind the same methods. Chunks are content addressed by the
SHA-256 of their plaintext, so an entry never goes stale: a newer version of a volume's
chunk is a different entry, and volumes sharing data share entries.

Every entry is *clean*: the write log holds a volume's dirty data until the destager has
uploaded and committed it, and only then does the cache see the new versions. So the
cache never needs writeback and any entry may be dropped at any time; dirty bytes are
accounted where they live (``Volume.dirty_bytes``, the volume's blocks held in the log).

Crash safety without fsync: a file is written under a temporary name and renamed into
place, so a reader never sees a half-written one under its final name; temporary files
are deleted when the cache is opened. A crash may still leave a renamed file whose data
never reached the disk, so every file found at open is *unverified* and its SHA-256 is
checked once (``verify``) before it is first served; a mismatch drops the file and the
chunk is fetched again. Files written by this process are trusted.

The LRU order is rebuilt at open from the files' modification times (insertion order, an
approximation of the last run's use). The cache is shared by threads (the NBD read pool,
the upload step) and the event loop: metadata changes are under one lock, data is read
and written outside it. Pinned entries (a read in progress that must not lose its chunk
to a concurrent insert) are never evicted.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass

from sgw.common.errors import StorageError

LOG = logging.getLogger(__name__)

_ID = re.compile(r"[0-9a-f]{64}")
_TMP_SUFFIX = ".tmp"
# Bytes hashed per read while verifying a file (bounds memory for any chunk size).
_VERIFY_READ = 1 << 20


@dataclass(slots=True)
class _Entry:
    size: int
    verified: bool
    pins: int = 0


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds (all clean) and how it has been used since start."""

    capacity: int  # bytes
    clean_bytes: int  # bytes of chunk data held
    entries: int
    hits: int
    misses: int
    inserts: int
    evictions: int
    corrupt: int  # files dropped because their content did not match their id


class ChunkCache:
    """A size-bounded, persistent, content-addressed store of chunk plaintexts."""

    def __init__(self, path: str, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"cache size {capacity} must be positive")
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.inserts = 0
        self.evictions = 0
        self.corrupt = 0

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, capacity: int, *, cleanup: bool = True) -> ChunkCache:
        """Opens (creating) the cache directory and rebuilds the LRU order from it.

        Temporary files and files that are not named like a chunk are deleted (unless
        ``cleanup`` is False: a standby daemon, while the running one still writes); every
        file found is served only after its hash was checked once.
        """
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create cache directory {path}: {exc.strerror}") from exc
        cache = cls(path, capacity)
        found: list[tuple[float, str, int]] = []
        removed = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                full = os.path.join(dirpath, name)
                if _ID.fullmatch(name) and dirpath == os.path.join(path, name[:2]):
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime, name, st.st_size))
                    continue
                if not cleanup:
                    continue
                try:  # a torn temporary file, or something that does not belong here
                    os.unlink(full)
                    removed += 1
                except OSError:
                    pass
        found.sort()
        with cache._lock:
            for _mtime, cid, size in found:
                cache._entries[cid] = _Entry(size, verified=False)
                cache._bytes += size
            victims = cache._evict_locked()
        LOG.info(
            "chunk cache opened",
            extra={
                "path": path,
                "capacity": capacity,
                "entries": len(cache._entries),
                "bytes": cache._bytes,
                "removed_files": removed,
                "evicted": victims,
            },
        )
        return cache

    # -- queries -------------------------------------------------------------------------

    def file_path(self, cid: str) -> str:
        """Where the chunk ``cid`` lives (whether or not it is cached)."""
        return os.path.join(self.path, cid[:2], cid)

    def ready(self, cid: str) -> bool:
        """True if the chunk is cached and may be served without hashing it first."""
        entry = self._entries.get(cid)
        return entry is not None and entry.verified

    def __contains__(self, cid: object) -> bool:
        return cid in self._entries

    @property
    def clean_bytes(self) -> int:
        """Bytes of chunk data held (every one of them clean)."""
        return self._bytes

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                self.capacity,
                self._bytes,
                len(self._entries),
                self.hits,
                self.misses,
                self.inserts,
                self.evictions,
                self.corrupt,
            )

    # -- reading -------------------------------------------------------------------------

    def read_into(self, cid: str, offset: int, view: memoryview, *, may_verify: bool) -> bool:
        """Fills ``view`` from the chunk at ``offset``; False on a miss.

        An unverified entry is hashed first when ``may_verify`` (in a worker thread), else
        it counts as a miss (on the event loop, where hashing 1 MiB is too slow).
        """
        if may_verify and cid in self._entries and not self.ready(cid):
            self.verify(cid)
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None or not entry.verified:
                self.misses += 1
                return False
            try:
                fd = os.open(self.file_path(cid), os.O_RDONLY)
            except FileNotFoundError:  # removed behind our back: forget it
                self._drop_locked(cid)
                self.misses += 1
                return False
            self._entries.move_to_end(cid)
            self.hits += 1
        try:
            n = os.preadv(fd, [view], offset)
        finally:
            os.close(fd)
        if n < len(view):
            raise StorageError(
                f"cache file {self.file_path(cid)} is shorter than expected "
                f"({offset + n} of at least {offset + len(view)} bytes)"
            )
        return True

    def verify(self, cid: str) -> bool:
        """Checks an entry's content against its id (blocking: a worker thread); a bad file
        is deleted. Returns True if the chunk is cached and good."""
        entry = self._entries.get(cid)
        if entry is None:
            return False
        if entry.verified:
            return True
        h = hashlib.sha256()
        try:
            with open(self.file_path(cid), "rb") as f:
                while block := f.read(_VERIFY_READ):
                    h.update(block)
        except FileNotFoundError:
            with self._lock:
                self._drop_locked(cid)
            return False
        good = h.hexdigest() == cid
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None:
                return False
            if good:
                entry.verified = True
                return True
            self.corrupt += 1
            self._drop_locked(cid, unlink=True)
        LOG.warning(
            "cache file does not match its chunk id; dropped, it will be fetched again",
            extra={"chunk": cid[:12], "path": self.file_path(cid)},
        )
        return False

    # -- inserting and pinning -----------------------------------------------------------

    def put(self, cid: str, data: bytes | bytearray | memoryview, *, pin: bool = False) -> None:
        """Inserts a chunk whose content is known to match ``cid`` (blocking: a worker
        thread). ``pin`` pins it in the same step, so no concurrent insert can evict it
        before the caller uses it; an existing entry is only touched (and pinned)."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is not None and entry.verified:
                self._entries.move_to_end(cid)
                if pin:
                    entry.pins += 1
                return
        final = self.file_path(cid)
        tmp = f"{final}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        try:
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write cache file {final}: {exc.strerror}") from exc
        with self._lock:
            os.replace(tmp, final)
            old = self._entries.pop(cid, None)
            if old is not None:
                self._bytes -= old.size
            entry = _Entry(len(data), verified=True, pins=(old.pins if old else 0) + pin)
            self._entries[cid] = entry
            self._bytes += entry.size
            self.inserts += 1
            self._evict_locked()

    def pin(self, cid: str) -> bool:
        """Pins a cached, verified entry against eviction; False if it is not there."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None or not entry.verified:
                return False
            entry.pins += 1
            self._entries.move_to_end(cid)
            return True

    def unpin(self, cid: str) -> None:
        """Releases one pin (eviction catches up at the next insert)."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is not None and entry.pins:
                entry.pins -= 1

    def discard(self, cid: str) -> None:
        """Drops an entry and its file (if it is not pinned)."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is not None and not entry.pins:
                self._drop_locked(cid, unlink=True)

    # -- machinery -----------------------------------------------------------------------

    def _drop_locked(self, cid: str, unlink: bool = False) -> None:
        entry = self._entries.pop(cid, None)
        if entry is not None:
            self._bytes -= entry.size
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file_path(cid))

    def _evict_locked(self) -> int:
        """Drops least recently used, unpinned entries until the cache fits its capacity."""
        if self._bytes <= self.capacity:
            return 0
        victims = []
        excess = self._bytes - self.capacity
        for cid, entry in self._entries.items():
            if excess <= 0:
                break
            if entry.pins:
                continue
            victims.append(cid)
            excess -= entry.size
        for cid in victims:
            self._drop_locked(cid, unlink=True)
        self.evictions += len(victims)
        return len(victims)
