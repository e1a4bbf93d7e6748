"""The upload step: ships each destage batch to the provider before the log space is freed.

For every volume in a batch: bind it to a remote volume (created at the provider on first
use, its id kept in the volume registry), build the new versions of the chunks the batch
touches (``chunker``), upload the non-zero ones in parallel under a concurrency and a
bandwidth limit, then commit every change of the volume in one commit based on the map
version the gateway last committed. The destager applies the batch locally and frees the
log only after this returns; any failure raises, and the destager retries the batch.

Crash safety. Before a commit the registry records which batch (its first sequence
number) is being committed (``remote_pending``); after it, the new version. A crash in
between leaves the provider one commit ahead of the registry. After the restart the
destager re-reads the same log from the same tail, so the next batch starts at that same
record and covers every chunk the lost commit touched (records are made durable before
an upload, so none of them can vanish in the crash): committing it on top of the newer
version gives exactly the volume as of the batch's end. A map that moved on without such
a pending batch was changed by someone else, and the upload fails loudly rather than
overwrite it. A retry whose reply was lost carries the same idempotency key (derived
from the batch and its changes), so the provider applies it once.

Pipelining. The destager may hand over the next batch (``send``: chunks built and
uploaded) while the previous one is being committed (``finish``); commits stay in batch
order, and a batch whose upload re-syncs a whole volume or touches a cached volume is
committed before the next is built (see the destager).

Snapshots. A batch that ends at a snapshot marker is committed like any other, then the
provider is asked for the snapshot named in the marker at the map version just committed:
the volume exactly as of the marker. The request names the snapshot and the version, so
asking again after a crash returns the same snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from sgw.common.chunk_packs import MAX_PACK_CHUNKS
from sgw.common.errors import (
    RemoteConflictError,
    RemoteNotFoundError,
    RemoteRejectedError,
    VolumeStateError,
)
from sgw.gateway.volume.cached_base import ChunkMapUpdate
from sgw.gateway.volume.chunk_cache import ChunkCache
from sgw.gateway.volume.chunker import ChunkVersion, iter_chunks
from sgw.gateway.volume.destager import Batch, VolumeChanges
from sgw.gateway.volume.engine import RegistryEntry, VolumeEngine
from sgw.gateway.volume.index import BLOCK
from sgw.gateway.volume.remote import BlockApiClient, PreparedChunk, prepare_chunk
from sgw.gateway.volume.snapshots import SnapshotState
from sgw.gateway.volume.volume import Volume
from sgw.gateway.volume.wal import KIND_SNAPSHOT, Record

LOG = logging.getLogger(__name__)

# Chunks per upload request: 4 MiB at the default chunk size (docs/adr/0005).
DEFAULT_PACK_CHUNKS = 4
# How much the chunker builds per trip to a worker thread: enough to amortise the hop,
# little enough to bound memory (requests in flight add ``concurrency * pack_chunks``
# chunks to it, bounded by the configuration: ``MAX_CHUNKS_IN_FLIGHT``).
_TAKE_BYTES = 8 << 20
_TAKE_ITEMS = 4096  # all-zero chunks cost no memory; this bounds one trip's time


class TokenBucket:
    """Limits a byte rate: ``acquire(n)`` waits until ``n`` bytes may go.

    Tokens accrue at ``rate`` per second up to ``burst``; a request larger than what is
    there goes into debt and waits it off, so a 1 MiB chunk under a 100 KiB/s limit still
    goes (after about ten seconds) and the long-run rate is exact. ``rate`` None: no limit.
    """

    def __init__(
        self,
        rate: int | None,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"bandwidth limit {rate} must be positive")
        self.rate = rate
        self.burst = float(burst if burst is not None else (rate or 0))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self.held = 0  # requests that had to wait for the limit

    def delay_for(self, n: int) -> float:
        """Takes ``n`` tokens now; returns how long the taker must wait (seconds)."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def set_rate(self, rate: int | None) -> None:
        """Changes the limit from now on (None: no limit); the burst becomes one second's
        worth. Tokens accrued so far count at the old rate; a debt is kept."""
        if rate is not None and rate <= 0:
            raise ValueError(f"bandwidth limit {rate} must be positive")
        now = self._clock()
        if self.rate is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        unlimited_before = self.rate is None
        self.rate = rate
        self.burst = float(rate or 0)
        self._tokens = self.burst if unlimited_before else min(self._tokens, self.burst)

    async def acquire(self, n: int) -> None:
        """Waits until ``n`` bytes may be sent (no wait without a limit)."""
        delay = self.delay_for(n)
        if delay > 0:
            self.held += 1
            await self._sleep(delay)


def idempotency_key(
    remote_id: str, first_seq: int, last_seq: int, base: int, changes: dict[int, str | None]
) -> str:
    """The same batch with the same changes on the same base always gets the same key."""
    h = hashlib.sha256(f"{remote_id}\n{first_seq}\n{last_seq}\n{base}\n".encode())
    h.update(json.dumps(sorted(changes.items())).encode())
    return f"sgw-{first_seq}-{last_seq}-{h.hexdigest()[:40]}"


@dataclass
class VolumeResult:
    """A volume's new chunk versions: non-zero chunk ids and runs of all-zero indexes."""

    data: dict[int, str] = field(default_factory=dict)
    zero_runs: list[list[int]] = field(default_factory=list)  # [first, end) index runs

    def add_zero(self, index: int) -> None:
        runs = self.zero_runs
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])

    def diff(self, current: dict[int, str]) -> dict[int, str | None]:
        """The commit that makes a map equal to ``current`` hold these versions."""
        out: dict[int, str | None] = {i: c for i, c in self.data.items() if current.get(i) != c}
        keys: list[int] | None = None
        for a, b in self.zero_runs:
            if b - a <= len(current):
                out.update({i: None for i in range(a, b) if i in current})
            else:
                if keys is None:
                    keys = sorted(current)
                out.update({i: None for i in keys if a <= i < b})
        return dict(sorted(out.items()))


@dataclass
class _Binding:
    """A volume's remote side as this process knows it: id, chunk size, and the map at
    ``map_version`` (kept up to date by our own commits)."""

    remote_id: str
    chunk_size: int
    map_version: int
    chunks: dict[int, str]


@dataclass
class SentBatch:
    """A batch whose chunks are at the provider, not committed yet (``Uploader.send``)."""

    volumes: list[tuple[Volume, VolumeResult]]
    # The next batch must wait for this one's commit before it is built: a cached
    # volume's map changes at the commit, and a re-sync reads the registry it updates.
    barrier: bool
    started: float


class Uploader:
    """The destager's upload step (``Destager(upload=uploader)``): ``send`` then
    ``finish`` a batch, or both at once by calling it."""

    def __init__(
        self,
        engine: VolumeEngine,
        client: BlockApiClient,
        *,
        concurrency: int = 8,
        bandwidth: int | None = None,
        mode: str = "stored",
        pack_chunks: int = DEFAULT_PACK_CHUNKS,
    ) -> None:
        """``concurrency``: upload requests in flight; ``pack_chunks``: most chunks sent in
        one request (a chunk pack; 1 sends each chunk on its own)."""
        if concurrency < 1:
            raise ValueError("upload concurrency must be at least 1")
        if not 1 <= pack_chunks <= MAX_PACK_CHUNKS:
            raise ValueError(f"chunks per pack must be 1 to {MAX_PACK_CHUNKS}")
        self.pack_chunks = pack_chunks
        self.engine = engine
        engine.snapshots_enabled = True
        self.client = client
        self.concurrency = concurrency
        self.bucket = TokenBucket(bandwidth)
        self.mode = mode
        self._bindings: dict[int, _Binding] = {}
        # Volumes whose last commit was sent without a definite answer (a crash before
        # this process started, a timeout): only such a commit may explain a moved map.
        self._unanswered: set[int] = set()
        # The registry in memory is ahead of the file (a save failed): save at next chance.
        self._registry_dirty = False
        self.chunks_uploaded = 0
        self.bytes_sent = 0
        self.commits = 0
        self.errors = 0  # chunk uploads and map commits that failed (the health metrics)
        # Each volume's last committed upload (time.time(), by volume name): its recovery
        # point at the provider.
        self.committed_at: dict[str, float] = {}

    async def close(self) -> None:
        """Closes the HTTP client."""
        await self.client.aclose()

    async def __call__(self, batch: Batch) -> None:
        await self.finish(batch, await self.send(batch))

    async def send(self, batch: Batch) -> SentBatch:
        """Builds the batch's new chunk versions and uploads them (nothing is committed)."""
        sent = SentBatch([], False, time.monotonic())
        if not batch.volumes:
            return sent
        # What goes to the provider must survive a crash here too, or the remote could
        # keep writes that the restarted gateway no longer has.
        await self.engine.flush()
        for vol_id, changes in batch.volumes.items():
            vol = self.engine.by_id[vol_id]
            result, resync = await self._upload_volume(vol, changes, batch.first_seq)
            sent.volumes.append((vol, result))
            sent.barrier = sent.barrier or resync or vol.cached is not None
        return sent

    async def finish(self, batch: Batch, sent: SentBatch) -> None:
        """Commits what ``send`` uploaded (the batches before it are committed), then makes
        the snapshot of a marker at the batch's end."""
        first, last = batch.first_seq, batch.last_seq
        for vol, result in sent.volumes:
            entry = self.engine.registry[vol.name]
            binding = self._bindings.get(vol.id) or await self._bind(vol, entry)
            await self._commit(vol, entry, binding, result, first=first, last=last)
            if vol.cached is not None:  # the destager points the volume's map at them
                batch.updates[vol.id] = ChunkMapUpdate(result.data, result.zero_runs)
            LOG.debug(
                "volume batch uploaded",
                extra={
                    "volume": vol.name,
                    "chunks": len(result.data),
                    "zero_runs": len(result.zero_runs),
                    "seconds": round(time.monotonic() - sent.started, 3),
                },
            )
        marker = batch.records[-1] if batch.records else None
        # A batch ends at a marker: the map just committed is the volume at the marker.
        if marker is not None and marker.kind == KIND_SNAPSHOT:
            await self._snapshot(marker)

    async def _snapshot(self, marker: Record) -> None:
        req = self.engine.snapshot_for(marker)
        if req.state != SnapshotState.PENDING:
            return
        binding = self._bindings.get(marker.volume)
        if binding is None:  # the volume is no longer configured
            req.finish(SnapshotState.FAILED, "the volume is no longer on this gateway")
            return
        try:
            await self.client.snapshot_volume(
                binding.remote_id, req.id, binding.map_version, req.description
            )
        except RemoteRejectedError as exc:
            # Asking again cannot help, and holding the marker would stop the whole log.
            req.finish(SnapshotState.FAILED, str(exc))
            return
        req.finish(SnapshotState.COMPLETED)

    async def bind_cached(self, vol: Volume) -> None:
        """Binds a cached volume to its remote volume (created on first use) and loads
        the remote map into its store, after which reads of its base may go on."""
        assert vol.cached is not None
        entry = self.engine.registry[vol.name]
        binding = await self._bind(vol, entry)
        vol.cached.load(binding.remote_id, binding.chunk_size, binding.map_version, binding.chunks)

    async def bind(self, vol: Volume) -> str:
        """Binds a volume to its remote volume now (created unless the registry names one
        the provider made); returns the remote id."""
        return (await self._bind(vol, self.engine.registry[vol.name])).remote_id

    def forget(self, vol_id: int) -> None:
        """Drops what this process knows of a removed volume's remote side (its id may be
        given to a new volume later)."""
        self._bindings.pop(vol_id, None)
        self._unanswered.discard(vol_id)

    async def bind_restore(self, vol: Volume) -> tuple[str, int, dict[int, str]]:
        """Binds a stored volume created from a snapshot (its remote volume is created
        from the snapshot on first use); returns the remote id, chunk size and map."""
        binding = await self._bind(vol, self.engine.registry[vol.name])
        return binding.remote_id, binding.chunk_size, dict(binding.chunks)

    # -- one volume ----------------------------------------------------------------------

    async def _upload_volume(
        self, vol: Volume, changes: VolumeChanges, first: int
    ) -> tuple[VolumeResult, bool]:
        """Uploads the volume's new chunk versions; True with them if it also re-synced
        the volume (in full, or the ranges changed in pass-through)."""
        entry = self.engine.registry[vol.name]
        if vol.cached is not None:  # bound by bind_cached; its map is the primary copy
            await vol.cached.wait_ready()
        binding = await self._bind(vol, entry)
        if binding.map_version != entry.remote_version:
            await self._reconcile(vol, entry, binding, first)
        extra: list[tuple[int, int]] = []
        if not entry.remote_synced and vol.cached is None:
            # What the disk holds that the remote may lack (data from before the volume was
            # bound, or destaged while no remote was configured), and what the remote holds
            # that the disk may no longer have.
            extra = await asyncio.to_thread(_allocated_chunks, vol, binding.chunk_size)
            extra += [(i, i + 1) for i in binding.chunks]
        elif entry.dirty:  # changed on the disk alone while in pass-through
            extra = entry.dirty_chunks(binding.chunk_size)
        result = await self._build_and_upload(vol, changes, binding, extra)
        return result, bool(extra) or not entry.remote_synced or bool(entry.dirty)

    async def _bind(self, vol: Volume, entry: RegistryEntry) -> _Binding:
        binding = self._bindings.get(vol.id)
        if binding is not None:
            return binding
        if entry.remote_id is None or not entry.remote_created:
            if entry.remote_id is None:
                # The id is chosen here and recorded first: a retry after a lost reply (or
                # a crash) asks for the same volume again instead of making another.
                entry.remote_id, entry.remote_created = str(uuid.uuid4()), False
                await self._save_registry()
            mode = vol.mode if vol.cached is not None else self.mode
            rv = await self.client.create_volume(
                vol.name,
                vol.size,
                mode=mode,
                from_snapshot_id=entry.snapshot,
                volume_id=entry.remote_id,
            )
            entry.remote_id, entry.remote_version = rv.id, rv.map_version
            entry.remote_created = True
            # From a snapshot, the local disk becomes the snapshot's copy (restored lazily
            # before anything reads or changes it), never something to upload.
            entry.remote_pending, entry.remote_synced = None, entry.snapshot is not None
            await self._save_registry()
            LOG.info(
                "remote volume created",
                extra={"volume": vol.name, "remote_id": rv.id, "snapshot": entry.snapshot},
            )
            chunks: dict[int, str] = {}
            version = rv.map_version
            if entry.snapshot is not None:
                remote_map = await self.client.get_map(rv.id)
                chunks, version = remote_map.chunks, remote_map.version
        else:
            try:
                rv = await self.client.get_volume(entry.remote_id)
            except RemoteNotFoundError as exc:
                raise VolumeStateError(
                    f"volume {vol.name} is bound to remote volume {entry.remote_id}, which "
                    f"the provider at {self.client.base_url} does not have; if it is gone for "
                    "good, remove remote_id from volumes.json (with the gateway stopped) and "
                    "the volume is uploaded again in full to a new remote volume"
                ) from exc
            remote_map = await self.client.get_map(rv.id)
            chunks, version = remote_map.chunks, remote_map.version
            if entry.remote_version is None:
                entry.remote_version = version
        if rv.size != vol.size:
            raise VolumeStateError(
                f"volume {vol.name} is {vol.size} bytes but its remote volume {rv.id} is "
                f"{rv.size}; configure the same size or bind a new remote volume"
            )
        if rv.chunk_size <= 0 or rv.chunk_size % BLOCK:
            raise VolumeStateError(
                f"remote volume {rv.id} has chunk size {rv.chunk_size}, not a multiple of 4 KiB"
            )
        binding = _Binding(rv.id, rv.chunk_size, version, chunks)
        self._bindings[vol.id] = binding
        if entry.remote_pending is not None:
            self._unanswered.add(vol.id)
        return binding

    async def _reconcile(
        self, vol: Volume, entry: RegistryEntry, binding: _Binding, first: int
    ) -> None:
        """The provider's map is not at the version we last committed: re-read it and
        accept it only if our own unrecorded commit of a batch from this tail explains it."""
        remote_map = await self.client.get_map(binding.remote_id)
        binding.chunks, binding.map_version = remote_map.chunks, remote_map.version
        if remote_map.version == entry.remote_version:
            return
        if entry.remote_pending == first and vol.id in self._unanswered:
            LOG.warning(
                "the provider holds a commit this gateway did not record (a crash or a lost "
                "reply); this batch covers every chunk it changed and is committed on top",
                extra={
                    "volume": vol.name,
                    "recorded_version": entry.remote_version,
                    "remote_version": remote_map.version,
                },
            )
            entry.remote_version = remote_map.version
            return
        raise RemoteConflictError(
            f"remote volume {binding.remote_id} of volume {vol.name} is at map version "
            f"{remote_map.version} but this gateway last committed {entry.remote_version}: "
            "something else writes to it. Stop the other writer, or bind this volume to a "
            "new remote volume (remove its remote_id from volumes.json); uploads are held "
            "in the write log meanwhile",
            status=409,
        )

    async def _build_and_upload(
        self,
        vol: Volume,
        changes: VolumeChanges,
        binding: _Binding,
        extra: list[tuple[int, int]],
    ) -> VolumeResult:
        result = VolumeResult()
        gen = iter_chunks(
            changes,
            vol.base,
            self.engine.log,
            size=vol.size,
            chunk_size=binding.chunk_size,
            extra=extra,
        )
        slots = asyncio.Semaphore(self.concurrency)
        cache = vol.cached.cache if vol.cached is not None else None
        sent_ids: set[str] = set()
        group: list[tuple[int, bytes | bytearray]] = []
        try:
            async with asyncio.TaskGroup() as tg:

                async def start(items: list[tuple[int, bytes | bytearray]]) -> None:
                    await slots.acquire()
                    tg.create_task(
                        self._put(
                            binding,
                            items,
                            result=result,
                            sent_ids=sent_ids,
                            slots=slots,
                            cache=cache,
                        )
                    )

                while True:
                    items = await asyncio.to_thread(_take, gen)
                    if not items:
                        break
                    for index, data in items:
                        if data is None:
                            result.add_zero(index)
                            continue
                        group.append((index, data))
                        if len(group) >= self.pack_chunks:
                            await start(group)
                            group = []
                if group:
                    await start(group)
        except BaseExceptionGroup as exc_group:
            first_exc = exc_group.exceptions[0]
            while isinstance(first_exc, BaseExceptionGroup):
                first_exc = first_exc.exceptions[0]
            raise first_exc from exc_group
        finally:
            gen.close()
        return result

    async def _put(
        self,
        binding: _Binding,
        items: list[tuple[int, bytes | bytearray]],
        *,
        result: VolumeResult,
        sent_ids: set[str],
        slots: asyncio.Semaphore,
        cache: ChunkCache | None = None,
    ) -> None:
        """Uploads the new versions of a few chunks: one chunk PUT, or a chunk pack."""
        try:
            chunks = await asyncio.to_thread(_prepare_all, [data for _, data in items], cache)
            send: list[PreparedChunk] = []
            for (index, _), chunk in zip(items, chunks, strict=True):
                result.data[index] = chunk.id
                # The provider holds it: at this index of the map, or sent in this batch.
                if binding.chunks.get(index) == chunk.id or chunk.id in sent_ids:
                    continue
                sent_ids.add(chunk.id)
                send.append(chunk)
            if not send:
                return
            nbytes = sum(len(chunk.body) for chunk in send)
            await self.bucket.acquire(nbytes)
            try:
                if len(send) == 1:
                    await self.client.put_chunk(binding.remote_id, send[0])
                else:
                    await self.client.put_chunk_pack(binding.remote_id, send)
            except Exception:
                self.errors += 1
                raise
            self.chunks_uploaded += len(send)
            self.bytes_sent += nbytes
        finally:
            slots.release()

    async def _commit(
        self,
        vol: Volume,
        entry: RegistryEntry,
        binding: _Binding,
        result: VolumeResult,
        *,
        first: int,
        last: int,
    ) -> None:
        for attempt in (1, 2):
            changes = result.diff(binding.chunks)
            base = entry.remote_version
            assert base is not None and entry.remote_id is not None
            if not changes:
                version = base
                break
            if entry.remote_pending != first or self._registry_dirty:
                entry.remote_pending = first
                await self._save_registry()
            key = idempotency_key(entry.remote_id, first, last, base, changes)
            try:
                version = await self.client.commit(entry.remote_id, base, changes, key)
            except RemoteConflictError:  # a definite answer: this attempt changed nothing
                if attempt == 2:
                    raise
                await self._reconcile(vol, entry, binding, first)
                continue
            except RemoteRejectedError:  # refused: nothing was applied
                raise
            except BaseException as exc:  # no answer: the commit may or may not have happened
                if isinstance(exc, Exception):
                    self.errors += 1
                self._unanswered.add(vol.id)
                raise
            self._unanswered.discard(vol.id)
            break
        else:  # pragma: no cover - the loop breaks or raises
            raise AssertionError("unreachable")
        if changes:
            self.commits += 1
            for i, c in changes.items():
                if c is None:
                    binding.chunks.pop(i, None)
                else:
                    binding.chunks[i] = c
        binding.map_version = version
        self.committed_at[vol.name] = time.time()
        done = (version, None, True)
        if (
            (entry.remote_version, entry.remote_pending, entry.remote_synced) != done
            or entry.dirty
            or self._registry_dirty
        ):
            entry.remote_version, entry.remote_pending, entry.remote_synced = done
            entry.dirty = []
            await self._save_registry()

    async def _save_registry(self) -> None:
        """Writes the registry durably (in a worker thread); a failure is retried at the
        next save even if nothing changed in memory since."""
        self._registry_dirty = True
        await asyncio.to_thread(self.engine.save_registry)
        self._registry_dirty = False


def _prepare_all(datas: list[bytes | bytearray], cache: ChunkCache | None) -> list[PreparedChunk]:
    """Hashes and compresses chunks; a cached volume's new versions also go into the
    chunk cache now, while their bytes are at hand (in a worker thread)."""
    out = []
    for data in datas:
        chunk = prepare_chunk(data)
        if cache is not None:
            cache.put(chunk.id, data)
        out.append(chunk)
    return out


def _take(gen: Iterator[ChunkVersion]) -> list[ChunkVersion]:
    """The next few chunk versions (in a worker thread: the chunker reads disks)."""
    out: list[ChunkVersion] = []
    nbytes = 0
    for item in gen:
        out.append(item)
        if item[1] is not None:
            nbytes += len(item[1])
        if nbytes >= _TAKE_BYTES or len(out) >= _TAKE_ITEMS:
            break
    return out


def _allocated_chunks(vol: Volume, chunk_size: int) -> list[tuple[int, int]]:
    """Runs of chunk indexes where the base store holds anything but holes."""
    out: list[tuple[int, int]] = []
    pos = 0
    for length, hole in vol.base.allocated(0, vol.size):
        if not hole:
            a, b = pos // chunk_size, (pos + length - 1) // chunk_size + 1
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(b, out[-1][1]))
            else:
                out.append((a, b))
        pos += length
    return out
