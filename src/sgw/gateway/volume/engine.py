"""The volume engine: the gateway's write log, its volumes and their persistent registry.

The registry (``volumes.json`` in the data directory) gives each volume a stable numeric id
used in log records, its size, its mode (stored on a local disk, or cached: the primary
copy at the provider, a chunk cache locally) and its disk, and, once it uploads to a
provider, the remote volume it is bound to and the map version the gateway last
committed. It is written atomically; files written before the remote and mode fields
existed still load (an entry without ``iscsi_legacy_open`` was written before iSCSI access
was closed by default: see ``RegistryEntry``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from sgw.common.errors import HandoverError, VolumeStateError
from sgw.common.files import write_atomically
from sgw.gateway.volume.base import BaseStore, FileBaseStore
from sgw.gateway.volume.cached_base import DEFAULT_READ_AHEAD, CachedBaseStore
from sgw.gateway.volume.chunk_cache import ChunkCache
from sgw.gateway.volume.index import BLOCK
from sgw.gateway.volume.snapshots import (
    SnapshotRequest,
    SnapshotState,
    decode_marker,
    encode_marker,
    new_snapshot_id,
)
from sgw.gateway.volume.volume import Volume, VolumeStatus
from sgw.gateway.volume.wal import HEADER_SIZE, KIND_SNAPSHOT, LogState, Record, WriteLog

LOG = logging.getLogger(__name__)

REGISTRY_FILE = "volumes.json"
MODE_STORED = "stored"
MODE_CACHED = "cached"
MODES = (MODE_STORED, MODE_CACHED)
# Granularity of the ranges a volume in pass-through records as changed (bytes).
DIRTY_GRAIN = 1 << 20
# Finished snapshot requests remembered for status queries (pending ones are all kept).
KEEP_FINISHED_SNAPSHOTS = 256


@dataclass(frozen=True)
class VolumeSpec:
    """A volume as configured: name, size in bytes, the disk that holds it (stored mode;
    empty for a cached volume, whose base is the shared chunk cache), its mode, and the
    snapshot it is created from (None: it starts all zero)."""

    name: str
    size: int
    path: str
    mode: str = MODE_STORED
    snapshot: str | None = None


class VolumeEngine:
    """Owns the write log and the volumes; recovers them at start."""

    def __init__(
        self,
        log: WriteLog,
        volumes: dict[str, Volume],
        registry: dict[str, RegistryEntry] | None = None,
        registry_path: str | None = None,
    ) -> None:
        self.log = log
        self.volumes = volumes
        self.by_id = {v.id: v for v in volumes.values()}
        self.registry = registry if registry is not None else {}
        self.registry_path = registry_path
        # Snapshots requested since start (and those whose markers recovery found).
        self.snapshots: dict[str, SnapshotRequest] = {}
        # Set by whoever installs an upload step: without one, snapshots cannot be made.
        self.snapshots_enabled = False
        # Registry saves run in worker threads: one at a time, each writing the registry
        # as it is when the save starts, so the last save holds every change before it.
        self._save_lock = threading.Lock()
        # A standby engine's records as indexed, until ``catch_up``.
        self._standby_records: list[Record] | None = None

    @classmethod
    def open(
        cls,
        data_dir: str,
        log_path: str,
        log_size: int,
        specs: Iterable[VolumeSpec],
        *,
        cache: ChunkCache | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
        standby: bool = False,
    ) -> VolumeEngine:
        """Opens (creating on first start) the log and volumes, and replays the log.

        Cached volumes need ``cache`` (shared by all of them); their maps are loaded from
        the provider later (``CachedBaseStore.load``), reads of their base wait for it.
        ``standby``: the successor of a running daemon indexes the log while the running
        one still appends, and writes nothing (``catch_up`` then takes over).
        """
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        specs = list(specs)
        registry_path = os.path.join(data_dir, REGISTRY_FILE)
        registry = _load_registry(registry_path)
        # Volumes created at runtime (the control channel) open without configuration.
        configured = {s.name for s in specs}
        specs += [e.spec(n) for n, e in registry.items() if e.managed and n not in configured]
        changed = False
        next_id = max((v.id for v in registry.values()), default=0) + 1
        for spec in specs:
            known = registry.get(spec.name)
            if known is None:
                registry[spec.name] = RegistryEntry(
                    next_id,
                    spec.size,
                    spec.path,
                    mode=spec.mode,
                    snapshot=spec.snapshot,
                    restore_token=(
                        secrets.token_hex(16)
                        if spec.snapshot and spec.mode == MODE_STORED
                        else None
                    ),
                )
                next_id += 1
                changed = True
            elif spec.snapshot is not None and known.snapshot != spec.snapshot:
                origin = f"snapshot {known.snapshot}" if known.snapshot else "empty"
                raise VolumeStateError(
                    f"volume {spec.name} exists already (created {origin}) and cannot be "
                    f"created again from snapshot {spec.snapshot}; use a new volume name"
                )
            elif known.mode != spec.mode:
                raise VolumeStateError(
                    f"volume {spec.name} is a {known.mode} volume but is configured as "
                    f"{spec.mode}; changing the mode of a volume is not supported, configure "
                    f'mode = "{known.mode}" (or a new volume under another name)'
                )
            elif known.size != spec.size:
                raise VolumeStateError(
                    f"volume {spec.name} exists with size {known.size} bytes but is "
                    f"configured with {spec.size}; resizing is not supported, "
                    "configure the existing size"
                )
            elif spec.mode == MODE_STORED and known.path != spec.path:
                raise VolumeStateError(
                    f"volume {spec.name} lives on {known.path} but is configured on "
                    f"{spec.path}; move the disk back or fix the configuration"
                )
        if changed and standby:
            raise HandoverError(
                "the new daemon's configuration names volumes the running one does not "
                "have; swap with the running daemon's configuration"
            )
        if changed:
            _save_registry(registry_path, registry)

        if not os.path.exists(log_path):
            if standby:
                raise HandoverError(f"the write log {log_path} does not exist")
            WriteLog.create(log_path, log_size)
        log, records = WriteLog.open(log_path, standby=standby)
        volumes: dict[str, Volume] = {}
        try:
            for spec in specs:
                entry = registry[spec.name]
                if spec.size % BLOCK:
                    raise VolumeStateError(
                        f"volume {spec.name}: size {spec.size} is not a multiple of 4 KiB"
                    )
                base: BaseStore
                if spec.mode == MODE_CACHED:
                    if cache is None:
                        raise VolumeStateError(
                            f"volume {spec.name} is cached but the gateway has no chunk cache"
                        )
                    base = CachedBaseStore(spec.name, spec.size, cache, read_ahead)
                else:
                    os.makedirs(os.path.dirname(os.path.abspath(spec.path)), exist_ok=True)
                    base = FileBaseStore(spec.path, spec.size, create=True)
                volumes[spec.name] = Volume(spec.name, entry.id, spec.size, base, log)
            engine = cls(log, volumes, registry, registry_path)
            engine._replay(records, registry)
            if standby:
                engine._standby_records = records
        except BaseException:
            for v in volumes.values():
                v.base.close()
            log.close()
            raise
        return engine

    def _replay(self, records: list[Record], registry: dict[str, RegistryEntry]) -> None:
        names = {v.id: k for k, v in registry.items()}
        for rec in records:
            vol = self.by_id.get(rec.volume)
            if vol is not None:
                vol.last_seq = rec.seq
            if vol is None:
                name = names.get(rec.volume, f"#{rec.volume}")
                raise VolumeStateError(
                    f"the write log holds data of volume {name} that is not configured; "
                    "configure it again so the data can be destaged"
                )
            if rec.kind == KIND_SNAPSHOT:
                self._add_snapshot(vol, rec)
                continue
            vol.replay(rec)
        if records:
            LOG.info("write log replayed", extra={"records": len(records)})

    def reload_registry(self) -> None:
        """A standby, once the running daemon is quiet (it saved its registry and changes it
        no more): takes the registry as that daemon left it. The copy read at open is
        stale: the running daemon's destager went on committing (map versions, pending
        batches) while this one indexed the log. HandoverError if its volumes changed
        meanwhile (created or deleted): the swap is called off."""
        if self._standby_records is None:
            raise HandoverError("this engine is not a standby: its registry is its own")
        assert self.registry_path is not None
        saved = _load_registry(self.registry_path)
        if {n: e.id for n, e in saved.items()} != {n: e.id for n, e in self.registry.items()}:
            raise HandoverError(
                "the running daemon's volumes changed while the new one indexed the log "
                f"(now {sorted(saved)}, then {sorted(self.registry)}); swap again"
            )
        for name, entry in self.registry.items():  # in place: restores hold their entry
            vars(entry).update(vars(saved[name]))

    def catch_up(self, state: LogState, snapshots: Iterable[SnapshotRequest]) -> int:
        """Takes over the log from the daemon that ran it (a standby engine, at the swap):
        forgets what that daemon destaged since the standby indexed the log, indexes what
        it appended since, and continues from its last record. Returns the records
        caught up."""
        scanned = self._standby_records
        if scanned is None:
            raise HandoverError("this engine is not a standby: it has nothing to catch up")
        for rec in scanned:  # destaged meanwhile: the base store has them (or newer)
            if rec.seq < state.tail_seq:
                self.reclaim(rec)
        if scanned and scanned[-1].seq + 1 >= state.tail_seq:
            last = scanned[-1]
            pos, seq = last.virt + last.size, last.seq + 1
        else:
            pos, seq = state.tail, state.tail_seq
        records = self.log.records_since(pos, seq, state)
        self._replay(records, self.registry)
        self.log.adopt(state)
        self.snapshots = {req.id: req for req in snapshots}
        self._standby_records = None
        return len(records)

    def pending_snapshots(self) -> bool:
        """True while a snapshot marker waits in the log (the destager should not idle)."""
        return any(r.state == SnapshotState.PENDING for r in self.snapshots.values())

    def _forget_finished_snapshots(self) -> None:
        finished = [k for k, r in self.snapshots.items() if r.state != SnapshotState.PENDING]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED_SNAPSHOTS)]:
            del self.snapshots[k]

    def _add_snapshot(self, vol: Volume, rec: Record) -> SnapshotRequest:
        snapshot_id, description = decode_marker(self.log.read(rec.payload_pos, rec.length))
        req = SnapshotRequest(snapshot_id, vol.name, description, rec.seq)
        self.snapshots[snapshot_id] = req
        return req

    def snapshot_for(self, rec: Record) -> SnapshotRequest:
        """The request a marker record stands for."""
        vol = self.by_id[rec.volume]
        snapshot_id, _ = decode_marker(self.log.read(rec.payload_pos, rec.length))
        req = self.snapshots.get(snapshot_id)
        return req if req is not None else self._add_snapshot(vol, rec)

    async def request_snapshot(self, name: str, description: str | None = None) -> SnapshotRequest:
        """Appends a durable snapshot marker for volume ``name``; the snapshot is the
        volume as of now (every write acknowledged before this call, none after it)."""
        vol = self.volumes.get(name)
        if vol is None:
            raise VolumeStateError(f"no volume named {name!r} on this gateway")
        if not self.snapshots_enabled:
            raise VolumeStateError(
                "snapshots are kept by the provider and this gateway has none; configure "
                "[remote] (or --provider)"
            )
        if vol.status == VolumeStatus.PASS_THROUGH:
            raise VolumeStateError(
                f"volume {name} is in pass-through (the provider was unreachable and the write "
                "log filled up); take the snapshot once it is AVAILABLE again"
            )
        snapshot_id = new_snapshot_id()
        payload = encode_marker(snapshot_id, description)
        log = self.log
        size = HEADER_SIZE + len(payload)
        if log.space_waiters or not log.fits(size):
            fut = log.wait_for_space(size)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    log.waiter_done()
                raise
            try:
                rec = log.append(KIND_SNAPSHOT, vol.id, 0, len(payload), payload)
            finally:
                log.waiter_done()
        else:
            rec = log.append(KIND_SNAPSHOT, vol.id, 0, len(payload), payload)
        vol.last_seq = rec.seq
        req = SnapshotRequest(snapshot_id, name, description, rec.seq)
        self._forget_finished_snapshots()
        self.snapshots[snapshot_id] = req
        await log.sync()
        LOG.info(
            "snapshot requested",
            extra={"snapshot": snapshot_id, "volume": name, "seq": rec.seq},
        )
        return req

    def save_registry(self) -> None:
        """Writes the registry (after changing an entry's remote fields) atomically and
        durably (blocking: run it off the event loop)."""
        if self.registry_path is None:
            raise VolumeStateError("this engine has no registry file to save")
        with self._save_lock:
            _save_registry(self.registry_path, self.registry)

    # -- volumes added and removed while the gateway runs (the control channel) ----------

    def holds_log_data(self, name: str) -> bool:
        """True while the write log holds a record of the volume (data not destaged yet,
        or a snapshot marker not passed yet)."""
        vol = self.volumes.get(name)
        return vol is not None and vol.last_seq >= self.log.tail_seq

    async def create_volume(
        self,
        spec: VolumeSpec,
        *,
        cache: ChunkCache | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
        remote_id: str | None = None,
    ) -> Volume:
        """Adds a volume while the gateway runs: registered as managed (it opens at every
        start without being configured), its disk made, served by the NBD listeners from
        now on. ``remote_id``: the provider's volume it is bound to, made already."""
        name = spec.name
        if name in self.volumes or name in self.registry:
            raise VolumeStateError(f"a volume named {name} exists on this gateway already")
        if spec.size <= 0 or spec.size % BLOCK:
            raise VolumeStateError(f"volume {name}: size {spec.size} is not a multiple of 4 KiB")
        if spec.mode == MODE_CACHED and cache is None:
            raise VolumeStateError(f"volume {name} is cached but the gateway has no chunk cache")
        entry = RegistryEntry(
            max((e.id for e in self.registry.values()), default=0) + 1,
            spec.size,
            spec.path,
            mode=spec.mode,
            snapshot=spec.snapshot,
            restore_token=(
                secrets.token_hex(16) if spec.snapshot and spec.mode == MODE_STORED else None
            ),
            managed=True,
        )
        if remote_id is not None:
            # A snapshot's copy is never uploaded back; a new disk holds nothing to upload.
            entry.remote_id, entry.remote_synced = remote_id, spec.snapshot is not None
        if spec.mode == MODE_STORED:
            await asyncio.to_thread(_remove_disk_file, spec.path)
            disks = os.path.dirname(os.path.abspath(spec.path))
            await asyncio.to_thread(os.makedirs, disks, 0o700, True)
        self.registry[name] = entry
        base: BaseStore
        try:
            await asyncio.to_thread(self.save_registry)
            if spec.mode == MODE_CACHED:
                assert cache is not None
                base = CachedBaseStore(name, spec.size, cache, read_ahead)
            else:
                base = await asyncio.to_thread(FileBaseStore, spec.path, spec.size, True)
        except BaseException:
            self.registry.pop(name, None)
            await asyncio.to_thread(self.save_registry)
            raise
        vol = Volume(name, entry.id, spec.size, base, self.log)
        self.volumes[name] = vol
        self.by_id[vol.id] = vol
        LOG.info(
            "volume created",
            extra={"volume": name, "mode": spec.mode, "size": spec.size, "remote_id": remote_id},
        )
        return vol

    async def remove_volume(self, name: str) -> None:
        """Removes a volume created at runtime, with its disk file. Refused while the write
        log holds any of its records (destage them first) or it has changes made in
        pass-through that were not uploaded."""
        vol = self.volumes.get(name)
        entry = self.registry.get(name)
        if vol is None or entry is None:
            raise VolumeStateError(f"no volume named {name!r} on this gateway")
        if not entry.managed:
            raise VolumeStateError(
                f"volume {name} is in the gateway's configuration: remove it there (and "
                "restart the gateway) instead"
            )
        if self.holds_log_data(name):
            raise VolumeStateError(
                f"the write log still holds data of volume {name} that is not destaged; "
                "delete it with drain (it waits for the destager) or after the data is uploaded"
            )
        if entry.dirty:
            raise VolumeStateError(
                f"volume {name} has changes made in pass-through that are not uploaded yet; "
                "delete it once the provider is reachable and they are uploaded"
            )
        del self.volumes[name]
        del self.by_id[vol.id]
        del self.registry[name]
        try:
            await asyncio.to_thread(self.save_registry)
        except BaseException:
            self.registry[name], self.volumes[name], self.by_id[vol.id] = entry, vol, vol
            raise
        vol.base.close()
        if entry.mode == MODE_STORED:
            await asyncio.to_thread(_remove_disk_file, entry.path)
        LOG.info("volume deleted", extra={"volume": name, "remote_id": entry.remote_id})

    async def flush(self) -> None:
        """Every write acknowledged so far is durable when this returns."""
        await self.log.sync()

    def reclaim(self, rec: Record) -> None:
        """Drops the index entries of a destaged record."""
        vol = self.by_id.get(rec.volume)
        if vol is not None:
            vol.reclaim(rec)

    def close(self) -> None:
        """Makes the log durable and closes every file."""
        self.log.sync_now()
        self.log.close()
        for v in self.volumes.values():
            v.base.close()


@dataclass
class RegistryEntry:
    """A volume's permanent facts: its id in log records, its size, its disk and mode.

    The remote fields bind it to a volume at the provider: ``remote_id``; the map version
    the gateway last committed (``remote_version``); ``remote_pending``, the first log
    sequence number of a batch whose commit was sent but whose answer was not recorded
    (a crash in between), so that a restart can tell its own lost commit from a foreign
    writer; and ``remote_synced``, False until the first commit after binding, which also
    uploads what the local disk held before the volume was bound.

    A volume created from a snapshot names it (``snapshot``); its remote volume starts as a
    copy of the snapshot's map. A stored one restores its disk lazily (``restore``): the
    ``restore_token`` tells its restore marks from data, ``restore_begun`` says the root
    mark is on disk, ``restore_done`` that every chunk is local.
    """

    id: int
    size: int
    path: str
    remote_id: str | None = None
    remote_version: int | None = None
    remote_pending: int | None = None
    remote_synced: bool = False
    mode: str = MODE_STORED
    remote_created: bool = True  # False: remote_id chosen, the provider not yet asked
    snapshot: str | None = None
    restore_token: str | None = None
    restore_begun: bool = False
    restore_done: bool = False
    # Byte ranges [start, end) changed on the local disk without an upload (pass-through),
    # aligned to DIRTY_GRAIN; uploaded again (and cleared) by the next commit.
    dirty: list[list[int]] = field(default_factory=list)
    # Created at runtime (the control channel): opened at start without configuration.
    managed: bool = False
    # Exported over iSCSI to any initiator, as before access was closed by default, until
    # the admin first sets the volume's access (sgw.gateway.lio). None: registered by an
    # older version and not yet decided (the LIO exporter decides once: open if the volume
    # had no login rules then); volumes registered since start False (closed).
    iscsi_legacy_open: bool | None = False

    def spec(self, name: str) -> VolumeSpec:
        """The volume as if it were configured."""
        return VolumeSpec(name, self.size, self.path, self.mode, self.snapshot)

    def add_dirty(self, start: int, end: int) -> None:
        """Records that ``[start, end)`` changed locally only."""
        start -= start % DIRTY_GRAIN
        end = min(self.size, -(-end // DIRTY_GRAIN) * DIRTY_GRAIN)
        runs = [*self.dirty, [start, end]]
        runs.sort()
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.dirty = merged

    def dirty_chunks(self, chunk_size: int) -> list[tuple[int, int]]:
        """The dirty ranges as runs of chunk indexes."""
        return [(a // chunk_size, -(-b // chunk_size)) for a, b in self.dirty]

    @property
    def restoring(self) -> bool:
        """A stored volume created from a snapshot whose data is not all local yet."""
        return self.restore_token is not None and not self.restore_done


def _remove_disk_file(path: str) -> None:
    """Removes a volume's disk file that no registry entry names any more (left by a
    crash between a delete's registry save and the unlink); devices are never touched."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.unlink(path)
        LOG.info("volume disk file removed", extra={"path": path})


def _save_registry(path: str, registry: dict[str, RegistryEntry]) -> None:
    doc = {name: vars(entry) for name, entry in list(registry.items())}
    write_atomically(path, json.dumps(doc, indent=2).encode())


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _load_registry(path: str) -> dict[str, RegistryEntry]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VolumeStateError(f"volume registry {path} is unreadable: {exc}") from exc
    try:
        return {
            str(name): RegistryEntry(
                int(e["id"]),
                int(e["size"]),
                str(e["path"]),
                remote_id=None if e.get("remote_id") is None else str(e["remote_id"]),
                remote_version=_optional_int(e.get("remote_version")),
                remote_pending=_optional_int(e.get("remote_pending")),
                remote_synced=bool(e.get("remote_synced", False)),
                mode=str(e.get("mode", MODE_STORED)),
                remote_created=bool(e.get("remote_created", True)),
                snapshot=None if e.get("snapshot") is None else str(e["snapshot"]),
                restore_token=None if e.get("restore_token") is None else str(e["restore_token"]),
                restore_begun=bool(e.get("restore_begun", False)),
                restore_done=bool(e.get("restore_done", False)),
                dirty=[[int(a), int(b)] for a, b in e.get("dirty", [])],
                managed=bool(e.get("managed", False)),
                iscsi_legacy_open=(
                    None if e.get("iscsi_legacy_open") is None else bool(e["iscsi_legacy_open"])
                ),
            )
            for name, e in data.items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise VolumeStateError(f"volume registry {path} is malformed: {exc}") from exc
