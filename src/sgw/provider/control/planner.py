"""The commands an admin may send a gateway: validated, completed from the provider's
records, and followed up when the gateway's reply (or the deadline) comes.

| type           | admin gives                         | the gateway gets (sgw.common.commands) |
|----------------|-------------------------------------|----------------------------------------|
| describe       | -                                   | ``DescribeArgs``: -                    |
| diagnostics    | -                                   | ``DiagnosticsArgs``: -                 |
| set_bandwidth  | upload, download (bytes/s, 0: none) | ``SetBandwidthArgs``: the same         |
| snapshot       | volume_id, description, wait        | ``SnapshotArgs``: + volume (its name)  |
| create_volume  | name, size, mode, from_snapshot_id  | ``CreateVolumeArgs``: + volume_id      |
|                |                                     | (made here), snapshot_id               |
| delete_volume  | volume_id, drain                    | ``DeleteVolumeArgs``: + volume         |
| sync_chap      | volume_id                           | ``SyncChapArgs``: + volume             |
| update         | version, now                        | ``UpdateArgs``: the same               |
| health_report  | -                                   | ``HealthReportArgs``: -                |

What the admin gives is validated here (pydantic: the API's 400 messages); what the
gateway gets is built with the shared schema of sgw.common.commands (``to_args()``),
which the gateway parses with ``from_args()``.

``create_volume`` makes the provider's volume record first (bound to the gateway), so
the gateway binds to it and even a snapshot of another gateway's volume can be used;
the record is deleted again if the gateway refuses or never takes the command.
``delete_volume`` deletes the record once the gateway removed its volume. CHAP secrets
never travel in a message (messages are stored in the clear): ``sync_chap`` makes the
gateway fetch the volume's iSCSI access rules, secrets included, with a signed request. A
``describe`` answer says which of the gateway's volumes it exports legacy open: recorded
for the volumes' listing. Snapshot schedules post ``snapshot`` commands
of their own (sgw.provider.control.schedules), under idempotency keys admins may not use.
``update`` asks the gateway's update agent to check at once; ``sgw updates now`` sends it
after marking the release in the gateway's plan (sgw.provider.updates.service).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sgw.common.commands import (
    TYPES,
    CreateVolumeArgs,
    DeleteVolumeArgs,
    Mode,
    SetBandwidthArgs,
    SnapshotArgs,
    SyncChapArgs,
    UpdateArgs,
)
from sgw.common.errors import BadRequestError, NotFoundError
from sgw.common.iscsi import LEGACY_OPEN
from sgw.common.names import VOLUME_NAME_HELP, is_volume_name
from sgw.provider.blockstore.maps import VolumeInfo, VolumeMode
from sgw.provider.blockstore.service import BlockService
from sgw.provider.control.store import EXPIRED, FAILED, SUCCEEDED, MessageInfo
from sgw.provider.management.gateways import Gateways
from sgw.provider.management.volume_settings import VolumeSettings

LOG = logging.getLogger(__name__)

# How long a command may wait for its gateway to take it (seconds): an admin waits for
# these, so a command that cannot run soon is better refused than run by surprise later.
INTERACTIVE_TTL_S = 120.0
# CHAP credentials are desired state: delivered whenever the gateway comes back.
QUEUED_TTL_S = 7 * 86400.0
_INT64_MAX = (1 << 63) - 1
_GATEWAY_MODES: dict[VolumeMode, Mode] = {VolumeMode.CACHED: "cached", VolumeMode.STORED: "stored"}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _NoArgs(_Args):
    pass


class _Bandwidth(_Args):
    upload: int | None = Field(None, ge=0, le=_INT64_MAX, description="bytes/s; 0: no limit")
    download: int | None = Field(None, ge=0, le=_INT64_MAX, description="bytes/s; 0: no limit")


class _Snapshot(_Args):
    volume_id: str
    description: str | None = Field(None, max_length=255)
    wait: bool = True


class _CreateVolume(_Args):
    name: str
    size: int = Field(gt=0, le=_INT64_MAX)
    mode: Literal["cached", "stored"] = "cached"
    from_snapshot_id: str | None = None


class _DeleteVolume(_Args):
    volume_id: str
    drain: bool = False


class _SyncChap(_Args):
    volume_id: str


class _Update(_Args):
    version: str | None = Field(None, min_length=1, max_length=64)
    now: bool = False


_MODELS: dict[str, type[_Args]] = {
    "describe": _NoArgs,
    "diagnostics": _NoArgs,
    "set_bandwidth": _Bandwidth,
    "snapshot": _Snapshot,
    "create_volume": _CreateVolume,
    "delete_volume": _DeleteVolume,
    "sync_chap": _SyncChap,
    "update": _Update,
    "health_report": _NoArgs,
}


def requires_online(type_: str) -> bool:
    """True for commands refused while the gateway is offline (all but ``sync_chap``)."""
    return type_ != "sync_chap"


@dataclass(frozen=True)
class Prepared:
    """A command ready to post: what the gateway gets, and how long it may wait."""

    type: str
    args: dict[str, Any]
    ttl_s: float
    require_online: bool


class CommandPlanner:
    """Turns an admin's command into the gateway's, and follows up finished ones."""

    def __init__(
        self, blocks: BlockService, gateways: Gateways, settings: VolumeSettings | None = None
    ) -> None:
        self.blocks = blocks
        self.gateways = gateways
        self.settings = settings  # where the gateways' access reports go (None: nowhere)
        # gateway id -> its account: a gateway never changes accounts, so once looked up
        # the answer holds (bounded; most commands then need no database read here).
        self._accounts: dict[str, str] = {}

    def owner_known(self, account_id: str, gateway_id: str) -> bool:
        """True if the gateway is known to be the account's without asking the database
        (a gateway that polls has its signing key, and so its account, cached)."""
        if self._accounts.get(gateway_id) == account_id:
            return True
        key = self.gateways.signing_key(gateway_id)
        return key is not None and key.account_id == account_id

    def needs_database(self, type_: str) -> bool:
        """True if preparing the command reads or writes the provider's records."""
        return type_ in ("snapshot", "create_volume", "delete_volume", "sync_chap")

    def check_owner(self, account_id: str, gateway_id: str) -> None:
        """NotFoundError unless the gateway is the account's (blocking on a cache miss)."""
        if self.owner_known(account_id, gateway_id):
            return
        gateway = self.gateways.by_id(gateway_id)
        if gateway is None or gateway.account_id != account_id:
            raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
        if len(self._accounts) >= 100_000:
            self._accounts.clear()
        self._accounts[gateway_id] = account_id

    def check(self, account_id: str, gateway_id: str, type_: str, args: dict[str, Any]) -> Any:
        """The validated arguments (BadRequestError naming what is wrong)."""
        self.check_owner(account_id, gateway_id)
        model = _MODELS.get(type_)
        if model is None:
            raise BadRequestError(f"unknown command {type_!r}; known: {', '.join(TYPES)}")
        try:
            checked = model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors()
            )
            raise BadRequestError(f"command {type_}: {problems}") from None
        # The gateway checks the name by the same rule (sgw.common.commands): refused here
        # first, before the gateway needs to be online or a volume record is made.
        if isinstance(checked, _CreateVolume) and not is_volume_name(checked.name):
            raise BadRequestError(
                f"volume name {checked.name[:80]!r}: a gateway's volumes are named with "
                + VOLUME_NAME_HELP
            )
        return checked

    def prepare(
        self, account_id: str, gateway_id: str, type_: str, args: dict[str, Any]
    ) -> Prepared:
        """Validates the command and completes it from the provider's records; a
        ``create_volume`` creates the volume record here (blocking: run in a thread)."""
        a = self.check(account_id, gateway_id, type_, args)
        if isinstance(a, _Bandwidth):
            if a.upload is None and a.download is None:
                raise BadRequestError("set_bandwidth: give upload and/or download (bytes/s)")
            out = SetBandwidthArgs(upload=a.upload, download=a.download).to_args()
            return Prepared(type_, out, INTERACTIVE_TTL_S, True)
        if isinstance(a, _Snapshot):
            vol = self._gateway_volume(account_id, gateway_id, a.volume_id)
            snapshot = SnapshotArgs(
                volume=vol.name, volume_id=a.volume_id, description=a.description, wait=a.wait
            )
            return Prepared(type_, snapshot.to_args(), INTERACTIVE_TTL_S, True)
        if isinstance(a, _DeleteVolume):
            vol = self._gateway_volume(account_id, gateway_id, a.volume_id)
            delete = DeleteVolumeArgs(volume=vol.name, volume_id=a.volume_id, drain=a.drain)
            return Prepared(type_, delete.to_args(), INTERACTIVE_TTL_S, True)
        if isinstance(a, _SyncChap):
            vol = self._gateway_volume(account_id, gateway_id, a.volume_id)
            out = SyncChapArgs(volume=vol.name, volume_id=vol.id).to_args()
            return Prepared(type_, out, QUEUED_TTL_S, requires_online(type_))
        if isinstance(a, _Update):
            out = UpdateArgs(version=a.version, now=a.now).to_args()
            return Prepared(type_, out, INTERACTIVE_TTL_S, True)
        if isinstance(a, _CreateVolume):
            out = self._create_volume(account_id, gateway_id, a).to_args()
            return Prepared(type_, out, INTERACTIVE_TTL_S, True)
        return Prepared(type_, {}, INTERACTIVE_TTL_S, True)

    def _create_volume(
        self, account_id: str, gateway_id: str, a: _CreateVolume
    ) -> CreateVolumeArgs:
        if a.size % 4096:
            raise BadRequestError(f"size {a.size}: give a multiple of 4 KiB (e.g. 10G)")
        vol = self.blocks.create_volume(
            account_id,
            a.name,
            a.size,
            mode=VolumeMode(a.mode),
            from_snapshot_id=a.from_snapshot_id,
            gateway_id=gateway_id,
        )
        LOG.info(
            "volume record created for the gateway",
            extra={"volume": vol.id, "gateway": gateway_id, "volume_name": vol.name},
        )
        return CreateVolumeArgs(
            name=vol.name,
            size=vol.size,
            mode=_GATEWAY_MODES[vol.mode],
            volume_id=vol.id,
            snapshot_id=a.from_snapshot_id,
        )

    def _gateway_volume(self, account_id: str, gateway_id: str, volume_id: str) -> VolumeInfo:
        vol = self.blocks.get_volume(account_id, volume_id)
        if vol.gateway_id != gateway_id:
            raise BadRequestError(
                f"volume {volume_id} is not on gateway {gateway_id}"
                + (f" but on {vol.gateway_id}" if vol.gateway_id else " (it is on no gateway)")
            )
        return vol

    async def follow_up(self, info: MessageInfo) -> None:
        """Follow-up of a finished command: a volume made for a refused or expired
        ``create_volume`` goes again; a volume the gateway deleted goes at the provider
        too; what a ``describe`` says of the volumes' access is recorded."""
        drop = (info.type == "create_volume" and info.status in (FAILED, EXPIRED)) or (
            info.type == "delete_volume" and info.status == SUCCEEDED
        )
        if drop and isinstance(info.args.get("volume_id"), str):
            await asyncio.to_thread(self._drop_volume, info)
        if info.type == "describe" and info.status == SUCCEEDED and self.settings is not None:
            reported = legacy_open_reported(info.result)
            if reported:
                await asyncio.to_thread(
                    self.settings.record_reported_access, info.gateway_id, reported
                )

    def _drop_volume(self, info: MessageInfo) -> None:
        volume_id = str(info.args["volume_id"])
        try:
            self.blocks.delete_volume(info.account_id, volume_id)
        except NotFoundError:
            return
        LOG.info(
            "volume record deleted",
            extra={"volume": volume_id, "command": info.id, "status": info.status},
        )


def legacy_open_reported(result: dict[str, Any] | None) -> dict[str, bool]:
    """From a ``describe`` answer: for each volume bound to the provider (by id) whose
    ``iscsi_access`` the gateway reported, whether it is legacy open. Gateways from before
    access rules report none."""
    volumes = result.get("volumes") if isinstance(result, dict) else None
    out: dict[str, bool] = {}
    for vol in volumes if isinstance(volumes, list) else []:
        if not isinstance(vol, dict):
            continue
        remote_id, access = vol.get("remote_id"), vol.get("iscsi_access")
        if isinstance(remote_id, str) and isinstance(access, str):
            out[remote_id] = access == LEGACY_OPEN
    return out
