"""Routes of releases (docs/updates.md, "Releases and signatures"): the TUF repository's
metadata and bundles for gateways (and the operator), and the operator's publish, list and
revoke."""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sgw.common.errors import ForbiddenError, NotFoundError, PayloadTooLargeError
from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import AdminPrincipal, CurrentPrincipal, Kind, OperatorPrincipal
from sgw.provider.releases.repository import MAX_BUNDLE, ReleaseInfo, ReleaseRepository

LOG = logging.getLogger(__name__)

RELEASES_PATH = "/v1/releases"
METADATA_PATH = "/v1/updates/metadata/"
TARGETS_PATH = "/v1/updates/targets/"
_NOT_SET_UP = (
    "this provider publishes no releases yet: its operator installs the release keys with "
    "`sgw provider releases-init --keys DIR` (docs/updates.md)"
)


class ReleaseOut(BaseModel):
    version: str
    channel: str = Field(description="canary or stable")
    severity: str = Field(description="normal or emergency")
    target: str = Field(description="the TUF target path of the bundle")
    length: int
    sha256: str
    manifest: dict[str, Any] = Field(description="the release's manifest (sgw-release.json)")
    published: datetime
    revoked: datetime | None

    @classmethod
    def of(cls, r: ReleaseInfo) -> ReleaseOut:
        return cls(
            version=r.version,
            channel=r.channel,
            severity=r.severity,
            target=r.target,
            length=r.length,
            sha256=r.sha256,
            manifest=r.manifest.to_json(),
            published=r.published,
            revoked=r.revoked,
        )


def _repository(request: Request) -> ReleaseRepository:
    repository: ReleaseRepository | None = request.app.state.releases
    if repository is None:
        raise NotFoundError(_NOT_SET_UP)
    return repository


Repo = Annotated[ReleaseRepository, Depends(_repository)]
router = APIRouter(prefix="/v1", tags=["releases"])


def _gateway_or_operator(principal: CurrentPrincipal) -> None:
    """Update files go to activated gateways and the operator (and development mode)."""
    if principal.kind in (Kind.GATEWAY, Kind.DEV) or principal.operator:
        return
    raise ForbiddenError(
        "update metadata and bundles are served to activated gateways and the operator account only"
    )


Reader = Annotated[None, Depends(_gateway_or_operator)]


@router.get("/updates/metadata/{name}", tags=["gateway"], responses=errors(404))
async def metadata(name: str, _reader: Reader, repo: Repo) -> Response:
    """A TUF metadata file (``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``,
    ``N.root.json``), as signed."""
    body = await run_in_threadpool(repo.metadata, name)
    return Response(body, media_type="application/json", headers={"cache-control": "no-store"})


@router.get("/updates/targets/{path:path}", tags=["gateway"], responses=errors(404))
async def target(path: str, _reader: Reader, repo: Repo) -> Response:
    """A release bundle by its hash-prefixed target path (``releases/V/SHA256.sgw-V.tar.zst``);
    the client checks it against the signed targets."""
    body = await run_in_threadpool(repo.target, path)
    return Response(body, media_type="application/octet-stream")


@router.post(
    "/releases",
    status_code=201,
    responses=errors(400, 404, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": f"the bundle (sgw-VERSION.tar.zst), at most {MAX_BUNDLE >> 20} MiB",
        }
    },
)
async def publish(
    request: Request,
    _principal: OperatorPrincipal,
    repo: Repo,
    channel: Annotated[str, Query(description="canary or stable")],
    severity: Annotated[str, Query(description="normal or emergency")] = "normal",
) -> ReleaseOut:
    """Publishes a bundle (the streamed body) as a signed release (operator only)."""
    spool = os.path.join(request.app.state.config.data_dir, "releases")
    with tempfile.TemporaryFile(dir=spool) as f:
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BUNDLE:
                raise PayloadTooLargeError(
                    f"the bundle is larger than {MAX_BUNDLE >> 20} MiB, the limit for releases"
                )
            await run_in_threadpool(f.write, part)
        info = await run_in_threadpool(repo.publish, f, channel, severity)
    return ReleaseOut.of(info)


@router.get("/releases", responses=errors(404))
async def list_releases(_principal: AdminPrincipal, repo: Repo) -> list[ReleaseOut]:
    """Every release published here, revoked ones too, oldest first."""
    return [ReleaseOut.of(r) for r in await run_in_threadpool(repo.list_releases)]


@router.post("/releases/{version}/revoke", responses=errors(404))
async def revoke(version: str, _principal: OperatorPrincipal, repo: Repo) -> ReleaseOut:
    """Removes a release from the signed targets (operator only): gateways refuse it."""
    return ReleaseOut.of(await run_in_threadpool(repo.revoke, version))
