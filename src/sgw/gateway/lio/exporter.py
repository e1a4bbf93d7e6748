"""The gateway's iSCSI export: each volume's NBD export on ``/dev/nbdN``, exported by LIO.

Applied at start and on every change (``apply`` with the volumes to export): LIO objects
of volumes that went are removed before their devices are detached; new volumes are
attached, then the live LIO objects are brought to the desired state
(:mod:`sgw.gateway.lio.desired`). ``clear`` is the stop: every LIO object of the gateway
goes, then every device is detached; only then may the NBD server drain (a device LIO
still exports whose server is gone hangs the machine's shutdown).

The attachments are recorded in ``RUNTIME_DIR/lio-exports.json`` so that a run that did
not stop cleanly is cleared by the next start or by ``python -m sgw.gateway.lio cleanup``
(the unit's ExecStopPost).

Access is closed by default (sgw.gateway.lio.access). The upgrade rule: a volume in the
registry from a version before that (its entry has no ``iscsi_legacy_open`` yet) and
without rules in ``chap.json`` was exported open, and stays so ("legacy open"); the first
``apply`` records that decision in the registry, once. The admin's first change of the
volume's access (``sync_chap``) ends it. Every export of an open target is logged at
warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgw.common.errors import ConfigError, IscsiExportError, SgwError
from sgw.common.files import write_atomically
from sgw.common.iscsi import CLOSED, LEGACY_OPEN
from sgw.common.signing import public_key_hex
from sgw.gateway.lio.access import Access, load_access
from sgw.gateway.lio.chap import CHAP_FILE
from sgw.gateway.lio.desired import (
    Change,
    Create,
    ExportedVolume,
    Remove,
    Update,
    default_iqn_base,
    desired_state,
    lun_serial,
    plan,
)
from sgw.gateway.lio.kernel import LioBackend, RtslibLio
from sgw.gateway.lio.nbd import NbdAttacher, Serve
from sgw.gateway.lio.settings import LioConfig
from sgw.gateway.volume.engine import VolumeEngine

if TYPE_CHECKING:
    from sgw.gateway.config import GatewayConfig

LOG = logging.getLogger(__name__)

STATE_FILE = "lio-exports.json"
# Seconds between looks at the volumes and chap.json (a change is applied within this);
# a volume that failed to export is retried every RETRY_INTERVAL seconds.
WATCH_INTERVAL = 2.0
RETRY_INTERVAL = 30.0


def exported_volumes(engine: VolumeEngine, gateway_key_hex: str) -> list[ExportedVolume]:
    """The engine's volumes with the stable serial numbers of their LUNs and whether they
    are legacy open."""
    return [
        ExportedVolume(
            name,
            lun_serial(gateway_key_hex, engine.registry[name].id),
            engine.registry[name].iscsi_legacy_open is True,
        )
        for name in sorted(engine.volumes)
    ]


class LioExporter:
    """Keeps LIO and the NBD attachments in step with the volumes."""

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        key: Ed25519PrivateKey,
        serve: Serve,
        size_of: Callable[[str], int],
        server_flags: int,
    ) -> LioExporter | None:
        """The exporter of a gateway whose ``[lio]`` is enabled, else None. ``serve``
        serves the daemon's end of a device's socket pair; ``size_of`` is a volume's size
        and ``server_flags`` the NBD transmission flags the devices are made with."""
        if config.lio is None or not config.lio.enabled:
            return None
        key_hex = public_key_hex(key)
        lio = config.lio
        attacher = NbdAttacher(
            serve,
            key_hex,
            size_of=size_of,
            server_flags=server_flags,
            block_size=lio.block_size,
            max_sectors_kb=lio.max_sectors_kb,
        )
        return cls(lio, config.data_dir, key_hex, attacher=attacher)

    def __init__(
        self,
        config: LioConfig,
        data_dir: str,
        gateway_key_hex: str,
        *,
        backend: LioBackend | None = None,
        attacher: NbdAttacher | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.iqn_base = config.iqn_base or default_iqn_base(gateway_key_hex)
        self.attacher = attacher or NbdAttacher(
            None,
            gateway_key_hex,
            block_size=config.block_size,
            max_sectors_kb=config.max_sectors_kb,
        )
        self.state_path = os.path.join(config.runtime_dir, STATE_FILE)
        self.devices: dict[str, str] = {}  # volume -> /dev/nbdN
        self.iqns: set[str] = set()  # every target made, so a half-made one is found
        self.errors: dict[str, str] = {}  # volume -> why it is not exported
        self.access: dict[str, str] = {}  # volume -> its access label (closed, chap 1, OPEN)
        self._backend = backend
        self._lock = asyncio.Lock()
        self._engine: VolumeEngine | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._key_hex = gateway_key_hex
        self._stale: dict[str, str] = {}  # devices found at start that were not reattached
        self._reattaching: dict[str, asyncio.Task[None]] = {}

    async def reattach(self, engine: VolumeEngine) -> None:
        """Reattaches the devices a run that did not stop cleanly left (the kernel holds
        their requests: LIO keeps exporting them, untouched). The first thing a restarted
        daemon does once its engine is open: every second here is a second of pause."""
        self._engine = engine
        async with self._lock:
            self._load_state()
            left, self.devices = dict(self.devices), {}
        for name, device in sorted(left.items()):
            if name in engine.volumes and await self.attacher.reattach(name, device):
                self.devices[name] = device
            else:
                self._stale[name] = device

    async def start(self, engine: VolumeEngine) -> None:
        """Clears what could not be reattached (``reattach``, called first), exports the
        engine's volumes and then follows them: volumes created or removed at runtime and
        changes of ``chap.json`` (and of the volumes' legacy flags) are applied within
        WATCH_INTERVAL seconds."""
        if self._engine is None:
            await self.reattach(engine)
        if self._stale:
            await self._clear_stale()
        await self.apply(exported_volumes(engine, self._key_hex))
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="lio")
        LOG.info("iSCSI export ready", extra=self.status())

    async def adopt(self, engine: VolumeEngine, devices: dict[str, str]) -> None:
        """Takes the export over as the daemon this one replaced left it (the blue-green
        swap): LIO and the devices are not touched, only followed from now on."""
        self._engine = engine
        async with self._lock:
            self._load_state()
            self.devices = dict(devices)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="lio")
        LOG.info("iSCSI export taken over", extra=self.status())

    def kernel_lost(self, device: str) -> None:
        """A device's connection ended without a detach (the kernel gave up on a request
        slower than its I/O timeout): gives it a new one at once; the kernel holds its
        requests meanwhile."""
        volume = next((n for n, d in self.devices.items() if d == device), None)
        if volume is None or self.attacher.detaching(device) or device in self._reattaching:
            return
        task = asyncio.get_running_loop().create_task(self._reattach(volume, device))
        self._reattaching[device] = task

    async def _reattach(self, volume: str, device: str) -> None:
        try:
            for attempt in range(5):
                if await self.attacher.reattach(volume, device):
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
            LOG.error(
                "a device lost its connection and could not be reattached",
                extra={"volume": volume, "device": device},
            )
        finally:
            self._reattaching.pop(device, None)

    async def _clear_stale(self) -> None:
        """Removes the targets of the devices that could not be reattached, then detaches
        those devices (they are attached afresh by ``apply``)."""
        async with self._lock:
            backend = await self._get_backend()
            keep = (
                [v for v in exported_volumes(self._engine, self._key_hex) if v.name in self.devices]
                if self._engine is not None
                else []
            )
            try:
                rules = await asyncio.to_thread(load_access, self.data_dir)
                await self._converge(backend, keep, self.devices, rules)
            except (ConfigError, IscsiExportError) as exc:
                LOG.error("LIO not cleared of stale devices: %s", exc)
            for name, device in sorted(self._stale.items()):
                try:
                    await self.attacher.detach(device)
                except IscsiExportError as exc:
                    self._failed(name, exc)
            self._stale.clear()
            self._save()

    async def stop(self) -> None:
        """Stops following the volumes, then clears (see ``clear``)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        await self.clear()

    async def unexport(self, volume: str) -> None:
        """Removes one volume's target and detaches its device (before it is deleted)."""
        if self._engine is not None:
            others = [v for v in exported_volumes(self._engine, self._key_hex) if v.name != volume]
            await self.apply(others)

    async def reexport(self) -> None:
        """Exports every volume of the engine again (after an ``unexport`` that was not
        followed by the volume's removal)."""
        if self._engine is not None:
            await self.apply(exported_volumes(self._engine, self._key_hex))

    async def _watch(self) -> None:
        assert self._engine is not None
        seen = self._fingerprint()
        last_try = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = self._fingerprint()
            retry = self.errors and time.monotonic() - last_try >= RETRY_INTERVAL
            if now == seen and not retry:
                continue
            seen, last_try = now, time.monotonic()
            try:
                await self.apply(exported_volumes(self._engine, self._key_hex))
            except (SgwError, OSError) as exc:
                LOG.error("iSCSI export not updated: %s", exc)

    def _fingerprint(self) -> tuple[object, ...]:
        """What a change of the export depends on: the volumes, their legacy flags and
        chap.json."""
        assert self._engine is not None
        try:
            st = os.stat(os.path.join(self.data_dir, CHAP_FILE))
            chap: tuple[int, ...] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            chap = ()
        legacy = sorted((n, e.iscsi_legacy_open) for n, e in self._engine.registry.items())
        return (tuple(sorted(self._engine.volumes)), tuple(legacy), chap)

    async def _with_legacy(
        self, volumes: Sequence[ExportedVolume], rules: Mapping[str, Access]
    ) -> list[ExportedVolume]:
        """The volumes with their legacy flags from the registry, after deciding (once,
        recorded in the registry) those of volumes an older version registered: legacy
        open if the volume has no rules now, as that version exported it open."""
        if self._engine is None:
            return list(volumes)
        registry = self._engine.registry
        undecided = sorted(n for n, e in registry.items() if e.iscsi_legacy_open is None)
        for name in undecided:
            registry[name].iscsi_legacy_open = name not in rules
            if name not in rules:
                LOG.warning(
                    "volume kept open to any iSCSI initiator, as before the update; set its "
                    "access (sgw volumes chap-set, acl-add or set-open --closed) to close it",
                    extra={"volume": name},
                )
        if undecided and self._engine.registry_path is not None:
            await asyncio.to_thread(self._engine.save_registry)
        return [
            replace(v, legacy_open=registry[v.name].iscsi_legacy_open is True)
            if v.name in registry
            else v
            for v in volumes
        ]

    def access_of(self, volume: str) -> str:
        """The volume's access label as last applied (``closed`` before that)."""
        return self.access.get(volume, CLOSED)

    async def apply(self, volumes: Sequence[ExportedVolume]) -> None:
        """Exports exactly these volumes. A volume that fails is logged and left out
        (``errors``); the others are exported."""
        async with self._lock:
            backend = await self._get_backend()
            try:
                rules = await asyncio.to_thread(load_access, self.data_dir)
            except ConfigError as exc:
                # Fail closed: nothing changes (nothing is exported at start) until the
                # file is fixed; a volume must not lose its CHAP to a damaged file.
                for vol in volumes:
                    self._failed(vol.name, exc)
                return
            self.errors = {}  # what fails below is recorded again
            volumes = await self._with_legacy(volumes, rules)
            self.access = {
                v.name: rules.get(v.name, Access()).label(v.legacy_open) for v in volumes
            }
            wanted = {v.name for v in volumes}
            kept = {n: d for n, d in self.devices.items() if n in wanted}
            # Targets of volumes that went, before their devices are detached (a device
            # whose target could not be removed stays attached).
            stuck = await self._converge(backend, volumes, kept, rules)
            for name in sorted(set(self.devices) - wanted - stuck):
                await self._detach(name)
            for vol in volumes:
                if vol.name not in self.devices:
                    try:
                        self.devices[vol.name] = await self.attacher.attach(
                            vol.name, set(self.devices.values())
                        )
                    except IscsiExportError as exc:
                        self._failed(vol.name, exc)
                    self._save()
            await self._converge(backend, volumes, self.devices, rules)
            self._save()

    async def clear(self, *, devices_first: bool = False) -> None:
        """Removes every LIO object of the gateway, then detaches every device. With
        ``devices_first`` (the clean-up after a daemon that died) the devices go first: a
        device whose daemon is gone holds its requests for a reattach (up to its
        dead-connection timeout), and LIO cannot remove a backstore with requests in
        flight; detached, the device fails them at once."""
        async with self._lock:
            self._load_state()
            if devices_first:
                await self._detach_all()
            try:
                backend = await self._get_backend()
            except IscsiExportError as exc:
                LOG.warning("LIO not cleared: %s", exc)
            else:
                try:
                    await self._converge(backend, (), {}, {})
                except IscsiExportError as exc:
                    LOG.error("LIO not cleared: %s", exc)
            # Even if LIO refused to let go, the devices are detached: LIO's I/O then
            # fails instead of waiting for a server that is about to stop.
            await self._detach_all()
            self.iqns.clear()
            self._save()

    async def _detach_all(self) -> None:
        for name in sorted(self.devices):
            try:
                await self._detach(name)
            except IscsiExportError as exc:
                self._failed(name, exc)

    def status(self) -> dict[str, Any]:
        """What is exported, for status output and tests."""
        return {
            "iqn_base": self.iqn_base,
            "portal": f"{self.config.portal_host}:{self.config.portal_port}",
            "devices": dict(sorted(self.devices.items())),
            "access": dict(sorted(self.access.items())),
            "errors": dict(sorted(self.errors.items())),
        }

    async def _converge(
        self,
        backend: LioBackend,
        volumes: Sequence[ExportedVolume],
        devices: dict[str, str],
        rules: dict[str, Access],
    ) -> set[str]:
        """Brings LIO to the desired state for ``devices``; returns the volumes whose
        target could not be removed."""
        desired = desired_state(volumes, devices, self.config, self.iqn_base, rules)
        live = await asyncio.to_thread(backend.live, frozenset(self.iqns))
        stuck: set[str] = set()
        for change in plan(desired, live):
            if isinstance(change, Create):
                self.iqns.add(change.spec.iqn)
                self._save()
            if not await self._apply(backend, change) and isinstance(change, Remove):
                stuck.add(change.live.volume)
        try:
            for name in await asyncio.to_thread(backend.orphan_backstores):
                await asyncio.to_thread(backend.remove_backstore, name)
        except IscsiExportError as exc:
            LOG.error("%s", exc)
        return stuck

    async def _apply(self, backend: LioBackend, change: Change) -> bool:
        """Carries out one change; a failure is logged and recorded for its volume. A
        target that becomes open is logged at warning, every time."""
        try:
            await asyncio.to_thread(backend.apply, change)
        except IscsiExportError as exc:
            volume = change.live.volume if isinstance(change, Remove) else change.spec.volume
            self._failed(volume, exc)
            return False
        if isinstance(change, Remove):
            self.iqns.discard(change.live.iqn)
        elif change.spec.access.open and not (
            isinstance(change, Update) and change.live.access.open
        ):
            legacy = self.access.get(change.spec.volume) == LEGACY_OPEN
            LOG.warning(
                "iSCSI target OPEN: any initiator on the network may log in and write, "
                "without authentication (%s); close it with sgw volumes set-open --closed, "
                "or add an initiator (sgw volumes chap-set, acl-add)",
                "legacy open: open before the update, no rules since"
                if legacy
                else "the volume's open flag",
                extra={"volume": change.spec.volume, "iqn": change.spec.iqn},
            )
        return True

    async def _detach(self, name: str) -> None:
        device = self.devices[name]
        await self.attacher.detach(device)
        del self.devices[name]
        self._save()

    async def _get_backend(self) -> LioBackend:
        if self._backend is None:
            self._backend = await asyncio.to_thread(RtslibLio)
        return self._backend

    def _failed(self, volume: str, exc: Exception) -> None:
        self.errors[volume] = str(exc)
        LOG.error("iSCSI export failed: %s", exc, extra={"volume": volume})

    def _load_state(self) -> None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_path} is unreadable ({exc}); remove it") from exc
        for name, device in dict(doc.get("devices", {})).items():
            self.devices.setdefault(str(name), str(device))
        self.iqns.update(str(i) for i in doc.get("iqns", []))

    def _save(self) -> None:
        doc = {"devices": self.devices, "iqns": sorted(self.iqns)}
        try:
            os.makedirs(self.config.runtime_dir, exist_ok=True)
            write_atomically(self.state_path, json.dumps(doc).encode(), mode=0o644)
        except OSError as exc:
            raise IscsiExportError(
                f"cannot record the NBD attachments in {self.state_path}: {exc}"
            ) from exc
