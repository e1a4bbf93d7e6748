"""Routes of health (docs/health.md, "At the provider").

Gateways (signed requests): ``POST /v1/gateway/health`` uploads a batch of reports
(``sgw.common.health``); the answer ``{"accepted_through": N}`` is the highest ``seq``
stored for the gateway.

Admins (API tokens; an account's token sees its own gateways and volumes, the operator's
every account's): ``GET /v1/gateways/{id}/health`` (newest sample, recent events, whether
the control channel holds it), ``GET /v1/gateways/{id}/health/series``, the same two per
volume under ``/v1/volumes/{id}/health``, ``GET /v1/health/fleet``.

The operator (its account's API token): ``GET /metrics``, the fleet's newest samples in
the Prometheus text format (``sgw.provider.health.metrics``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from pydantic import BaseModel, Field

from sgw.common.errors import BadRequestError, NotFoundError
from sgw.common.health import HEALTH_PATH, parse_batch
from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import AdminPrincipal, OperatorPrincipal, Principal
from sgw.provider.api.control import GatewayPrincipal
from sgw.provider.control.hub import ControlHub
from sgw.provider.db.models import utcnow
from sgw.provider.health.store import EventInfo, HealthStore, Latest
from sgw.provider.management.gateways import Gateways

LOG = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Events in a gateway's or volume's health answer: the last day's, at most this many.
RECENT_EVENTS = 50
RECENT = timedelta(days=1)


class AcceptedOut(BaseModel):
    accepted_through: int = Field(description="the highest seq stored: forget it and older")


class EventOut(BaseModel):
    seq: int
    at: datetime
    kind: str
    severity: str
    volume: str | None
    detail: str


class SampleOut(BaseModel):
    seq: int
    at: datetime = Field(description="by the gateway's clock")
    received: datetime
    version: str
    kernel: str
    hypervisor: str
    site: str
    gateway: dict[str, float]
    volumes: dict[str, dict[str, float]] = Field(description="by the gateway's volume name")


class GatewayHealthOut(BaseModel):
    gateway_id: str
    name: str
    online: bool = Field(description="a control server holds its long-poll")
    heartbeat: datetime | None = Field(description="the holder's last heartbeat for it")
    last_seen: datetime | None = Field(description="its last authenticated request")
    latest: SampleOut | None = Field(description="its newest report (null: none yet)")
    events: list[EventOut] = Field(description="the last day's, newest first")


class VolumeHealthOut(BaseModel):
    volume_id: str
    gateway_id: str
    name: str = Field(description="the gateway's name for it")
    at: datetime | None
    metrics: dict[str, float] = Field(description="from the gateway's newest report")
    events: list[EventOut]


class FleetGatewayOut(BaseModel):
    gateway_id: str
    name: str
    account_id: str
    last_report_age_s: float | None
    version: str | None
    hypervisor: str | None
    site: str | None
    log_used_percent: float | None
    queued_write_bytes: float | None
    recovery_point_age_s: float | None
    error_events: int = Field(description="error and critical events of the last day")


def _store(request: Request) -> HealthStore:
    store: HealthStore = request.app.state.health
    return store


def _registry(request: Request) -> CollectorRegistry:
    reg: CollectorRegistry = request.app.state.health_metrics
    return reg


Store = Annotated[HealthStore, Depends(_store)]
router = APIRouter(prefix="/v1")
metrics_router = APIRouter()


# Gateways


@router.post(HEALTH_PATH.removeprefix("/v1"), tags=["gateway"], responses=errors(400, 403, 413))
async def post_health(request: Request, principal: GatewayPrincipal, store: Store) -> AcceptedOut:
    """A batch of the gateway's health reports, stored once per ``seq`` (a batch sent
    again changes nothing)."""
    assert principal.gateway_id is not None
    try:
        doc = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"the health batch is not JSON: {exc}") from None
    reports = parse_batch(doc)
    through = await asyncio.to_thread(store.ingest, principal.gateway_id, reports)
    return AcceptedOut(accepted_through=through)


# Admins


def _gateway(request: Request, principal: Principal, gateway_id: str) -> tuple[str, str, Any]:
    """(id, name, last_seen) of a gateway the principal may see; NotFoundError otherwise."""
    gateways: Gateways = request.app.state.gateways
    if principal.operator:
        info = gateways.by_id(gateway_id)
        if info is None:
            raise NotFoundError(f"gateway {gateway_id} not found")
    else:
        info = gateways.get(principal.account_id, gateway_id)
    return info.id, info.name, info.last_seen


def _volume(store: HealthStore, principal: Principal, volume_id: str) -> tuple[str, str]:
    """(gateway id, gateway's name) of a volume the principal may see."""
    ref = store.volume(volume_id)
    if ref is None or not (principal.operator or ref[0] == principal.account_id):
        raise NotFoundError(f"volume {volume_id} not found in account {principal.account_id}")
    if ref[1] is None:
        raise NotFoundError(
            f"volume {volume_id} is on no gateway, so it has no health; bind it to a gateway"
        )
    return ref[1], ref[2]


def _events(events: list[EventInfo]) -> list[EventOut]:
    return [EventOut(**e.to_json()) for e in events]


def _sample(latest: Latest) -> SampleOut:
    return SampleOut(
        seq=latest.seq,
        at=latest.at,
        received=latest.received,
        gateway=latest.gateway,
        volumes=latest.volumes,
        **latest.labels,
    )


@router.get("/gateways/{gateway_id}/health", tags=["health"], responses=errors(404))
def gateway_health(
    gateway_id: str, request: Request, principal: AdminPrincipal, store: Store
) -> GatewayHealthOut:
    """The gateway's newest report, its last day's events and its control connection."""
    gid, name, last_seen = _gateway(request, principal, gateway_id)
    hub: ControlHub = request.app.state.control
    now = utcnow()
    holder = hub.store.holder(gid, now, hub.t.server_ttl_s)
    latest = store.latest(gid)
    return GatewayHealthOut(
        gateway_id=gid,
        name=name,
        online=holder is not None and holder.fresh,
        heartbeat=holder.heartbeat if holder is not None else None,
        last_seen=last_seen,
        latest=_sample(latest) if latest is not None else None,
        events=_events(store.events(gid, since=now - RECENT, limit=RECENT_EVENTS)),
    )


Since = Annotated[
    datetime | None,
    Query(description="from (ISO 8601; default: a day ago, raw; 30 days, hour; 396, day)"),
]
Until = Annotated[datetime | None, Query(description="to (ISO 8601; default: now)")]
StepQ = Annotated[
    Literal["raw", "hour", "day"],
    Query(description="raw samples, or hourly or daily aggregates (docs/health.md)"),
]
MetricQ = Annotated[str, Query(description="a metric name (sgw.common.health)", max_length=64)]


def _since(since: datetime | None, step: str) -> datetime:
    if since is not None and since.tzinfo is None:
        raise BadRequestError("since: give the time with its zone (UTC: ...Z or +00:00)")
    default = {"raw": timedelta(days=1), "hour": timedelta(days=30), "day": timedelta(days=396)}
    return since or utcnow() - default[step]


@router.get("/gateways/{gateway_id}/health/series", tags=["health"], responses=errors(400, 404))
def gateway_series(
    gateway_id: str,
    *,
    request: Request,
    principal: AdminPrincipal,
    store: Store,
    metric: MetricQ,
    since: Since = None,
    until: Until = None,
    step: StepQ = "raw",
) -> dict[str, Any]:
    """One gateway metric over time (at most 20,000 points, oldest first)."""
    gid, _name, _seen = _gateway(request, principal, gateway_id)
    points = store.series(gid, metric, since=_since(since, step), until=until, step=step)
    return {"gateway_id": gid, "metric": metric, "step": step, "points": points}


@router.get("/volumes/{volume_id}/health", tags=["health"], responses=errors(404))
def volume_health(volume_id: str, principal: AdminPrincipal, store: Store) -> VolumeHealthOut:
    """The volume's metrics from its gateway's newest report, and its last day's events."""
    gid, name = _volume(store, principal, volume_id)
    latest = store.latest(gid)
    return VolumeHealthOut(
        volume_id=volume_id,
        gateway_id=gid,
        name=name,
        at=latest.at if latest is not None else None,
        metrics=dict(latest.volumes.get(name, {})) if latest is not None else {},
        events=_events(
            store.events(gid, since=utcnow() - RECENT, limit=RECENT_EVENTS, volume=name)
        ),
    )


@router.get("/volumes/{volume_id}/health/series", tags=["health"], responses=errors(400, 404))
def volume_series(
    volume_id: str,
    *,
    principal: AdminPrincipal,
    store: Store,
    metric: MetricQ,
    since: Since = None,
    until: Until = None,
    step: StepQ = "raw",
) -> dict[str, Any]:
    """One volume metric over time (at most 20,000 points, oldest first)."""
    gid, name = _volume(store, principal, volume_id)
    points = store.series(
        gid, metric, since=_since(since, step), until=until, step=step, volume=name
    )
    return {"volume_id": volume_id, "metric": metric, "step": step, "points": points}


@router.get("/health/fleet", tags=["health"], responses=errors())
def fleet(principal: AdminPrincipal, store: Store) -> list[FleetGatewayOut]:
    """Every active gateway of the account (the operator: of every account) at a glance."""
    now = utcnow()
    out = []
    for row in store.fleet(None if principal.operator else principal.account_id, now):
        g = row.gateway
        out.append(
            FleetGatewayOut(
                gateway_id=row.gateway_id,
                name=row.name,
                account_id=row.account_id,
                last_report_age_s=(now - row.received).total_seconds() if row.received else None,
                version=row.version,
                hypervisor=row.hypervisor,
                site=row.site,
                log_used_percent=g.get("log_used_percent"),
                queued_write_bytes=g.get("queued_write_bytes"),
                recovery_point_age_s=g.get("recovery_point_age_seconds"),
                error_events=row.errors,
            )
        )
    return out


# The operator


@metrics_router.get(METRICS_PATH, tags=["health"], responses=errors())
def metrics(_principal: OperatorPrincipal, request: Request) -> Response:
    """The fleet's newest samples for a Prometheus server (text format, operator only)."""
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
