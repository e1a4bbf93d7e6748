"""The volume engine: the gateway's write log, its volumes and their persistent registry.

The registry (``volumes.json`` in the data directory) gives each volume a stable numeric id
used in log records, its size and its disk. It is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from sgw.common.errors import VolumeStateError
from sgw.common.files import write_atomically
from sgw.gateway.volume.base import FileBaseStore
from sgw.gateway.volume.index import BLOCK
from sgw.gateway.volume.volume import Volume
from sgw.gateway.volume.wal import Record, WriteLog

LOG = logging.getLogger(__name__)

REGISTRY_FILE = "volumes.json"


@dataclass(frozen=True)
class VolumeSpec:
    """A volume as configured: name, size in bytes and the disk that holds it."""

    name: str
    size: int
    path: str


class VolumeEngine:
    """Owns the write log and the volumes; recovers them at start."""

    def __init__(self, log: WriteLog, volumes: dict[str, Volume]) -> None:
        self.log = log
        self.volumes = volumes
        self.by_id = {v.id: v for v in volumes.values()}

    @classmethod
    def open(
        cls, data_dir: str, log_path: str, log_size: int, specs: Iterable[VolumeSpec]
    ) -> VolumeEngine:
        """Opens (creating on first start) the log and volumes, and replays the log."""
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        specs = list(specs)
        registry_path = os.path.join(data_dir, REGISTRY_FILE)
        registry = _load_registry(registry_path)
        changed = False
        next_id = max((v.id for v in registry.values()), default=0) + 1
        for spec in specs:
            known = registry.get(spec.name)
            if known is None:
                registry[spec.name] = RegistryEntry(next_id, spec.size, spec.path)
                next_id += 1
                changed = True
            elif known.size != spec.size:
                raise VolumeStateError(
                    f"volume {spec.name} exists with size {known.size} bytes but is "
                    f"configured with {spec.size}; resizing is not supported, "
                    "configure the existing size"
                )
            elif known.path != spec.path:
                raise VolumeStateError(
                    f"volume {spec.name} lives on {known.path} but is configured on "
                    f"{spec.path}; move the disk back or fix the configuration"
                )
        if changed:
            doc = {name: vars(entry) for name, entry in registry.items()}
            write_atomically(registry_path, json.dumps(doc, indent=2).encode())

        if not os.path.exists(log_path):
            WriteLog.create(log_path, log_size)
        log, records = WriteLog.open(log_path)
        volumes: dict[str, Volume] = {}
        try:
            for spec in specs:
                entry = registry[spec.name]
                if spec.size % BLOCK:
                    raise VolumeStateError(
                        f"volume {spec.name}: size {spec.size} is not a multiple of 4 KiB"
                    )
                os.makedirs(os.path.dirname(os.path.abspath(spec.path)), exist_ok=True)
                base = FileBaseStore(spec.path, spec.size, create=True)
                volumes[spec.name] = Volume(spec.name, entry.id, spec.size, base, log)
            engine = cls(log, volumes)
            engine._replay(records, registry)
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
            if vol is None:
                name = names.get(rec.volume, f"#{rec.volume}")
                raise VolumeStateError(
                    f"the write log holds data of volume {name} that is not configured; "
                    "configure it again so the data can be destaged"
                )
            vol.replay(rec)
        if records:
            LOG.info("write log replayed", extra={"records": len(records)})

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
    """A volume's permanent facts: its id in log records, its size and its disk."""

    id: int
    size: int
    path: str


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
            str(name): RegistryEntry(int(e["id"]), int(e["size"]), str(e["path"]))
            for name, e in data.items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise VolumeStateError(f"volume registry {path} is malformed: {exc}") from exc
