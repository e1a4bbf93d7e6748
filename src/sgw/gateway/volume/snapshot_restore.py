"""A stored volume created from a snapshot: its lazy restore, from start to finish.

Until the provider's map of the volume is known (it starts as the snapshot's map), reads
of the volume's disk wait. Then a ``TreeRestore`` serves: the first start marks the root
and records that in the registry, reads and the destager ``ensure`` the chunks they touch,
and a background walk restores the rest, after which the registry records the restore as
done and the volume reads its disk directly again.

Chunks are fetched from the remote volume, not from the snapshot: the remote volume is a
pointer copy of the snapshot, and an unrestored chunk is never written locally (the
destager restores a chunk before it changes or uploads it), so its map entry is still the
snapshot's. The snapshot may be deleted meanwhile without breaking the restore.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sgw.common.errors import ChunkCorruptError, VolumeStateError
from sgw.gateway.volume.base import FileBaseStore
from sgw.gateway.volume.engine import RegistryEntry, VolumeEngine
from sgw.gateway.volume.remote import BlockApiClient
from sgw.gateway.volume.restore_tree import TreeRestore
from sgw.gateway.volume.volume import Volume, VolumeStatus

LOG = logging.getLogger(__name__)


class VolumeRestore:
    """``Volume.restore`` while a stored volume restores from its snapshot."""

    def __init__(self, engine: VolumeEngine, vol: Volume, entry: RegistryEntry) -> None:
        if entry.restore_token is None:
            raise VolumeStateError(f"volume {vol.name} has no restore to run")
        if not isinstance(vol.base, FileBaseStore):
            raise VolumeStateError(f"volume {vol.name}: only a stored volume restores lazily")
        self.engine = engine
        self.vol = vol
        self.entry = entry
        self.tree: TreeRestore | None = None
        self._ready = asyncio.Event()
        vol.restore = self
        vol.set_status(VolumeStatus.RESTORING, "loading the snapshot's chunk map")

    # -- LazyRestore ---------------------------------------------------------------------

    def is_restored(self, offset: int, length: int) -> bool:
        return self.tree is not None and self.tree.is_restored(offset, length)

    async def ensure(self, offset: int, length: int) -> None:
        await self._ready.wait()
        assert self.tree is not None
        await self.tree.ensure(offset, length)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def progress(self) -> dict[str, object]:
        """For status reports."""
        tree = self.tree
        return {
            "restore_chunks": tree.total if tree else None,
            "restore_done": tree.restored if tree else 0,
        }

    async def start(
        self, client: BlockApiClient, remote_id: str, chunk_size: int, chunks: dict[int, str]
    ) -> None:
        """Starts serving from the remote map (``chunks``: a copy taken now)."""
        chunks = dict(chunks)

        async def fetch(index: int) -> bytes | None:
            cid = chunks.get(index)
            if cid is None:
                return None
            data = await client.get_chunk(remote_id, cid)
            # Hashing 1 MiB takes about a millisecond: not on the loop that serves I/O.
            if await asyncio.to_thread(_sha256_hex, data) != cid:
                raise ChunkCorruptError(
                    f"volume {self.vol.name}: chunk {index} from the provider does not match "
                    f"its id {cid[:12]}"
                )
            return data

        assert self.entry.restore_token is not None
        base = self.vol.base
        assert isinstance(base, FileBaseStore)
        tree = TreeRestore(
            base, self.vol.size, chunk_size, bytes.fromhex(self.entry.restore_token), fetch
        )
        if not self.entry.restore_begun:
            await tree.begin()
            self.entry.restore_begun = True
            await asyncio.to_thread(self.engine.save_registry)
        self.tree = tree
        self._ready.set()
        self.vol.set_status(VolumeStatus.RESTORING, "restoring from the snapshot")
        LOG.info(
            "volume restoring from snapshot",
            extra={"volume": self.vol.name, "snapshot": self.entry.snapshot, "chunks": tree.total},
        )

    async def run(self, concurrency: int = 4) -> None:
        """Restores the rest in the background; records completion."""
        assert self.tree is not None
        await self.tree.run_background(concurrency=concurrency)
        if not self.tree.done:
            raise VolumeStateError(f"volume {self.vol.name}: restore stopped before the end")
        self.entry.restore_done = True
        await asyncio.to_thread(self.engine.save_registry)
        self.vol.restore = None
        self.vol.set_status(VolumeStatus.AVAILABLE)
        LOG.info("volume restored", extra={"volume": self.vol.name})

    async def aclose(self) -> None:
        """Stops the restores in flight."""
        if self.tree is not None:
            await self.tree.aclose()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
