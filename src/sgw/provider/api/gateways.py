"""Routes of gateways: activation, the gateways of an account, and the call with which a
gateway fetches its own credentials (signed with its identity key)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from sgw.common.errors import ForbiddenError, NotFoundError, UnauthenticatedError
from sgw.common.releases import root_fingerprint
from sgw.common.signing import GATEWAY_PREFIX
from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import AdminPrincipal, CurrentPrincipal, Kind
from sgw.provider.db.models import GatewayStatus
from sgw.provider.management.gateways import GatewayInfo, Gateways
from sgw.provider.releases.repository import ReleaseRepository

# The one call a gateway that is not activated yet may make (signed with its public key).
CREDENTIALS_PATH = "/v1/gateway/credentials"


class ActivationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activation_key: str = Field(max_length=512, description="from the gateway, valid 30 min")
    name: str = Field(description="unique within the account, 1 to 255 characters")
    timezone: str | None = Field(None, description="IANA time zone, e.g. Europe/Berlin")
    confirmation_code: str | None = Field(
        None,
        max_length=32,
        description="shown on the appliance's console (`sgw gateway activation-code`); "
        "required for every key of a gateway that has one",
    )
    unconfirmed: bool = Field(
        False,
        description="activate a key of a gateway from before confirmation codes (`sgw1.`), "
        "which has none: only after checking the key came from that gateway",
    )


class GatewayUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    timezone: str | None = None


class GatewayOut(BaseModel):
    id: str
    name: str
    status: str = Field(description="active or deactivated")
    public_key: str | None = Field(description="Ed25519, hex")
    timezone: str | None
    created: datetime
    activated: datetime | None
    deactivated: datetime | None
    last_seen: datetime | None
    volumes: int

    @classmethod
    def of(cls, g: GatewayInfo) -> GatewayOut:
        return cls(
            id=g.id,
            name=g.name,
            status=g.status,
            public_key=g.public_key,
            timezone=g.timezone,
            created=g.created,
            activated=g.activated,
            deactivated=g.deactivated,
            last_seen=g.last_seen,
            volumes=g.volumes,
        )


class ActivatedOut(GatewayOut):
    release_root_fingerprint: str | None = Field(
        description=(
            "SHA-256 of the provider's TUF root (canonical signed bytes) that the gateway "
            "pins for its updates; null if this provider publishes no releases"
        )
    )


class Credentials(BaseModel):
    gateway_id: str
    account_id: str
    name: str
    timezone: str | None
    key_id: str = Field(description="what the gateway signs its requests with")
    release_root: dict[str, Any] | None = Field(
        None,
        description=(
            "the provider's TUF root (root.json) the gateway pins for its updates, "
            "delivered over the CA-pinned channel; null if it publishes no releases"
        ),
    )


def _gateways(request: Request) -> Gateways:
    gateways: Gateways = request.app.state.gateways
    return gateways


Repo = Annotated[Gateways, Depends(_gateways)]
router = APIRouter(prefix="/v1", tags=["gateways"])


@router.post("/activations", status_code=201, responses=errors(400, 403, 409, 422))
def activate(
    body: ActivationIn, principal: AdminPrincipal, repo: Repo, request: Request
) -> ActivatedOut:
    """Activates the gateway that made the key into the token's account; answers the
    fingerprint of the release root it will pin (compare it with the operator's)."""
    gateway = repo.activate(
        principal.account_id,
        body.activation_key,
        body.name,
        body.timezone,
        code=body.confirmation_code,
        unconfirmed=body.unconfirmed,
    )
    root = _release_root(request)
    return ActivatedOut(
        **GatewayOut.of(gateway).model_dump(),
        release_root_fingerprint=None if root is None else root_fingerprint(root),
    )


def _release_root(request: Request) -> bytes | None:
    """This provider's TUF root.json, if it publishes releases."""
    releases: ReleaseRepository | None = request.app.state.releases
    return None if releases is None else releases.keys.root_bytes


@router.get("/gateways", responses=errors())
def list_gateways(principal: AdminPrincipal, repo: Repo) -> list[GatewayOut]:
    return [GatewayOut.of(g) for g in repo.list_gateways(principal.account_id)]


@router.get("/gateways/{gateway_id}", responses=errors(404))
def describe_gateway(gateway_id: str, principal: AdminPrincipal, repo: Repo) -> GatewayOut:
    return GatewayOut.of(repo.get(principal.account_id, gateway_id))


@router.patch("/gateways/{gateway_id}", responses=errors(400, 404, 409, 422))
def update_gateway(
    gateway_id: str, body: GatewayUpdate, principal: AdminPrincipal, repo: Repo
) -> GatewayOut:
    """Renames the gateway and/or sets its time zone."""
    return GatewayOut.of(
        repo.update(principal.account_id, gateway_id, name=body.name, timezone=body.timezone)
    )


@router.post("/gateways/{gateway_id}/deactivate", responses=errors(404))
def deactivate_gateway(gateway_id: str, principal: AdminPrincipal, repo: Repo) -> GatewayOut:
    """Revokes the gateway's credentials for good; its volumes stay in the account."""
    return GatewayOut.of(repo.deactivate(principal.account_id, gateway_id))


@router.get(CREDENTIALS_PATH.removeprefix("/v1"), tags=["gateway"], responses=errors(404))
def credentials(
    principal: CurrentPrincipal, repo: Repo, request: Request, response: Response
) -> Credentials:
    """A gateway's own credentials, once an admin activated it (the gateway polls this)."""
    if principal.kind is Kind.GATEWAY and principal.gateway_id is not None:
        gateway = repo.by_id(principal.gateway_id)
    elif principal.kind is Kind.CANDIDATE and principal.public_key is not None:
        gateway = repo.by_public_key(principal.public_key)
    else:
        raise UnauthenticatedError("sign this call with the gateway's identity key")
    if gateway is None:
        raise NotFoundError("this gateway is not activated yet; activate it with `sgw activate`")
    if gateway.status != GatewayStatus.ACTIVE.value:
        raise ForbiddenError(f"gateway {gateway.id} is deactivated; its credentials are revoked")
    response.headers["cache-control"] = "no-store"
    root = _release_root(request)
    return Credentials(
        gateway_id=gateway.id,
        account_id=gateway.account_id,
        name=gateway.name,
        timezone=gateway.timezone,
        key_id=GATEWAY_PREFIX + gateway.id,
        release_root=None if root is None else json.loads(root),
    )
