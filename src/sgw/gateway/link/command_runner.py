"""What the gateway does for each command of the control channel.

The same operations as the local admin socket (``AdminOps``: status, snapshot) plus
what only the provider's console asks for: volumes created and deleted at runtime, a
volume's iSCSI access rules (CHAP credentials, initiators allowed without CHAP, the open
flag) fetched into ``chap.json``, bandwidth limits changed on the fly (kept in
``DATA_DIR/bandwidth.json``, which overrides ``[remote] bandwidth`` at start), and a
diagnostics bundle. The arguments are parsed with the schema the provider sends them by
(sgw.common.commands). A refusal raises ``CommandError`` (or another ``SgwError``) whose
message becomes the failed reply.

The runner sees the gateway only through ``CommandHost``: what a command may do on it,
and what an in-memory fake provides in the unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import httpx

from sgw import version
from sgw.common.commands import (
    CommandArgs,
    CreateVolumeArgs,
    DeleteVolumeArgs,
    DescribeArgs,
    DiagnosticsArgs,
    HealthReportArgs,
    SetBandwidthArgs,
    SnapshotArgs,
    SyncChapArgs,
    UpdateArgs,
)
from sgw.common.errors import CommandError, ConfigError, SgwError
from sgw.common.files import write_atomically
from sgw.gateway.config import RemoteConfig
from sgw.gateway.link.activation import tls_verify
from sgw.gateway.link.diagnostics import LogRing, build_bundle, system_info
from sgw.gateway.link.journal import Command
from sgw.gateway.lio.access import access_of
from sgw.gateway.lio.chap import ChapCredential, ChapStore, VolumeRules
from sgw.gateway.volume.engine import MODE_CACHED, RegistryEntry, VolumeSpec
from sgw.gateway.volume.upload import TokenBucket
from sgw.gateway.volume.volume import VolumeStatus

LOG = logging.getLogger(__name__)

BANDWIDTH_FILE = "bandwidth.json"
# How long a delete with drain waits for the destager to empty the log of the volume.
DRAIN_TIMEOUT_S = 600.0
# How long a delete waits for the NBD connection of a detached /dev/nbdN to close.
DETACH_WAIT_S = 5.0
# Seconds between the checks of those two waits.
DRAIN_POLL_S = 0.1
DETACH_POLL_S = 0.05
# How long the update agent may take to decide a check (it answers before downloading).
UPDATE_AGENT_TIMEOUT_S = 120.0


class VolumeView(Protocol):
    """What a command reads of an open volume."""

    @property
    def mode(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def status(self) -> VolumeStatus: ...


class CommandHost(Protocol):
    """Everything console commands may do on the running gateway, and nothing more.

    Volumes are named as on the gateway. ``remote`` None means no provider is configured
    (then nothing is uploaded: there is no upload limit and no volume can be created).
    """

    @property
    def data_dir(self) -> str: ...

    @property
    def remote(self) -> RemoteConfig | None: ...

    @property
    def provider_auth(self) -> httpx.Auth:
        """Signs the gateway's requests to the provider."""
        ...

    def configuration(self) -> dict[str, Any]:
        """The running configuration as plain data (for a diagnostics bundle)."""
        ...

    # -- state (what the local admin socket offers too) ---------------------------------

    def status(self) -> dict[str, Any]: ...

    async def snapshot(
        self, volume: str, description: str | None, wait: bool
    ) -> dict[str, Any]: ...

    def control_info(self) -> dict[str, Any]:
        """The control channel's state; empty without one."""
        ...

    async def health_report(self) -> dict[str, Any]:
        """Samples a health report now and uploads it: ``{"seq": N, "report": {...}}``."""
        ...

    # -- volumes ----------------------------------------------------------------------

    @property
    def registry(self) -> Mapping[str, RegistryEntry]:
        """Every volume's permanent facts (live objects: they change as the volume does)."""
        ...

    def volume(self, name: str) -> VolumeView | None:
        """The open volume, None if there is none of that name."""
        ...

    async def create_volume(self, spec: VolumeSpec, remote_id: str) -> None:
        """Adds a volume, bound to the provider's volume ``remote_id`` (not checked yet)."""
        ...

    async def bind_volume(self, name: str) -> None:
        """Checks that the provider's volume exists and matches (SgwError if not)."""
        ...

    def serve_new_volume(self, name: str) -> None:
        """Starts a created volume's map load or restore."""
        ...

    async def retire_volume(self, name: str) -> None:
        """Stops what serves a volume about to be removed."""
        ...

    async def remove_volume(self, name: str) -> None:
        """Removes a volume created at runtime with its disk, and forgets its binding."""
        ...

    def connections_to(self, name: str) -> int:
        """Open NBD connections to the volume."""
        ...

    # -- iSCSI (LIO) ------------------------------------------------------------------

    @property
    def iscsi(self) -> bool:
        """True if the gateway exports its volumes over iSCSI."""
        ...

    async def unexport(self, name: str) -> None:
        """Removes the volume's target and detaches its /dev/nbdN."""
        ...

    async def reexport(self) -> None:
        """Exports every volume again (after an unexport not followed by a removal)."""
        ...

    @property
    def chap(self) -> ChapStore: ...

    async def end_legacy_open(self, name: str) -> None:
        """Records that the volume is no longer legacy open (its access is the console's
        from now on; sgw.gateway.lio.exporter)."""
        ...

    # -- write log ----------------------------------------------------------------------

    def holds_log_data(self, name: str) -> bool:
        """True while the write log holds a record of the volume."""
        ...

    def hurry_destager(self) -> None:
        """Makes the destager take what the log holds now, however little."""
        ...

    @property
    def destage_error(self) -> str:
        """Why the destager's last batch failed ("" while it succeeds)."""
        ...

    # -- bandwidth ----------------------------------------------------------------------

    @property
    def upload_bucket(self) -> TokenBucket | None: ...

    @property
    def download_bucket(self) -> TokenBucket: ...


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
A = TypeVar("A", bound=CommandArgs)


def _handler(schema: type[A], run: Callable[[A], Awaitable[dict[str, Any]]]) -> Handler:
    """A command's handler: parses the arguments with ``schema``, then ``run``s."""

    async def handle(args: dict[str, Any]) -> dict[str, Any]:
        return await run(schema.from_args(args))

    return handle


class CommandRunner:
    """Executes the control channel's commands on a running gateway."""

    def __init__(
        self,
        host: CommandHost,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        update_socket: str | None = None,
    ) -> None:
        self.host = host
        # The update agent's socket ([updates] socket); None: this gateway has no agent.
        self.update_socket = update_socket
        self.logs = LogRing()
        self.started = time.monotonic()
        self._transport = transport  # for the provider's CHAP requests (tests)
        self._http: httpx.AsyncClient | None = None
        self._handlers: dict[str, Handler] = {
            "describe": _handler(DescribeArgs, self._describe),
            "diagnostics": _handler(DiagnosticsArgs, self._diagnostics),
            "set_bandwidth": _handler(SetBandwidthArgs, self._set_bandwidth),
            "snapshot": _handler(SnapshotArgs, self._snapshot),
            "create_volume": _handler(CreateVolumeArgs, self._create_volume),
            "delete_volume": _handler(DeleteVolumeArgs, self._delete_volume),
            "sync_chap": _handler(SyncChapArgs, self._sync_chap),
            "update": _handler(UpdateArgs, self._update),
            "health_report": _handler(HealthReportArgs, self._health_report),
        }

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
        handler = self._handlers.get(cmd.type)
        if handler is None:
            raise CommandError(
                f"this gateway (sgw {version()}) does not know the command {cmd.type!r}; update it"
            )
        return await handler(cmd.args)

    # -- state ---------------------------------------------------------------------------

    async def _describe(self, _a: DescribeArgs) -> dict[str, Any]:
        status = self.host.status()
        status["gateway"] = {
            "version": version(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "bandwidth": self._current_limits(),
            "control": self.host.control_info(),
        }
        return status

    async def _diagnostics(self, _a: DiagnosticsArgs) -> dict[str, Any]:
        host = self.host
        registry = {
            name: {k: v for k, v in vars(e).items() if k != "restore_token"}
            for name, e in host.registry.items()
        }
        files = {
            "status.json": host.status(),
            "config.json": host.configuration(),
            "volumes.json": registry,
            "control.json": host.control_info(),
            "system.json": system_info(host.data_dir, self.started),
        }
        bundle = await asyncio.to_thread(build_bundle, files, list(self.logs.lines))
        return {
            "bundle": base64.b64encode(bundle).decode("ascii"),
            "size": len(bundle),
            "sha256": hashlib.sha256(bundle).hexdigest(),
            "files": [*sorted(files), "logs.jsonl"],
        }

    async def _health_report(self, _a: HealthReportArgs) -> dict[str, Any]:
        return await self.host.health_report()

    async def _snapshot(self, a: SnapshotArgs) -> dict[str, Any]:
        return await self.host.snapshot(a.volume, a.description, a.wait)

    async def _update(self, a: UpdateArgs) -> dict[str, Any]:
        """Hands the command to the update agent (its own process: it outlives the swap
        that replaces this daemon) and replies with its answer: the plan's decision. The
        agent reports the update's progress to the provider itself."""
        path = self.update_socket
        if path is None:
            raise CommandError("this gateway runs no update agent, so it cannot update itself")
        request = {"op": "check", "version": a.version, "now": a.now}
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise CommandError(
                f"no update agent listens at {path}: start it (systemctl start "
                "sgw-update-agent on the appliance) or check [updates] socket"
            ) from exc
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), UPDATE_AGENT_TIMEOUT_S)
        except TimeoutError:
            raise CommandError(
                f"the update agent at {path} did not answer in {UPDATE_AGENT_TIMEOUT_S:g} s"
            ) from None
        finally:
            writer.close()
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CommandError(f"the update agent at {path} closed without a proper answer")
        if not answer.pop("ok", False):
            raise CommandError(f"the update agent refused: {answer.get('error')}")
        return answer

    # -- volumes -------------------------------------------------------------------------

    async def _create_volume(self, a: CreateVolumeArgs) -> dict[str, Any]:
        host, name = self.host, a.name
        if host.remote is None:
            raise CommandError("this gateway has no provider configured ([remote] url)")
        existing = host.registry.get(name)
        if existing is not None:
            if existing.remote_id == a.volume_id and existing.size == a.size:
                return self._volume_info(name)  # made before, by this very command
            raise CommandError(f"a volume named {name} exists on this gateway already")
        disks = os.path.join(host.data_dir, "volumes")
        path = "" if a.mode == MODE_CACHED else os.path.join(disks, f"{name}.img")
        await host.create_volume(VolumeSpec(name, a.size, path, a.mode, a.snapshot_id), a.volume_id)
        try:
            await host.bind_volume(name)  # the provider's volume exists and matches
        except BaseException as exc:
            await host.remove_volume(name)
            if isinstance(exc, SgwError):
                raise CommandError(f"volume {name} not created: {exc}") from exc
            raise
        host.serve_new_volume(name)
        return self._volume_info(name)

    async def _delete_volume(self, a: DeleteVolumeArgs) -> dict[str, Any]:
        host, name = self.host, a.volume
        if host.volume(name) is None:  # gone already (deleted before, or never made)
            return {"name": name, "deleted": False, "reason": "no such volume on this gateway"}
        entry = host.registry[name]
        if a.volume_id and entry.remote_id not in (None, a.volume_id):
            raise CommandError(
                f"volume {name} on this gateway is bound to {entry.remote_id}, not {a.volume_id}"
            )
        if not entry.managed:  # refused before anything is torn down
            raise CommandError(
                f"volume {name} is in the gateway's configuration: remove it there (and "
                "restart the gateway) instead"
            )
        if not a.drain and host.holds_log_data(name):
            raise CommandError(
                f"the write log still holds data of volume {name} that is not uploaded; "
                "delete it with drain (sgw volumes delete --drain) to upload it first, or "
                "retry later"
            )
        if host.iscsi:  # its iSCSI target goes first (that ends the sessions)
            await host.unexport(name)
        users = await self._connections_after_detach(name)
        if users:
            if host.iscsi:  # refused: the target comes back as it was
                await host.reexport()
            raise CommandError(
                f"volume {name} is in use by {users} NBD connection(s) other than its "
                "iSCSI target; disconnect them first"
            )
        if a.drain:
            await self._drain(name)
        await host.retire_volume(name)
        await host.remove_volume(name)
        await asyncio.to_thread(host.chap.remove_volume, name)
        return {"name": name, "deleted": True, "remote_id": entry.remote_id}

    async def _connections_after_detach(self, name: str) -> int:
        """The NBD connections to the volume left once a detached /dev/nbdN's connection
        has closed (it closes shortly after the netlink disconnect)."""
        deadline = time.monotonic() + DETACH_WAIT_S
        users = self.host.connections_to(name)
        while users and self.host.iscsi and time.monotonic() < deadline:
            await asyncio.sleep(DETACH_POLL_S)
            users = self.host.connections_to(name)
        return users

    async def _drain(self, name: str) -> None:
        """Waits until the destager has taken every record of the volume out of the log
        and uploaded what pass-through left on its disk."""
        host = self.host
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        entry = host.registry[name]
        while host.holds_log_data(name) or entry.dirty:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"volume {name}: its data did not leave the write log within "
                    f"{DRAIN_TIMEOUT_S:.0f} s ({host.destage_error or 'uploads are slow'})"
                )
            host.hurry_destager()
            await asyncio.sleep(DRAIN_POLL_S)

    def _volume_info(self, name: str) -> dict[str, Any]:
        vol = self.host.volume(name)
        assert vol is not None
        entry = self.host.registry[name]
        return {
            "name": name,
            "mode": vol.mode,
            "size": vol.size,
            "remote_id": entry.remote_id,
            "snapshot_id": entry.snapshot,
            "status": str(vol.status),
        }

    # -- iSCSI access ----------------------------------------------------------------------

    async def _sync_chap(self, a: SyncChapArgs) -> dict[str, Any]:
        """Fetches the volume's access rules and stores them for LIO; refuses (storing
        nothing) rules LIO would refuse. The volume stops being legacy open: from now on
        its access is what the console set, closed without rules."""
        name, volume_id = a.volume, a.volume_id
        entry = self.host.registry.get(name)
        if entry is None:
            raise CommandError(f"no volume named {name!r} on this gateway")
        if entry.remote_id not in (None, volume_id):
            raise CommandError(f"volume {name} is bound to {entry.remote_id}, not {volume_id}")
        rules = await self._fetch_rules(volume_id)
        try:
            access = access_of(name, rules)
        except ConfigError as exc:
            raise CommandError(f"the access rules of volume {name} were not stored: {exc}") from exc
        # Legacy open ends first: a crash in between leaves the volume closed, not open.
        await self.host.end_legacy_open(name)
        await asyncio.to_thread(self.host.chap.replace, name, rules)
        LOG.info(
            "iscsi access stored",
            extra={"volume": name, "access": access.label(), "initiators": len(access.initiators)},
        )
        return {
            "volume": name,
            "initiators": [
                {"initiator": c.initiator, "mutual": bool(c.target_secret)} for c in rules.chap
            ],
            "acl": list(rules.initiators),
            "open": rules.open,
            "iscsi_access": access.label(),
        }

    async def _fetch_rules(self, volume_id: str) -> VolumeRules:
        """The volume's rules from the provider (a signed request); from a provider older
        than access rules (no ``/access``), its CHAP credentials alone."""
        client = self._client()
        resp = await client.get(f"/v1/gateway/volumes/{volume_id}/access")
        legacy_provider = resp.status_code == 404
        if legacy_provider:
            resp = await client.get(f"/v1/gateway/volumes/{volume_id}/chap")
        if resp.status_code != 200:
            raise CommandError(
                f"cannot fetch the access rules of {volume_id}: {resp.status_code} "
                f"{resp.text[:200]}"
            )
        try:
            doc = resp.json()
            chap = doc if legacy_provider else doc["chap"]
            return VolumeRules(
                chap=tuple(
                    ChapCredential(str(c["initiator"]), str(c["secret"]), c.get("target_secret"))
                    for c in chap
                ),
                initiators=() if legacy_provider else tuple(str(i) for i in doc["acl"]),
                open=False if legacy_provider else doc["open"] is True,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommandError(
                f"the provider's access rules of {volume_id} are malformed ({exc!r})"
            ) from exc

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            remote = self.host.remote
            if remote is None:
                raise CommandError("this gateway has no provider configured ([remote] url)")
            self._http = httpx.AsyncClient(
                base_url=remote.url,
                auth=self.host.provider_auth,
                verify=tls_verify(remote),
                timeout=30.0,
                transport=self._transport,
            )
        return self._http

    # -- bandwidth -----------------------------------------------------------------------

    async def _set_bandwidth(self, a: SetBandwidthArgs) -> dict[str, Any]:
        current = self._current_limits()
        # None: unchanged; 0: no limit (None from here on).
        upload = current["upload"] if a.upload is None else a.upload or None
        download = current["download"] if a.download is None else a.download or None
        if a.upload is not None and self.host.upload_bucket is None:
            raise CommandError("this gateway uploads nothing (no [remote]): no upload limit")
        limits = {"upload": upload, "download": download}
        path = os.path.join(self.host.data_dir, BANDWIDTH_FILE)
        await asyncio.to_thread(write_atomically, path, json.dumps(limits).encode())
        self._apply_limits(upload, download)
        LOG.info("bandwidth limits set", extra=limits)
        return limits

    def _apply_limits(self, upload: int | None, download: int | None) -> None:
        bucket = self.host.upload_bucket
        if bucket is not None:
            bucket.set_rate(upload)
        self.host.download_bucket.set_rate(download)

    def _current_limits(self) -> dict[str, int | None]:
        bucket = self.host.upload_bucket
        up = bucket.rate if bucket is not None else None
        return {"upload": up, "download": self.host.download_bucket.rate}

    def _load_limits(self) -> dict[str, int | None]:
        path = os.path.join(self.host.data_dir, BANDWIDTH_FILE)
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
            return {k: _stored_rate(doc.get(k)) for k in ("upload", "download")}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            LOG.error("bandwidth limits in %s unreadable, ignored: %s", path, exc)
            return {}


def _stored_rate(value: object) -> int | None:
    """A limit in bytes/s from ``bandwidth.json``; 0 or None: no limit."""
    if value is None:
        return None
    rate = int(value)  # type: ignore[call-overload]
    if rate < 0:
        raise CommandError(f"bandwidth {rate}: give bytes per second, 0 for no limit")
    return rate or None
