"""Lazy restore of a stored volume from a snapshot, along an implicit binary tree.

The snapshot's chunks ``[0, n)`` form an implicit binary tree: the node of the range
``[lo, hi)`` is chunk ``mid = (lo + hi) // 2``, its children are the nodes of ``[lo, mid)``
and ``[mid + 1, hi)``. A chunk is *marked* when its first 512-byte sector holds a mark:
a magic, the restore's random token (so neither user data nor an older restore on the same
disk passes for one), the chunk index and a CRC32C. On disk a chunk is unrestored exactly
when a node on its path from the root, itself included, is marked. ``begin`` marks the
root; a walk to a chunk finds the first marked node on its path and restores the nodes from
there down; a background walk restores the rest.

Restoring node x (marked, its parent restored) takes three steps: (1) write the children's
marks and x's data except its first sector (an all-zero chunk: punch ``[4K, end)``, write
zeroes to ``[512, 4K)``); (2) fdatasync; (3) write x's first sector, which replaces x's
mark by x's data. A crash may lose any unsynced write or tear it at sector boundaries (a
512-byte sector is written atomically, the usual assumption). This is enough because:

- Nothing unrestored is exposed. Until step 3 reaches the disk, x's mark still covers x and
  its subtree, whatever parts of step 1 reached the disk. Step 3 is issued after step 2
  made the children's marks and x's data durable, and it is a one-sector write, so it
  cannot leave half a mark: once x's mark is gone, x is whole and its children are marked.
- Nothing restored is restored again. A node is restored only after its parent's step 3
  returned, so x's step 2 also makes the parent's step 3 durable (and so on up the path).
  Hence when x's step 3 is issued, and x may take newer data, no ancestor can come back
  marked and re-mark x. If a crash loses the parent's step 3, x's step 3 was never issued:
  x still holds the mark its parent wrote, re-marking it writes the same bytes, and x's
  subtree is restored again from the snapshot, which nothing newer has touched.

Durability at the edges: ``begin`` syncs the root's mark before it returns, and
``run_background`` syncs after the last node, so the caller may then record that the
restore began or finished. The one fdatasync per node is shared by concurrent restores.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

from crc32c import crc32c

from sgw.common.errors import ChunkCorruptError, StorageError, VolumeStateError
from sgw.gateway.volume.base import FileBaseStore

LOG = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Fetch = Callable[[int], Awaitable[bytes | None]]
"""Chunk index -> the chunk's data (exactly its length), or None when it is all zero."""

BLOCK = 4096
# The mark lives in the first sector of a chunk: the unit a disk writes atomically, so the
# write that replaces the mark by data cannot tear into half of each.
MARK_SECTOR = 512
TOKEN_SIZE = 16
# magic, restore token, chunk index, CRC32C of the fields before it
_MARK = struct.Struct("<8s16sQI")
_MARK_MAGIC = b"SGWRMARK"
# Chunks fetched ahead along an ensure's path: a path is restored top-down one node at a
# time, but fetching four levels at once hides most round trips of a deep path while one
# reader holds at most four chunks in memory.
_PATH_PREFETCH = 4

_UNKNOWN = 0  # not looked at since the process started
_MARKED = 1  # holds its mark: this chunk and its subtree are unrestored
_RESTORED = 2


class Node(NamedTuple):
    """The tree node of the chunk range ``[lo, hi)``."""

    lo: int
    hi: int

    @property
    def chunk(self) -> int:
        """The node's chunk: the middle of its range."""
        return (self.lo + self.hi) // 2


def tree_root(n: int) -> Node | None:
    """The root of the tree over ``n`` chunks (None when there are none)."""
    return Node(0, n) if n > 0 else None


def tree_children(node: Node) -> tuple[Node, ...]:
    """The node's children, empty ranges left out."""
    mid = node.chunk
    kids: list[Node] = []
    if mid > node.lo:
        kids.append(Node(node.lo, mid))
    if node.hi > mid + 1:
        kids.append(Node(mid + 1, node.hi))
    return tuple(kids)


def tree_path(n: int, index: int) -> list[Node]:
    """The nodes from the root down to the node of chunk ``index``, both included."""
    if not 0 <= index < n:
        raise ValueError(f"chunk {index} is outside a tree of {n} chunks")
    lo, hi = 0, n
    path: list[Node] = []
    while True:
        node = Node(lo, hi)
        path.append(node)
        mid = node.chunk
        if index == mid:
            return path
        if index < mid:
            hi = mid
        else:
            lo = mid + 1


def tree_depth(n: int) -> int:
    """The most nodes on any path of the tree over ``n`` chunks: ceil(log2(n + 1))."""
    return n.bit_length()


def _consume(task: asyncio.Task[Any]) -> None:
    """Marks a background task's failure as seen; its awaiters get it, if any are left."""
    if not task.cancelled():
        task.exception()


class TreeRestore:
    """Restores a snapshot into a stored volume's disk on demand and in the background.

    ``ensure`` before every read of the base and before the destager writes into a chunk;
    ``run_background`` until it returns, then the restore is complete and durable.
    """

    def __init__(
        self, base: FileBaseStore, size: int, chunk_size: int, token: bytes, fetch: Fetch
    ) -> None:
        if len(token) != TOKEN_SIZE:
            raise ValueError(f"a restore token is {TOKEN_SIZE} bytes, not {len(token)}")
        if chunk_size <= 0 or chunk_size % BLOCK:
            raise VolumeStateError(
                f"snapshot chunk size {chunk_size} is not a positive multiple of 4 KiB"
            )
        if size < 0 or size % BLOCK:
            raise VolumeStateError(f"snapshot size {size} is not a multiple of 4 KiB")
        if size > base.size:
            raise VolumeStateError(
                f"volume disk {base.path} holds {base.size} bytes, less than the "
                f"snapshot's {size}; create the volume at least as large as the snapshot"
            )
        self._base = base
        self.size = size
        self.chunk_size = chunk_size
        self.token = bytes(token)
        self._fetch = fetch
        self._total = -(-size // chunk_size)
        self._state = bytearray(self._total)  # _UNKNOWN, _MARKED or _RESTORED per chunk
        self._restored = 0
        self._restoring: dict[int, asyncio.Task[None]] = {}
        self._fetches: dict[int, asyncio.Task[bytes | Exception | None]] = {}
        # Group commit: writes finished so far, and how many of them a sync made durable.
        self._write_gen = 0
        self._synced_gen = 0
        self._sync_task: asyncio.Task[None] | None = None
        self._broken: StorageError | None = None
        self.syncs = 0

    # -- status ----------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Chunks in the snapshot."""
        return self._total

    @property
    def restored(self) -> int:
        """Chunks known to be restored (after a restart this grows as the walk finds them)."""
        return self._restored

    @property
    def done(self) -> bool:
        """True once every chunk is restored (durable once ``run_background`` returned)."""
        return self._restored == self._total

    # -- marks -----------------------------------------------------------------------------

    def mark(self, index: int) -> bytes:
        """The first sector of chunk ``index`` while it is marked."""
        fields = _MARK.pack(_MARK_MAGIC, self.token, index, 0)[: _MARK.size - 4]
        return fields + struct.pack("<I", crc32c(fields)) + bytes(MARK_SECTOR - _MARK.size)

    def is_marked(self, block: bytes | bytearray | memoryview, index: int) -> bool:
        """Whether ``block`` (the start of chunk ``index``) holds this restore's mark for it."""
        if len(block) < _MARK.size:
            return False
        magic, token, found, crc = _MARK.unpack_from(block)
        return bool(
            magic == _MARK_MAGIC
            and token == self.token
            and found == index
            and crc == crc32c(bytes(block[: _MARK.size - 4]))
        )

    # -- the API ---------------------------------------------------------------------------

    async def begin(self) -> None:
        """Marks the root durably: from now on the whole snapshot reads as unrestored.

        Only for a new restore. A resumed one (same token, after a restart) must not call
        it: marking the root again would restore chunks that may hold newer data.
        """
        self._check_usable()
        top = tree_root(self._total)
        if top is None:
            return
        i = top.chunk
        await self._io(f"mark chunk {i} of", self._base.write, self._offset(i), self.mark(i))
        self._write_gen += 1
        await self._barrier()
        self._state[i] = _MARKED
        LOG.info(
            "restore begun",
            extra={"path": self._base.path, "chunks": self._total},
        )

    async def ensure(self, offset: int, length: int) -> None:
        """Returns once every chunk overlapping ``[offset, offset + length)`` is restored.

        Bytes past the snapshot's size need nothing. A failed fetch is raised here as the
        fetch raised it; its chunk stays marked and is fetched again by the next caller.
        """
        chunks = self._chunks(offset, length)
        state = self._state
        todo = [i for i in chunks if state[i] != _RESTORED]
        if not todo:
            return
        self._check_usable()
        if len(todo) == 1:
            await self._walk(todo[0])
        else:
            await asyncio.gather(*(self._walk(i) for i in todo))

    def is_restored(self, offset: int, length: int) -> bool:
        """True if every chunk under the range is known restored: no I/O, for the loop."""
        chunks = self._chunks(offset, length)
        return self._state.count(_RESTORED, chunks.start, chunks.stop) == len(chunks)

    async def run_background(
        self, *, concurrency: int = 4, stop: asyncio.Event | None = None
    ) -> None:
        """Restores every chunk not restored yet, ``concurrency`` at a time, and syncs.

        Resumable: after a restart it walks the tree from the root, restores the marked
        nodes and probes the others (one small read each); in one process, subtrees known
        restored are skipped without I/O. Returns early, after the restores in flight, when
        ``stop`` is set. The first failure ends the walk and is raised; run it again later.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._check_usable()
        top = tree_root(self._total)
        if top is not None and not self._subtree_done(top):
            LOG.info(
                "restore: background walk started",
                extra={
                    "path": self._base.path,
                    "chunks": self._total,
                    "restored": self._restored,
                },
            )
            await self._walk_all(top, concurrency, stop)
        await self._barrier()
        if self.done:
            LOG.info(
                "restore complete",
                extra={"path": self._base.path, "chunks": self._total},
            )

    async def aclose(self) -> None:
        """Cancels the restores and fetches in flight and waits until none touches the disk.

        For shutdown, once ``run_background`` and the callers of ``ensure`` have stopped;
        what was cancelled stays marked on disk and is restored after the restart.
        """
        tasks: list[asyncio.Task[Any]] = [*self._restoring.values(), *self._fetches.values()]
        if self._sync_task is not None:
            tasks.append(self._sync_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- walking ---------------------------------------------------------------------------

    async def _walk(self, index: int) -> None:
        """Restores the nodes on chunk ``index``'s path from the first marked one down."""
        path = tree_path(self._total, index)
        started: list[int] = []
        try:
            for depth, node in enumerate(path):
                state = self._state[node.chunk]
                if state == _UNKNOWN:
                    state = await self._probe(node)
                if state == _RESTORED:
                    continue
                # This node is marked: it and every node below it on the path need restoring.
                for deeper in path[depth : depth + _PATH_PREFETCH]:
                    if deeper.chunk not in self._fetches and deeper.chunk not in self._restoring:
                        self._start_fetch(deeper.chunk)
                        started.append(deeper.chunk)
                await asyncio.shield(self._restore_task(node))
        except BaseException:
            for i in started:  # fetched data no restore is going to take
                if i not in self._restoring and (task := self._fetches.pop(i, None)):
                    task.cancel()
            raise

    async def _walk_all(self, top: Node, concurrency: int, stop: asyncio.Event | None) -> None:
        """Depth first over the tree: a node's children are queued once it is restored."""
        queue: asyncio.LifoQueue[Node] = asyncio.LifoQueue()
        queue.put_nowait(top)

        async def worker() -> None:
            while True:
                node = await queue.get()
                try:
                    await self._settle(node)
                    for kid in tree_children(node):
                        if not self._subtree_done(kid):
                            queue.put_nowait(kid)
                finally:
                    queue.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(queue.join()), *workers]
        if stop is not None:
            waits.append(asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.wait(waits)
            # Workers leave their restores running (shielded): let those end before returning.
            if self._restoring:
                await asyncio.wait(list(self._restoring.values()))
        for task in workers:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _settle(self, node: Node) -> None:
        """Restores ``node`` if it is marked; its parent is restored."""
        state = self._state[node.chunk]
        if state == _UNKNOWN:
            state = await self._probe(node)
        if state == _MARKED:
            await asyncio.shield(self._restore_task(node))

    async def _probe(self, node: Node) -> int:
        """Reads whether ``node`` is marked; its ancestors are all restored."""
        i = node.chunk
        head = await self._io(f"read chunk {i} of", self._base.read, self._offset(i), MARK_SECTOR)
        # Only a restore changes a known state, and a restore needs the node marked first:
        # if the state is still unknown, what was just read is current.
        if self._state[i] == _UNKNOWN:
            if self.is_marked(head, i):
                self._state[i] = _MARKED
            else:  # no mark on its path: restored before a restart
                self._set_restored(i)
        return self._state[i]

    def _chunks(self, offset: int, length: int) -> range:
        """The chunks under ``[offset, offset + length)``; none past the snapshot's end."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        end = min(offset + length, self.size)
        if offset >= end or self._restored == self._total:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def _subtree_done(self, node: Node) -> bool:
        return self._state.count(_RESTORED, node.lo, node.hi) == node.hi - node.lo

    # -- restoring one node ----------------------------------------------------------------

    def _restore_task(self, node: Node) -> asyncio.Task[None]:
        """The one restore of ``node`` in flight, started if there is none."""
        i = node.chunk
        task = self._restoring.get(i)
        if task is None:
            task = asyncio.create_task(self._restore_node(node), name=f"restore-chunk-{i}")
            self._restoring[i] = task

            def forget(done: asyncio.Task[None]) -> None:
                if self._restoring.get(i) is done:
                    del self._restoring[i]
                _consume(done)

            task.add_done_callback(forget)
        return task

    def _start_fetch(self, index: int) -> asyncio.Task[bytes | Exception | None]:
        task = self._fetches.get(index)
        if task is None:
            task = asyncio.create_task(self._fetch_quietly(index), name=f"fetch-chunk-{index}")
            self._fetches[index] = task
        return task

    async def _fetch_quietly(self, index: int) -> bytes | Exception | None:
        """The fetch's result or its error, so that a prefetch nobody takes logs nothing."""
        try:
            return await self._fetch(index)
        except Exception as exc:
            return exc

    async def _restore_node(self, node: Node) -> None:
        i = node.chunk
        try:
            self._check_usable()
            data = await self._start_fetch(i)
        finally:
            self._fetches.pop(i, None)
        if isinstance(data, Exception):
            LOG.warning(
                "restore: fetching chunk %d failed: %s",
                i,
                data,
                extra={"path": self._base.path, "chunk": i},
            )
            raise data
        length = self._length(i)
        if data is not None and len(data) != length:
            raise ChunkCorruptError(
                f"snapshot chunk {i} has {len(data)} bytes, expected {length}; "
                "the snapshot's map does not match its chunks"
            )
        kids = tree_children(node)
        await self._io(f"restore chunk {i} of", self._write_body, i, data, kids)
        self._write_gen += 1
        await self._barrier()
        head = bytes(MARK_SECTOR) if data is None else data[:MARK_SECTOR]
        await self._io(f"restore chunk {i} of", self._base.write, self._offset(i), head)
        self._write_gen += 1
        for kid in kids:
            self._state[kid.chunk] = _MARKED
        self._set_restored(i)
        LOG.debug("restore: chunk restored", extra={"path": self._base.path, "chunk": i})

    def _write_body(self, index: int, data: bytes | None, kids: tuple[Node, ...]) -> None:
        """Step 1 (in a worker thread): the children's marks, then all but the first sector."""
        base = self._base
        for kid in kids:
            base.write(self._offset(kid.chunk), self.mark(kid.chunk))
        offset, length = self._offset(index), self._length(index)
        if data is None:
            base.write(offset + MARK_SECTOR, bytes(BLOCK - MARK_SECTOR))
            if length > BLOCK:
                base.zero(offset + BLOCK, length - BLOCK, punch=True)
        else:
            base.write(offset + MARK_SECTOR, memoryview(data)[MARK_SECTOR:])

    def _set_restored(self, index: int) -> None:
        self._state[index] = _RESTORED
        self._restored += 1

    def _offset(self, index: int) -> int:
        return index * self.chunk_size

    def _length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    # -- I/O and durability ----------------------------------------------------------------

    async def _io(
        self, context: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Runs blocking file I/O in a worker thread; OSError becomes StorageError."""
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # A thread cannot be stopped: wait for it, so nothing touches the disk after
            # aclose() returned.
            await asyncio.wait([job])
            _consume(job)
            raise
        except OSError as exc:
            raise StorageError(
                f"restore: cannot {context} volume disk {self._base.path}: {exc.strerror or exc}"
            ) from exc

    async def _barrier(self) -> None:
        """Returns once every write that finished before the call is durable."""
        target = self._write_gen
        while self._synced_gen < target:
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.create_task(self._sync_once())
                task.add_done_callback(_consume)
            await asyncio.shield(task)

    async def _sync_once(self) -> None:
        covered = self._write_gen
        try:
            await self._io("sync", self._base.sync)
        except StorageError as exc:
            # After a failed fdatasync the kernel may have dropped dirty pages: what is on
            # disk is no longer known, so no further step may rely on an earlier one.
            self._broken = exc
            LOG.error(
                "restore: syncing the volume disk failed; restart to resume from the disk",
                extra={"path": self._base.path, "error": str(exc)},
            )
            raise
        finally:
            self._sync_task = None
        self._synced_gen = max(self._synced_gen, covered)
        self.syncs += 1

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StorageError(
                f"the restore of volume disk {self._base.path} stopped after a failed sync "
                f"({self._broken}); restart the gateway to resume it from the disk"
            )
