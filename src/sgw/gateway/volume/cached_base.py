"""The cached-mode base store: a volume whose primary copy lives at the provider.

A read of the base goes: the volume's chunk map (chunk index -> chunk id, loaded from the
provider at start and updated by every commit of the upload step) -> the shared chunk
cache -> on a miss, the provider. Absent map entries are all-zero chunks.

Not blocking the event loop. NBD reads run inline on the loop, so a read must never wait
for the network there. The NBD server asks ``ready_for`` (dict lookups, no I/O) before an
inline read of a cached volume; when a chunk is missing it awaits ``ensure`` (an async
fetch through the gateway's httpx client, on the loop, with many fetches in flight and no
thread per request), which leaves the chunks cached and *pinned*, then does the inline
read and unpins. Cache hits therefore cost what stored-mode reads cost plus one dict
lookup per chunk, and stored volumes do not pay anything. Callers in worker threads (the
upload step's chunker, the NBD server's large offloaded reads) may miss too: they hand the
fetch to the loop (``run_coroutine_threadsafe``) and block their own thread on it. A miss
on the loop thread itself is a bug and fails the read instead of blocking.

Read-ahead: when reads continue exactly where the previous one ended and the run has
covered two chunks, the next ``read_ahead`` chunks are fetched in the background. One
detector per volume: interleaved sequential streams on one volume look random to it.

Writes never come here: they go to the log, and the destager hands this store the new
chunk versions the upload step built and put into the cache (``apply_update``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sgw.common.errors import RemoteError, StorageError
from sgw.gateway.volume.chunk_cache import ChunkCache

if TYPE_CHECKING:
    from sgw.gateway.volume.remote import BlockApiClient

LOG = logging.getLogger(__name__)

# Chunks fetched ahead of a sequential reader (1 MiB each by default): enough to hide a
# round trip behind a reader consuming a few hundred MB/s, little enough for a small cache.
DEFAULT_READ_AHEAD = 4
# Read-ahead fetches in flight per volume.
_READ_AHEAD_CONCURRENCY = 4
# A worker thread waits this long (seconds) for a fetch it handed to the event loop.
_THREAD_FETCH_TIMEOUT = 60.0


@dataclass
class ChunkMapUpdate:
    """New chunk versions of one volume as committed by the upload step: non-zero chunk
    ids by index, and ``[first, end)`` runs of indexes that became all zero."""

    data: dict[int, str] = field(default_factory=dict)
    zero_runs: list[list[int]] = field(default_factory=list)


class CachedBaseStore:
    """A volume's base: its remote chunk map over the shared chunk cache."""

    def __init__(self, name: str, size: int, cache: ChunkCache, read_ahead: int) -> None:
        self.name = name
        self.size = size
        self.cache = cache
        self.read_ahead = read_ahead
        self.remote_id: str | None = None
        self.chunk_size = 0
        self.map_version = 0
        self.chunks: dict[int, str] = {}
        self._client: BlockApiClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._ready = threading.Event()
        self._ready_async: asyncio.Event | None = None
        self._fetching: dict[str, asyncio.Future[bytes]] = {}
        # Read-ahead detector: where the last read ended, where its sequential run began,
        # and the first chunk not yet scheduled for read-ahead.
        self._last_end = -1
        self._run_start = 0
        self._ahead_next = 0
        self._ahead_slots: asyncio.Semaphore | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.fetches = 0
        self.fetched_bytes = 0
        self.read_ahead_chunks = 0

    # -- lifecycle -----------------------------------------------------------------------

    def attach(self, client: BlockApiClient) -> None:
        """Binds the store to the running event loop and the client it fetches with."""
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ready_async = asyncio.Event()
        self._ahead_slots = asyncio.Semaphore(_READ_AHEAD_CONCURRENCY)
        if self._ready.is_set():
            self._ready_async.set()

    def load(self, remote_id: str, chunk_size: int, version: int, chunks: dict[int, str]) -> None:
        """Takes the remote volume's chunk size and map; reads of the base may go on."""
        if chunk_size <= 0 or chunk_size % 4096:
            raise StorageError(
                f"remote volume {remote_id} has chunk size {chunk_size}, not a multiple of 4 KiB"
            )
        self.remote_id = remote_id
        self.chunk_size = chunk_size
        self.chunks = dict(chunks)
        self.map_version = version
        self._ready.set()
        if self._ready_async is not None:
            self._ready_async.set()

    @property
    def is_ready(self) -> bool:
        """True once the remote map is loaded."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Returns once the remote map is loaded."""
        assert self._ready_async is not None, "attach() first"
        await self._ready_async.wait()

    async def aclose(self) -> None:
        """Cancels read-ahead in flight."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background))

    # -- the map -------------------------------------------------------------------------

    def apply_update(self, update: ChunkMapUpdate) -> None:
        """Points the map at the chunk versions the upload step committed (on the loop)."""
        chunks = self.chunks
        chunks.update(update.data)
        for a, b in update.zero_runs:
            if b - a <= len(chunks):
                for i in range(a, b):
                    chunks.pop(i, None)
            else:
                for i in [i for i in chunks if a <= i < b]:
                    del chunks[i]

    def chunk_ids(self, spans: Iterable[tuple[int, int]]) -> list[str]:
        """The distinct ids of the non-zero chunks under ``(offset, length)`` spans."""
        cs = self.chunk_size
        out: dict[str, None] = {}
        get = self.chunks.get
        for offset, length in spans:
            if length <= 0:
                continue
            for index in range(offset // cs, (offset + length - 1) // cs + 1):
                cid = get(index)
                if cid is not None:
                    out[cid] = None
        return list(out)

    # -- the NBD read path (event loop) --------------------------------------------------

    def ready_for(self, spans: Iterable[tuple[int, int]]) -> bool:
        """True if an inline read of ``spans`` needs no network and no hashing."""
        if not self._ready.is_set():
            return False
        ready = self.cache.ready
        return all(ready(cid) for cid in self.chunk_ids(spans))

    async def ensure(self, spans: list[tuple[int, int]]) -> list[str]:
        """Makes the chunks under ``spans`` cached, verified and pinned; returns the pinned
        ids, which the caller must ``unpin`` after its read."""
        await self.wait_ready()
        pinned: list[str] = []
        try:
            need: list[str] = []
            for cid in self.chunk_ids(spans):
                if self.cache.pin(cid):
                    pinned.append(cid)
                else:
                    need.append(cid)
            if need:
                got = await asyncio.gather(*(self._ensure_one(cid) for cid in need))
                pinned.extend(cid for cid, ok in zip(need, got, strict=True) if ok)
        except BaseException:
            self.unpin(pinned)
            raise
        return pinned

    def unpin(self, ids: Iterable[str]) -> None:
        """Releases pins taken by ``ensure``."""
        for cid in ids:
            self.cache.unpin(cid)

    async def _ensure_one(self, cid: str) -> bool:
        verified = cid in self.cache and await asyncio.to_thread(self.cache.verify, cid)
        if verified and self.cache.pin(cid):
            return True
        data = await self._fetch(cid)
        if self.cache.pin(cid):
            return True
        await asyncio.to_thread(self.cache.put, cid, data, pin=True)
        return True

    def note_read(self, offset: int, length: int) -> None:
        """Feeds the read-ahead detector (on the loop; cheap)."""
        if offset != self._last_end:  # not a continuation: a new run starts here
            self._run_start = offset
        self._last_end = offset + length
        cs = self.chunk_size
        if not self.read_ahead or not cs or not self._ready.is_set():
            return
        last = (self._last_end - 1) // cs
        if last - self._run_start // cs < 1:  # fewer than two chunks in this run yet
            return
        end = min(last + 1 + self.read_ahead, (self.size + cs - 1) // cs)
        start = max(last + 1, self._ahead_next)
        if start >= end:
            return
        if self._ahead_next <= last:  # a new stream (or one that outran the read-ahead)
            LOG.info(
                "sequential read: reading ahead",
                extra={"volume": self.name, "from_chunk": start, "chunks": self.read_ahead},
            )
        self._ahead_next = end
        for index in range(start, end):
            cid = self.chunks.get(index)
            if cid is None or cid in self.cache or cid in self._fetching:
                continue
            task = asyncio.get_running_loop().create_task(self._read_ahead(cid))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _read_ahead(self, cid: str) -> None:
        assert self._ahead_slots is not None
        async with self._ahead_slots:
            if cid in self.cache:
                return
            try:
                await self._fetch(cid)
                self.read_ahead_chunks += 1
            except (RemoteError, StorageError) as exc:
                LOG.debug("read-ahead failed", extra={"chunk": cid[:12], "error": str(exc)})

    async def _fetch(self, cid: str) -> bytes:
        """The chunk from the provider, checked against its id and put into the cache;
        concurrent fetches of one chunk share one request."""
        fut = self._fetching.get(cid)
        if fut is not None:
            return await asyncio.shield(fut)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._fetching[cid] = fut
        try:
            data = await self._download(cid)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._fetching[cid]
        fut.set_result(data)
        return data

    async def _download(self, cid: str) -> bytes:
        assert self._client is not None and self.remote_id is not None
        data = await self._client.get_chunk(self.remote_id, cid)
        self.fetches += 1
        self.fetched_bytes += len(data)

        def check_and_store() -> None:
            if hashlib.sha256(data).hexdigest() != cid:
                raise RemoteError(
                    f"chunk {cid[:12]} of volume {self.name} from the provider does not "
                    "match its id (damaged in transit or at the provider)"
                )
            self.cache.put(cid, data)

        await asyncio.to_thread(check_and_store)
        return data

    # -- BaseStore -----------------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int) -> None:
        if not self._ready.is_set():
            self._wait_ready_blocking()
        cs = self.chunk_size
        end = offset + len(buf)
        in_thread = threading.get_ident() != self._loop_thread
        pos = offset
        while pos < end:
            index = pos // cs
            chunk_end = min((index + 1) * cs, end)
            dst = buf[pos - offset : chunk_end - offset]
            cid = self.chunks.get(index)
            if cid is None:
                dst[:] = bytes(len(dst))
            elif not self.cache.read_into(cid, pos - index * cs, dst, may_verify=in_thread):
                if not in_thread:
                    raise StorageError(
                        f"volume {self.name}: chunk {index} is not cached; a read on the "
                        "event loop must ensure it first"
                    )
                data = self._fetch_blocking(cid)
                start = pos - index * cs
                dst[:] = data[start : start + len(dst)]
            pos = chunk_end

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def _wait_ready_blocking(self) -> None:
        if threading.get_ident() == self._loop_thread:
            raise StorageError(f"volume {self.name}: its remote map is not loaded yet")
        if not self._ready.wait(_THREAD_FETCH_TIMEOUT):
            raise StorageError(f"volume {self.name}: its remote map is not loaded yet")

    def _fetch_blocking(self, cid: str) -> bytes:
        if self._loop is None:
            raise StorageError(f"volume {self.name}: the cached store is not attached")
        fut = asyncio.run_coroutine_threadsafe(self._fetch(cid), self._loop)
        try:
            return fut.result(_THREAD_FETCH_TIMEOUT)
        except TimeoutError as exc:
            fut.cancel()
            raise StorageError(
                f"volume {self.name}: fetching chunk {cid[:12]} took over "
                f"{_THREAD_FETCH_TIMEOUT:.0f} s"
            ) from exc

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise StorageError(f"volume {self.name} is cached: its base is written by uploads")

    def zero(self, offset: int, length: int, punch: bool) -> None:
        raise StorageError(f"volume {self.name} is cached: its base is written by uploads")

    def copy_from(self, src_fd: int, src_offset: int, offset: int, length: int) -> None:
        raise StorageError(f"volume {self.name} is cached: its base is written by uploads")

    def sync(self) -> None:
        """Nothing to do: the provider holds the committed map and chunks."""

    def allocated(self, offset: int, length: int) -> list[tuple[int, bool]]:
        if not self._ready.is_set() or not self.chunk_size:
            return [(length, False)]
        cs = self.chunk_size
        out: list[tuple[int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // cs
            n = min((index + 1) * cs, end) - pos
            hole = index not in self.chunks
            if out and out[-1][1] == hole:
                out[-1] = (out[-1][0] + n, hole)
            else:
                out.append((n, hole))
            pos += n
        return out

    def close(self) -> None:
        """The shared cache outlives the volume; nothing to release."""
