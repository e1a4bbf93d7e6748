"""What the gateway does for each command of the control channel.

The same operations as the local admin socket (``AdminOps``: status, snapshot) plus
what only the provider's console asks for: volumes created and deleted at runtime, CHAP
credentials fetched into ``chap.json``, bandwidth limits changed on the fly (kept in
``DATA_DIR/bandwidth.json``, which overrides ``[remote] bandwidth`` at start), and a
diagnostics bundle. A refusal raises ``CommandError`` (or another ``SgwError``) whose
message becomes the failed reply.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import httpx

from sgw.common.errors import CommandError, SgwError
from sgw.common.files import write_atomically
from sgw.gateway.link.activation import tls_verify
from sgw.gateway.link.diagnostics import LogRing, build_bundle, system_info
from sgw.gateway.link.journal import Command
from sgw.gateway.lio.chap import ChapCredential, ChapStore
from sgw.gateway.volume.engine import MODE_CACHED, MODE_STORED, VolumeSpec

if TYPE_CHECKING:
    from sgw.gateway.daemon import Gateway
    from sgw.gateway.link.channel import ControlChannel

LOG = logging.getLogger(__name__)

BANDWIDTH_FILE = "bandwidth.json"
# How long a delete with drain waits for the destager to empty the log of the volume.
DRAIN_TIMEOUT_S = 600.0
# How long a delete waits for the NBD connection of a detached /dev/nbdN to close.
DETACH_WAIT_S = 5.0


class GatewayCommands:
    """Executes the control channel's commands on a running gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.chap = ChapStore(gateway.config.data_dir)
        self.logs = LogRing()
        self.channel: ControlChannel | None = None
        self.started = time.monotonic()
        self._http: httpx.AsyncClient | None = None

    def install(self) -> None:
        """Starts keeping log lines for diagnostics; applies the stored bandwidth limits."""
        logging.getLogger().addHandler(self.logs)
        limits = self._load_limits()
        if limits:
            self._apply_limits(limits.get("upload"), limits.get("download"))
            LOG.info("bandwidth limits from the console applied", extra=limits)

    async def close(self) -> None:
        logging.getLogger().removeHandler(self.logs)
        if self._http is not None:
            await self._http.aclose()

    async def __call__(self, cmd: Command) -> dict[str, Any]:
        handler = getattr(self, f"_do_{cmd.type}", None)
        if handler is None:
            raise CommandError(
                f"this gateway (sgw {self._version()}) does not know the command {cmd.type!r}; "
                "update it"
            )
        result: dict[str, Any] = await handler(cmd.args)
        return result

    # -- state ---------------------------------------------------------------------------

    async def _do_describe(self, _args: dict[str, Any]) -> dict[str, Any]:
        status = self.gw.admin.ops.status()
        status["gateway"] = {
            "version": self._version(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "bandwidth": self._current_limits(),
            "control": self._control_info(),
        }
        return status

    async def _do_diagnostics(self, _args: dict[str, Any]) -> dict[str, Any]:
        gw = self.gw
        registry = {
            name: {k: v for k, v in vars(e).items() if k != "restore_token"}
            for name, e in gw.engine.registry.items()
        }
        files = {
            "status.json": gw.admin.ops.status(),
            "config.json": dataclasses.asdict(gw.config),
            "volumes.json": registry,
            "control.json": self._control_info(),
            "system.json": system_info(gw.config.data_dir, self.started),
        }
        bundle = await asyncio.to_thread(build_bundle, files, list(self.logs.lines))
        return {
            "bundle": base64.b64encode(bundle).decode("ascii"),
            "size": len(bundle),
            "sha256": hashlib.sha256(bundle).hexdigest(),
            "files": [*sorted(files), "logs.jsonl"],
        }

    async def _do_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.gw.admin.ops.snapshot(
            _text(args, "volume"), args.get("description"), bool(args.get("wait", False))
        )

    # -- volumes -------------------------------------------------------------------------

    async def _do_create_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        gw = self.gw
        name, mode = _text(args, "name"), _text(args, "mode")
        size, remote_id = int(args["size"]), _text(args, "volume_id")
        snapshot = args.get("snapshot_id")
        if gw.uploader is None or gw.config.remote is None:
            raise CommandError("this gateway has no provider configured ([remote] url)")
        if mode not in (MODE_STORED, MODE_CACHED):
            raise CommandError(f"mode {mode!r} is not stored or cached")
        existing = gw.engine.registry.get(name)
        if existing is not None:
            if existing.remote_id == remote_id and existing.size == size:
                return self._volume_info(name)  # made before, by this very command
            raise CommandError(f"a volume named {name} exists on this gateway already")
        disks = os.path.join(gw.config.data_dir, "volumes")
        path = "" if mode == MODE_CACHED else os.path.join(disks, f"{name}.img")
        spec = VolumeSpec(name, size, path, mode, None if snapshot is None else str(snapshot))
        read_ahead = gw.config.cache.read_ahead if gw.config.cache else 0
        vol = await gw.engine.create_volume(
            spec, cache=gw.cache, read_ahead=read_ahead, remote_id=remote_id
        )
        try:
            await gw.uploader.bind(vol)  # the provider's volume exists and matches
        except BaseException as exc:
            gw.uploader.forget(vol.id)
            await gw.engine.remove_volume(name)
            if isinstance(exc, SgwError):
                raise CommandError(f"volume {name} not created: {exc}") from exc
            raise
        gw.serve_new_volume(vol)
        return self._volume_info(name)

    async def _do_delete_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        gw = self.gw
        name = _text(args, "volume")
        vol = gw.engine.volumes.get(name)
        if vol is None:  # gone already (deleted before, or never made): nothing to do
            return {"name": name, "deleted": False, "reason": "no such volume on this gateway"}
        entry = gw.engine.registry[name]
        remote_id = args.get("volume_id")
        if remote_id and entry.remote_id not in (None, remote_id):
            raise CommandError(
                f"volume {name} on this gateway is bound to {entry.remote_id}, not {remote_id}"
            )
        if not entry.managed:  # refused before anything is torn down
            raise CommandError(
                f"volume {name} is in the gateway's configuration: remove it there (and "
                "restart the gateway) instead"
            )
        if not args.get("drain") and gw.engine.holds_log_data(name):
            raise CommandError(
                f"the write log still holds data of volume {name} that is not uploaded; "
                "delete it with drain (sgw volumes delete --drain) to upload it first, or "
                "retry later"
            )
        if gw.lio is not None:  # its iSCSI target goes first (that ends the sessions)
            await gw.lio.unexport(name)
        users = await self._connections_after_detach(name)
        if users:
            if gw.lio is not None:  # refused: the target comes back as it was
                await gw.lio.reexport()
            raise CommandError(
                f"volume {name} is in use by {users} NBD connection(s) other than its "
                "iSCSI target; disconnect them first"
            )
        if args.get("drain"):
            await self._drain(name)
        await gw.retire_volume(vol)
        await gw.engine.remove_volume(name)
        await asyncio.to_thread(self.chap.remove_volume, name)
        return {"name": name, "deleted": True, "remote_id": entry.remote_id}

    async def _connections_after_detach(self, name: str) -> int:
        """The NBD connections to the volume left once a detached /dev/nbdN's connection
        has closed (it closes shortly after ``nbd-client -d``)."""
        deadline = time.monotonic() + DETACH_WAIT_S
        users = self.gw.server.connections_to(name)
        while users and self.gw.lio is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            users = self.gw.server.connections_to(name)
        return users

    async def _drain(self, name: str) -> None:
        """Waits until the destager has taken every record of the volume out of the log."""
        gw = self.gw
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        entry = gw.engine.registry[name]
        while gw.engine.holds_log_data(name) or entry.dirty:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"volume {name}: its data did not leave the write log within "
                    f"{DRAIN_TIMEOUT_S:.0f} s ({gw.destager.last_error or 'uploads are slow'})"
                )
            gw.destager.hurry()
            await asyncio.sleep(0.1)

    def _volume_info(self, name: str) -> dict[str, Any]:
        vol = self.gw.engine.volumes[name]
        entry = self.gw.engine.registry[name]
        return {
            "name": name,
            "mode": vol.mode,
            "size": vol.size,
            "remote_id": entry.remote_id,
            "snapshot_id": entry.snapshot,
            "status": str(vol.status),
        }

    # -- CHAP ----------------------------------------------------------------------------

    async def _do_sync_chap(self, args: dict[str, Any]) -> dict[str, Any]:
        name, volume_id = _text(args, "volume"), _text(args, "volume_id")
        entry = self.gw.engine.registry.get(name)
        if entry is None:
            raise CommandError(f"no volume named {name!r} on this gateway")
        if entry.remote_id not in (None, volume_id):
            raise CommandError(f"volume {name} is bound to {entry.remote_id}, not {volume_id}")
        resp = await self._client().get(f"/v1/gateway/volumes/{volume_id}/chap")
        if resp.status_code != 200:
            raise CommandError(
                f"cannot fetch the CHAP credentials of {volume_id}: {resp.status_code} "
                f"{resp.text[:200]}"
            )
        creds = [
            ChapCredential(str(c["initiator"]), str(c["secret"]), c.get("target_secret"))
            for c in resp.json()
        ]
        await asyncio.to_thread(self.chap.replace, name, creds)
        LOG.info("chap credentials stored", extra={"volume": name, "initiators": len(creds)})
        return {
            "volume": name,
            "initiators": [
                {"initiator": c.initiator, "mutual": bool(c.target_secret)} for c in creds
            ],
        }

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            remote = self.gw.config.remote
            if remote is None:
                raise CommandError("this gateway has no provider configured ([remote] url)")
            self._http = httpx.AsyncClient(
                base_url=remote.url, auth=self.gw.auth, verify=tls_verify(remote), timeout=30.0
            )
        return self._http

    # -- bandwidth -----------------------------------------------------------------------

    async def _do_set_bandwidth(self, args: dict[str, Any]) -> dict[str, Any]:
        current = self._current_limits()
        upload = _rate(args["upload"]) if "upload" in args else current["upload"]
        download = _rate(args["download"]) if "download" in args else current["download"]
        if "upload" in args and self.gw.uploader is None:
            raise CommandError("this gateway uploads nothing (no [remote]): no upload limit")
        limits = {"upload": upload, "download": download}
        path = os.path.join(self.gw.config.data_dir, BANDWIDTH_FILE)
        await asyncio.to_thread(write_atomically, path, json.dumps(limits).encode())
        self._apply_limits(upload, download)
        LOG.info("bandwidth limits set", extra=limits)
        return limits

    def _apply_limits(self, upload: int | None, download: int | None) -> None:
        if self.gw.uploader is not None:
            self.gw.uploader.bucket.set_rate(upload)
        self.gw.download_bucket.set_rate(download)

    def _current_limits(self) -> dict[str, int | None]:
        up = self.gw.uploader.bucket.rate if self.gw.uploader is not None else None
        return {"upload": up, "download": self.gw.download_bucket.rate}

    def _load_limits(self) -> dict[str, int | None]:
        path = os.path.join(self.gw.config.data_dir, BANDWIDTH_FILE)
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
            return {k: _rate(doc.get(k)) for k in ("upload", "download")}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            LOG.error("bandwidth limits in %s unreadable, ignored: %s", path, exc)
            return {}

    # -- helpers -------------------------------------------------------------------------

    def _control_info(self) -> dict[str, Any]:
        ch = self.channel
        if ch is None:
            return {}
        return {
            "connected": ch.connected,
            "server": ch.server,
            "servers": list(ch.urls),
            "stats": dict(ch.stats),
            "replies_unsent": ch.journal.unsent,
        }

    @staticmethod
    def _version() -> str:
        from sgw import __version__

        return __version__


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"the command lacks {key!r}")
    return value


def _rate(value: object) -> int | None:
    """A limit in bytes/s; 0 or None: no limit."""
    if value is None:
        return None
    rate = int(value)  # type: ignore[call-overload]
    if rate < 0:
        raise CommandError(f"bandwidth {rate}: give bytes per second, 0 for no limit")
    return rate or None
