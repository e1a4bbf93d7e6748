"""Admin routes of volumes and snapshots beyond the block API: listings, who may log in
over iSCSI (CHAP credentials, initiators allowed without CHAP, the open flag) and snapshot
schedules. Create, describe and delete are the block API's own calls (docs/block-api.md),
which an API token may make for its whole account. A change of a volume's access reaches
its gateway with a ``sync_chap`` command, which the CLI sends."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import AdminPrincipal
from sgw.provider.api.blocks import SnapshotOut
from sgw.provider.management.volume_settings import (
    CHAP_SECRET_MAX,
    CHAP_SECRET_MIN,
    AccessInfo,
    AclInfo,
    ChapInfo,
    ScheduleInfo,
    VolumeSettings,
)


class VolumeListed(BaseModel):
    id: str
    name: str
    gateway_id: str | None
    size: int
    chunk_size: int
    mode: Literal["cached", "stored"]
    map_version: int
    created: datetime
    access: str = Field(
        description="who may log in over iSCSI: closed, chap N, acl N (both: chap N, acl M), "
        "OPEN (the open flag), OPEN (legacy) (open since before access was closed by default)"
    )
    iscsi_open: bool
    iscsi_legacy_open: bool


class ChapIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initiator: str = Field(description="the initiator's iSCSI name (IQN)")
    secret: str = Field(
        description=f"{CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} printable ASCII characters"
    )
    target_secret: str | None = Field(None, description="for mutual CHAP; differs from secret")


class ChapOut(BaseModel):
    initiator: str
    mutual: bool
    updated: datetime

    @classmethod
    def of(cls, c: ChapInfo) -> ChapOut:
        return cls(initiator=c.initiator, mutual=c.mutual, updated=c.updated)


class AclIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initiator: str = Field(description="the initiator's iSCSI name, allowed without CHAP")


class AclOut(BaseModel):
    initiator: str
    updated: datetime

    @classmethod
    def of(cls, a: AclInfo) -> AclOut:
        return cls(initiator=a.initiator, updated=a.updated)


class OpenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    open: StrictBool = Field(
        description="true: any initiator may log in without authentication (labs only; the "
        "rules are kept but not applied); false: the rules apply (none: closed)"
    )


class AccessOut(BaseModel):
    access: str = Field(description="closed, chap N, acl N, OPEN or OPEN (legacy)")
    open: bool
    legacy_open: bool = Field(description="open since before access was closed by default")
    chap: list[ChapOut]
    acl: list[AclOut] = Field(description="initiators allowed without CHAP")

    @classmethod
    def of(cls, a: AccessInfo) -> AccessOut:
        return cls(
            access=a.access,
            open=a.open,
            legacy_open=a.legacy_open,
            chap=[ChapOut.of(c) for c in a.chap],
            acl=[AclOut.of(x) for x in a.acl],
        )


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_hour: int = Field(ge=0, le=23, description="hour of the first snapshot of a day")
    recurrence_hours: Literal[1, 2, 4, 8, 12, 24]
    description: str | None = Field(None, max_length=255)
    retain: int | None = Field(None, ge=1, le=10_000, description="newest snapshots kept")


class ScheduleOut(BaseModel):
    volume_id: str
    start_hour: int
    recurrence_hours: int
    description: str | None
    retain: int | None
    updated: datetime

    @classmethod
    def of(cls, s: ScheduleInfo) -> ScheduleOut:
        return cls(
            volume_id=s.volume_id,
            start_hour=s.start_hour,
            recurrence_hours=s.recurrence_hours,
            description=s.description,
            retain=s.retain,
            updated=s.updated,
        )


def _settings(request: Request) -> VolumeSettings:
    settings: VolumeSettings = request.app.state.volume_settings
    return settings


Repo = Annotated[VolumeSettings, Depends(_settings)]
router = APIRouter(prefix="/v1")


@router.get("/volumes", tags=["volumes"], responses=errors())
def list_volumes(
    principal: AdminPrincipal,
    repo: Repo,
    gateway_id: Annotated[str | None, Query(description="only this gateway's")] = None,
) -> list[VolumeListed]:
    """The account's volumes."""
    return [
        VolumeListed(
            id=v.id,
            name=v.name,
            gateway_id=v.gateway_id,
            size=v.size,
            chunk_size=v.chunk_size,
            mode=v.mode.value,
            map_version=v.map_version,
            created=v.created,
            access=v.access,
            iscsi_open=v.iscsi_open,
            iscsi_legacy_open=v.iscsi_legacy_open,
        )
        for v in repo.list_volumes(principal.account_id, gateway_id)
    ]


@router.get("/snapshots", tags=["snapshots"], responses=errors())
def list_snapshots(
    principal: AdminPrincipal,
    repo: Repo,
    volume_id: Annotated[str | None, Query(description="only this volume's")] = None,
) -> list[SnapshotOut]:
    """The account's snapshots, oldest first."""
    return [
        SnapshotOut(
            id=x.id,
            volume_id=x.volume_id,
            parent_snapshot_id=x.parent_snapshot_id,
            status=x.status.value,
            volume_size=x.volume_size,
            chunk_size=x.chunk_size,
            description=x.description,
            created=x.created,
            completed=x.completed,
            scheduled_for=x.scheduled_for,
        )
        for x in repo.list_snapshots(principal.account_id, volume_id)
    ]


@router.get("/volumes/{volume_id}/chap", tags=["volumes"], responses=errors(404))
def list_chap(volume_id: str, principal: AdminPrincipal, repo: Repo) -> list[ChapOut]:
    """The initiators with CHAP credentials on the volume (never the secrets)."""
    return [ChapOut.of(c) for c in repo.list_chap(principal.account_id, volume_id)]


@router.put("/volumes/{volume_id}/chap", tags=["volumes"], responses=errors(400, 404, 422))
def set_chap(volume_id: str, body: ChapIn, principal: AdminPrincipal, repo: Repo) -> ChapOut:
    """Sets (or replaces) an initiator's CHAP credentials on the volume."""
    info = repo.set_chap(
        principal.account_id, volume_id, body.initiator, body.secret, body.target_secret
    )
    return ChapOut.of(info)


@router.delete(
    "/volumes/{volume_id}/chap/{initiator}",
    status_code=204,
    tags=["volumes"],
    responses=errors(404),
)
def delete_chap(volume_id: str, initiator: str, principal: AdminPrincipal, repo: Repo) -> Response:
    repo.delete_chap(principal.account_id, volume_id, initiator)
    return Response(status_code=204)


@router.get("/volumes/{volume_id}/access", tags=["volumes"], responses=errors(404))
def get_access(volume_id: str, principal: AdminPrincipal, repo: Repo) -> AccessOut:
    """Who may log in to the volume over iSCSI (never the secrets)."""
    return AccessOut.of(repo.access(principal.account_id, volume_id))


@router.get("/volumes/{volume_id}/acl", tags=["volumes"], responses=errors(404))
def list_acl(volume_id: str, principal: AdminPrincipal, repo: Repo) -> list[AclOut]:
    """The initiators allowed on the volume without CHAP."""
    return [AclOut.of(a) for a in repo.list_acl(principal.account_id, volume_id)]


@router.put("/volumes/{volume_id}/acl", tags=["volumes"], responses=errors(400, 404, 422))
def add_acl(volume_id: str, body: AclIn, principal: AdminPrincipal, repo: Repo) -> AclOut:
    """Allows an initiator on the volume by its name alone, without CHAP (hosts on a
    trusted network)."""
    return AclOut.of(repo.add_acl(principal.account_id, volume_id, body.initiator))


@router.delete(
    "/volumes/{volume_id}/acl/{initiator}",
    status_code=204,
    tags=["volumes"],
    responses=errors(404),
)
def delete_acl(volume_id: str, initiator: str, principal: AdminPrincipal, repo: Repo) -> Response:
    repo.delete_acl(principal.account_id, volume_id, initiator)
    return Response(status_code=204)


@router.put("/volumes/{volume_id}/open", tags=["volumes"], responses=errors(404, 422))
def set_open(volume_id: str, body: OpenIn, principal: AdminPrincipal, repo: Repo) -> AccessOut:
    """Opens the volume to any initiator without authentication (labs), or closes it to
    all but its rules' initiators."""
    return AccessOut.of(repo.set_open(principal.account_id, volume_id, body.open))


@router.get("/volumes/{volume_id}/snapshot-schedule", tags=["volumes"], responses=errors(404))
def get_schedule(volume_id: str, principal: AdminPrincipal, repo: Repo) -> ScheduleOut:
    return ScheduleOut.of(repo.get_schedule(principal.account_id, volume_id))


@router.put(
    "/volumes/{volume_id}/snapshot-schedule", tags=["volumes"], responses=errors(400, 404, 422)
)
def set_schedule(
    volume_id: str, body: ScheduleIn, principal: AdminPrincipal, repo: Repo
) -> ScheduleOut:
    """Snapshots the volume every ``recurrence_hours`` from ``start_hour`` (gateway time)."""
    info = repo.set_schedule(
        principal.account_id,
        volume_id,
        start_hour=body.start_hour,
        recurrence_hours=body.recurrence_hours,
        description=body.description,
        retain=body.retain,
    )
    return ScheduleOut.of(info)


@router.delete(
    "/volumes/{volume_id}/snapshot-schedule",
    status_code=204,
    tags=["volumes"],
    responses=errors(404),
)
def delete_schedule(volume_id: str, principal: AdminPrincipal, repo: Repo) -> Response:
    repo.delete_schedule(principal.account_id, volume_id)
    return Response(status_code=204)
