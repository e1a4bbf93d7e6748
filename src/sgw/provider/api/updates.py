"""Routes of updates: policies, ``now``, status and rollouts (docs/updates.md).

Gateways (signed requests): ``GET /v1/updates/plan`` (which release to run, with the
gateway's policy), ``POST /v1/updates/reports`` (the update agent's progress; 204,
idempotent).

Account admins (API tokens): ``GET|PUT /v1/updates/policy`` (the account's default),
``GET|PUT|DELETE /v1/gateways/{id}/update-policy``, ``POST /v1/gateways/{id}/updates/now``
(swap to the planned release at once: marks it and sends the ``update`` command),
``GET /v1/updates/status``.

The operator (its account's API token): ``POST /v1/rollouts``, ``GET /v1/rollouts``,
``POST /v1/rollouts/halt`` and ``/resume`` (of the running or halted rollout, or the one of
``version``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sgw.common.commands import UpdateArgs
from sgw.common.errors import ForbiddenError, UnauthenticatedError
from sgw.common.maintenance import MAX_DURATION_MINUTES, Window
from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import AdminPrincipal, Kind, OperatorPrincipal, Principal
from sgw.provider.api.control import CommandOut
from sgw.provider.control.hub import ControlHub
from sgw.provider.updates.policy import Policies, Policy, Source
from sgw.provider.updates.rollouts import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_MAX_FAILURES,
    DEFAULT_SHARE,
    DEFAULT_SOAK_S,
    Rollouts,
)
from sgw.provider.updates.service import VERSION_MAX, Report, Updates

LOG = logging.getLogger(__name__)

PLAN_PATH = "/v1/updates/plan"
REPORTS_PATH = "/v1/updates/reports"
# How long the ``update`` command of ``now`` waits for an offline gateway (seconds): the
# mark in its plan outlives it, so the agent's next periodic check finds it anyway.
NOW_COMMAND_TTL_S = 3600.0


class WindowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["weekly", "monthly"]
    day: int = Field(description="weekly: 0=Monday..6=Sunday; monthly: 1..31 (past the end: last)")
    hour: int = Field(ge=0, le=23)
    minute: int = Field(ge=0, le=59)
    duration_minutes: int = Field(ge=1, le=MAX_DURATION_MINUTES)

    def window(self) -> Window:
        return Window(self.kind, self.day, self.hour, self.minute, self.duration_minutes)


class PolicyIn(BaseModel):
    """The fields to change; the others keep the values in effect."""

    model_config = ConfigDict(extra="forbid")

    channel: Literal["canary", "stable"] | None = None
    window: WindowIn | None = None
    automatic: Literal["all", "emergency"] | None = Field(
        None, description="all: every release in the window; emergency: emergency ones only"
    )


class WindowOut(BaseModel):
    kind: str
    day: int
    hour: int
    minute: int
    duration_minutes: int


class PolicyOut(BaseModel):
    channel: str
    window: WindowOut
    window_text: str = Field(description='e.g. "weekly sun 03:00 60m"')
    automatic: str
    source: str = Field(description="gateway (its own), account (the default) or default")

    @classmethod
    def of(cls, policy: Policy, source: Source) -> PolicyOut:
        return cls(
            channel=policy.channel,
            window=WindowOut(**policy.window.to_json()),
            window_text=str(policy.window),
            automatic=policy.automatic,
            source=source,
        )


class PlanOut(BaseModel):
    version: str | None = Field(description="the release to run; null: stay")
    severity: str | None
    now: bool = Field(description="swap at once, outside the window (`sgw updates now`)")
    channel: str
    automatic: str
    timezone: str | None
    window: WindowOut


class ReportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=VERSION_MAX)
    from_version: str = Field(min_length=1, max_length=VERSION_MAX)
    state: Literal[
        "downloading", "verified", "installed", "waiting", "swapping", "done", "failed", "refused"
    ]
    reason: str | None = Field(None, max_length=4096)
    pause_s: float | None = Field(None, ge=0)
    at: datetime = Field(description="when, by the gateway's clock (ISO 8601, UTC)")

    @field_validator("at")
    @classmethod
    def _aware(cls, at: datetime) -> datetime:
        if at.tzinfo is None:
            raise ValueError("give the time with its zone (UTC: ...Z or +00:00)")
        return at


class NowOut(BaseModel):
    version: str
    command: CommandOut


class RolloutOut(BaseModel):
    id: str
    version: str
    severity: str
    channel: str
    state: Literal["running", "halted", "completed", "superseded"]
    phase: int = Field(description="1 canary, 2 the share, 3 everyone")
    phase_started: datetime
    share: int
    soak_minutes: float
    max_failures: int
    heartbeat_timeout_minutes: float
    halt_reason: str | None
    halted: datetime | None
    started: datetime = Field(description="when it started, or was last resumed")
    completed: datetime | None


class GatewayUpdateOut(BaseModel):
    gateway_id: str
    name: str
    running: str | None = Field(description="the release it runs, by its last report")
    planned: str | None = Field(description="the release its plan names")
    now: bool
    state: str | None = Field(description="its last report's state")
    version: str | None = Field(description="its last report's release")
    reason: str | None
    last_report: datetime | None
    pause_s: float | None = Field(description="the pause of its last swap (seconds)")
    channel: str
    automatic: str
    window: str
    timezone: str | None
    next_window: datetime | None


class StatusOut(BaseModel):
    gateways: list[GatewayUpdateOut]
    rollouts: list[RolloutOut]


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=VERSION_MAX)
    share: int = Field(DEFAULT_SHARE, ge=0, le=100, description="percent of the non-canary fleet")
    soak_minutes: float = Field(DEFAULT_SOAK_S / 60, ge=0, le=30 * 24 * 60)
    max_failures: int = Field(DEFAULT_MAX_FAILURES, ge=1)
    heartbeat_timeout_minutes: float = Field(DEFAULT_HEARTBEAT_TIMEOUT_S / 60, gt=0, le=7 * 24 * 60)


class HaltIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, max_length=VERSION_MAX)
    reason: str = Field("halted by the operator", min_length=1, max_length=1024)


class ResumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, max_length=VERSION_MAX)


def _updates(request: Request) -> Updates:
    updates: Updates = request.app.state.updates
    return updates


def _policies(request: Request) -> Policies:
    policies: Policies = request.app.state.update_policies
    return policies


def _rollouts(request: Request) -> Rollouts:
    rollouts: Rollouts = request.app.state.rollouts
    return rollouts


def gateway_caller(request: Request) -> Principal:
    """An activated gateway's signed request."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None or principal.kind is Kind.CANDIDATE:
        raise UnauthenticatedError(
            "updates are for activated gateways: sign the request with the gateway's identity "
            "key (activate it first with `sgw activate`)"
        )
    if principal.kind is not Kind.GATEWAY or not principal.gateway_id:
        raise ForbiddenError(
            "only gateways ask for their plan and report; admins use `sgw updates status`"
        )
    return principal


UpdatesDep = Annotated[Updates, Depends(_updates)]
PoliciesDep = Annotated[Policies, Depends(_policies)]
RolloutsDep = Annotated[Rollouts, Depends(_rollouts)]
GatewayCaller = Annotated[Principal, Depends(gateway_caller)]
router = APIRouter(prefix="/v1")


# Gateways


@router.get(PLAN_PATH.removeprefix("/v1"), tags=["gateway"], responses=errors(404))
def plan(principal: GatewayCaller, updates: UpdatesDep, response: Response) -> PlanOut:
    """Which release the gateway should run, and its policy (the agent enforces the window)."""
    assert principal.gateway_id is not None
    response.headers["cache-control"] = "no-store"
    return PlanOut(**updates.plan(principal.gateway_id).to_json())


@router.post(
    REPORTS_PATH.removeprefix("/v1"), status_code=204, tags=["gateway"], responses=errors(422)
)
def report(body: ReportIn, principal: GatewayCaller, updates: UpdatesDep) -> Response:
    """The update agent's progress; sent again (same version, state and time): no change."""
    assert principal.gateway_id is not None
    new = updates.record(
        principal.gateway_id,
        Report(body.version, body.from_version, body.state, body.reason, body.pause_s, body.at),
    )
    if new and body.state in ("done", "failed"):
        try:
            updates.rollouts.evaluate()
        except Exception as exc:  # the periodic evaluation tries again
            LOG.warning("rollouts: evaluation after a report failed: %s", exc)
    return Response(status_code=204)


# Account admins


@router.get("/updates/policy", tags=["updates"], responses=errors())
def account_policy(principal: AdminPrincipal, policies: PoliciesDep) -> PolicyOut:
    """The account's default update policy (the built-in one until set)."""
    return PolicyOut.of(*policies.account_policy(principal.account_id))


@router.put("/updates/policy", tags=["updates"], responses=errors(400, 422))
def set_account_policy(
    body: PolicyIn, principal: AdminPrincipal, policies: PoliciesDep
) -> PolicyOut:
    """Sets the account's default (the fields given) for gateways without their own."""
    policy = policies.set_account(
        principal.account_id,
        channel=body.channel,
        window=body.window.window() if body.window else None,
        automatic=body.automatic,
    )
    return PolicyOut.of(policy, "account")


@router.get("/gateways/{gateway_id}/update-policy", tags=["updates"], responses=errors(404))
def gateway_policy(gateway_id: str, principal: AdminPrincipal, policies: PoliciesDep) -> PolicyOut:
    """The gateway's update policy in effect, and where it comes from."""
    return PolicyOut.of(*policies.gateway_policy(principal.account_id, gateway_id))


@router.put(
    "/gateways/{gateway_id}/update-policy", tags=["updates"], responses=errors(400, 404, 422)
)
def set_gateway_policy(
    gateway_id: str, body: PolicyIn, principal: AdminPrincipal, policies: PoliciesDep
) -> PolicyOut:
    """Sets the gateway's own policy (the fields given; the others keep what was in effect)."""
    policy = policies.set_gateway(
        principal.account_id,
        gateway_id,
        channel=body.channel,
        window=body.window.window() if body.window else None,
        automatic=body.automatic,
    )
    return PolicyOut.of(policy, "gateway")


@router.delete("/gateways/{gateway_id}/update-policy", tags=["updates"], responses=errors(404))
def clear_gateway_policy(
    gateway_id: str, principal: AdminPrincipal, policies: PoliciesDep
) -> PolicyOut:
    """Drops the gateway's own policy: the account's default applies again."""
    return PolicyOut.of(*policies.clear_gateway(principal.account_id, gateway_id))


@router.post(
    "/gateways/{gateway_id}/updates/now",
    status_code=202,
    tags=["updates"],
    responses=errors(400, 404),
)
async def update_now(
    gateway_id: str, request: Request, principal: AdminPrincipal, updates: UpdatesDep
) -> NowOut:
    """Swaps the gateway to its planned release (or its channel's newest) at once, outside
    its window: marks it in the gateway's plan and sends the ``update`` command."""
    version = await asyncio.to_thread(updates.mark_now, principal.account_id, gateway_id)
    hub: ControlHub = request.app.state.control
    info, _new = await hub.post(
        principal.account_id,
        gateway_id,
        "update",
        UpdateArgs(version=version, now=True).to_args(),
        ttl_s=NOW_COMMAND_TTL_S,
        require_online=False,
    )
    return NowOut(version=version, command=CommandOut.of(info))


@router.get("/updates/status", tags=["updates"], responses=errors(404))
def status(
    principal: AdminPrincipal,
    updates: UpdatesDep,
    gateway_id: Annotated[str | None, Query(description="one gateway only")] = None,
) -> StatusOut:
    """Per gateway: the release it runs, the one planned, its last report and the swap's
    pause, its window's next opening; and the newest rollouts."""
    try:
        updates.rollouts.evaluate()
    except Exception as exc:
        LOG.warning("rollouts: evaluation for the status failed: %s", exc)
    return StatusOut.model_validate(updates.status(principal.account_id, gateway_id))


# The operator


@router.post("/rollouts", status_code=201, tags=["updates"], responses=errors(400, 404, 422))
def start_rollout(
    body: RolloutIn, _principal: OperatorPrincipal, rollouts: RolloutsDep
) -> RolloutOut:
    """Starts a rollout of a published release (a running or halted one is superseded)."""
    info = rollouts.start(
        body.version,
        share=body.share,
        soak_s=body.soak_minutes * 60,
        max_failures=body.max_failures,
        heartbeat_timeout_s=body.heartbeat_timeout_minutes * 60,
    )
    rollouts.evaluate()
    return RolloutOut(**rollouts.get(info.id).to_json())


@router.get("/rollouts", tags=["updates"], responses=errors())
def list_rollouts(
    _principal: OperatorPrincipal,
    rollouts: RolloutsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[RolloutOut]:
    """The newest rollouts, newest first (evaluated first)."""
    rollouts.evaluate()
    return [RolloutOut(**r.to_json()) for r in rollouts.recent(limit)]


@router.post("/rollouts/halt", tags=["updates"], responses=errors(404, 422))
def halt_rollout(body: HaltIn, _principal: OperatorPrincipal, rollouts: RolloutsDep) -> RolloutOut:
    """Halts the running rollout: gateways that have not swapped stay where they are."""
    return RolloutOut(**rollouts.stop(body.version, body.reason).to_json())


@router.post("/rollouts/resume", tags=["updates"], responses=errors(404, 422))
def resume_rollout(
    body: ResumeIn, _principal: OperatorPrincipal, rollouts: RolloutsDep
) -> RolloutOut:
    """Runs the halted rollout again from the phase it halted in."""
    return RolloutOut(**rollouts.resume(body.version).to_json())
