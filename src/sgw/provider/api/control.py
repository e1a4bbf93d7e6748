"""Routes of the control channel (docs/provider.md, "The control channel").

Gateways (signed requests): ``GET /v1/gateway/messages?wait=S&ack=IDS`` is the
long-poll (held until a command arrives or ``wait`` ends; ``ack`` acknowledges earlier
answers), ``POST /v1/gateway/messages/replies`` carries outcomes, ``GET
/v1/gateway/volumes/{id}/access`` hands a gateway its volume's iSCSI access rules (CHAP
secrets, initiators allowed without CHAP, the open flag); ``.../chap``, the CHAP secrets
alone, serves gateways from before access rules.

Admins (API tokens): ``POST /v1/gateways/{id}/commands`` sends a command,
``GET /v1/gateways/{id}/commands/{cid}?wait=S`` waits for its outcome,
``GET /v1/gateways/{id}/commands`` lists recent ones, ``GET /v1/gateways/{id}/connection``
says which control server holds the gateway.

Control servers: ``POST /v1/control/doorbell`` (shared secret, not in the API
description) wakes held polls and command waiters.

The poll, the replies and the admin's ``POST .../commands`` are served by
``sgw.provider.api.lean`` in front of the framework (the same models and functions:
``poll_out``, ``send_command``); the routes here describe them and serve what the lean
path hands on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive

from sgw.common.commands import TYPES
from sgw.common.errors import BadRequestError, ForbiddenError, UnauthenticatedError
from sgw.provider.api.accounts import errors
from sgw.provider.api.auth import (
    AdminPrincipal,
    Kind,
    OperatorPrincipal,
    Principal,
    check_volume,
    current_principal,
)
from sgw.provider.control import peers
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.planner import QUEUED_TTL_S, CommandPlanner, requires_online
from sgw.provider.control.schedules import KEY_PREFIX
from sgw.provider.control.store import MessageInfo
from sgw.provider.db.models import utcnow
from sgw.provider.management.volume_settings import VolumeSettings

POLL_PATH = "/v1/gateway/messages"
REPLIES_PATH = "/v1/gateway/messages/replies"
# Longest hold of a poll or a command wait (seconds): below common proxy idle timeouts.
MAX_WAIT_S = 60.0
# Most message ids one poll acknowledges.
_MAX_ACK = 256


class MessageOut(BaseModel):
    """A command as the gateway receives it."""

    id: str
    type: str
    args: dict[str, Any]
    idempotency_key: str
    created: datetime
    expires: datetime = Field(description="the gateway refuses to start it after this")
    delivery: int = Field(description="1 at first delivery, more when delivered again")


class PollOut(BaseModel):
    messages: list[MessageOut]
    server: str = Field(description="the control server that answered")
    servers: list[str] = Field(description="every live control server (to fail over to)")


class ReplyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    status: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=4096)


class RepliesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replies: list[ReplyIn] = Field(max_length=256)


class RepliesOut(BaseModel):
    accepted: list[str] = Field(description="recorded (or recorded before)")
    refused: list[str] = Field(description="no such command for this gateway: drop them")


class ChapSecretOut(BaseModel):
    initiator: str
    secret: str
    target_secret: str | None


class GatewayAccessOut(BaseModel):
    chap: list[ChapSecretOut]
    acl: list[str] = Field(description="initiators allowed without CHAP")
    open: bool = Field(description="any initiator, no authentication (the rules set aside)")


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal[TYPES]  # type: ignore[valid-type]
    args: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="the same key: the same command"
    )
    ttl: float | None = Field(
        None,
        ge=1,
        le=QUEUED_TTL_S,
        description="seconds the gateway has to take it (at most the command's default: "
        "120, or 7 days for sync_chap); it never starts later",
    )


class CommandOut(BaseModel):
    id: str
    gateway_id: str
    type: str
    args: dict[str, Any]
    idempotency_key: str
    status: Literal["queued", "delivered", "acknowledged", "succeeded", "failed", "expired"]
    created: datetime
    expires: datetime
    delivered: datetime | None
    deliveries: int
    acknowledged: datetime | None
    completed: datetime | None
    result: dict[str, Any] | None
    error: str | None

    @classmethod
    def of(cls, m: MessageInfo) -> CommandOut:
        return cls(
            id=m.id,
            gateway_id=m.gateway_id,
            type=m.type,
            args=m.args,
            idempotency_key=m.idempotency_key,
            status=m.status,  # type: ignore[arg-type]
            created=m.created,
            expires=m.expires,
            delivered=m.delivered,
            deliveries=m.deliveries,
            acknowledged=m.acknowledged,
            completed=m.completed,
            result=m.result,
            error=m.error,
        )


class ConnectionOut(BaseModel):
    online: bool
    server_id: str | None = Field(description="the control server holding it")
    server_url: str | None
    since: datetime | None
    heartbeat: datetime | None


async def gateway_principal(request: Request) -> Principal:
    """An activated gateway's signed request (no thread hop: the principal is known)."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None or principal.kind is not Kind.GATEWAY or not principal.gateway_id:
        if principal is None or principal.kind is Kind.CANDIDATE:
            raise UnauthenticatedError(
                "the control channel is for activated gateways: sign the request with the "
                "gateway's identity key (activate it first with `sgw activate`)"
            )
        raise ForbiddenError("only gateways poll for commands; admins send them")
    return principal


def _hub(request: Request) -> ControlHub:
    hub: ControlHub = request.app.state.control
    return hub


def _planner(request: Request) -> CommandPlanner:
    planner: CommandPlanner = request.app.state.commands
    return planner


GatewayPrincipal = Annotated[Principal, Depends(gateway_principal)]
Hub = Annotated[ControlHub, Depends(_hub)]
Planner = Annotated[CommandPlanner, Depends(_planner)]
router = APIRouter(prefix="/v1")


# Gateways


@router.get(POLL_PATH.removeprefix("/v1"), tags=["gateway"], responses=errors(403))
async def poll_messages(
    request: Request,
    principal: GatewayPrincipal,
    hub: Hub,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to hold")] = 20.0,
    ack: Annotated[str | None, Query(description="comma-separated ids now held")] = None,
) -> PollOut:
    """The gateway's long-poll: its pending commands, as soon as there are any."""
    assert principal.gateway_id is not None
    ids = ack_ids(ack)
    messages = await hub.poll(principal.gateway_id, wait, ids, _disconnect_waiter(request))
    return poll_out(hub, messages)


def ack_ids(ack: str | None) -> list[str]:
    """The message ids of a poll's ``ack`` (at most ``_MAX_ACK``)."""
    return [i for i in (ack or "").split(",") if i][:_MAX_ACK]


def poll_out(hub: ControlHub, messages: list[MessageInfo]) -> PollOut:
    """A poll's answer."""
    return PollOut(
        messages=[
            MessageOut(
                id=m.id,
                type=m.type,
                args=m.args,
                idempotency_key=m.idempotency_key,
                created=m.created,
                expires=m.expires,
                delivery=m.deliveries,
            )
            for m in messages
        ],
        server=hub.url,
        servers=hub.peer_urls,
    )


@router.post(REPLIES_PATH.removeprefix("/v1"), tags=["gateway"], responses=errors(403, 422))
async def post_replies(body: RepliesIn, principal: GatewayPrincipal, hub: Hub) -> RepliesOut:
    """Outcomes of commands; the first reply of a command is kept, later ones accepted
    and ignored (a gateway sends its replies again until they are accepted)."""
    assert principal.gateway_id is not None
    accepted, refused = await hub.reply(
        principal.gateway_id,
        [(r.id, r.status == "succeeded", r.result, r.error) for r in body.replies],
    )
    return RepliesOut(accepted=accepted, refused=refused)


@router.get("/gateway/volumes/{volume_id}/chap", tags=["gateway"], responses=errors(403, 404))
def gateway_chap(volume_id: str, request: Request, response: Response) -> list[ChapSecretOut]:
    """The CHAP credentials of one of the gateway's volumes, secrets in the clear (LIO
    needs them); for the gateway itself only."""
    principal = current_principal(request)
    if principal.kind is not Kind.GATEWAY:
        raise ForbiddenError("only the volume's gateway may fetch its CHAP secrets")
    check_volume(request, principal, volume_id)
    settings: VolumeSettings = request.app.state.volume_settings
    response.headers["cache-control"] = "no-store"
    return [
        ChapSecretOut(initiator=i, secret=s, target_secret=t)
        for i, s, t in settings.chap_secrets(volume_id)
    ]


@router.get("/gateway/volumes/{volume_id}/access", tags=["gateway"], responses=errors(403, 404))
def gateway_access(volume_id: str, request: Request, response: Response) -> GatewayAccessOut:
    """Who may log in to one of the gateway's volumes, CHAP secrets in the clear (LIO
    needs them); for the gateway itself only."""
    principal = current_principal(request)
    if principal.kind is not Kind.GATEWAY:
        raise ForbiddenError("only the volume's gateway may fetch its access rules")
    check_volume(request, principal, volume_id)
    settings: VolumeSettings = request.app.state.volume_settings
    response.headers["cache-control"] = "no-store"
    rules = settings.gateway_access(volume_id)
    return GatewayAccessOut(
        chap=[ChapSecretOut(initiator=i, secret=s, target_secret=t) for i, s, t in rules.chap],
        acl=rules.acl,
        open=rules.open,
    )


# Admins


@router.post(
    "/gateways/{gateway_id}/commands",
    status_code=202,
    tags=["gateways"],
    responses=errors(400, 404, 409, 422),
)
async def post_command(
    gateway_id: str,
    *,
    body: CommandIn,
    principal: AdminPrincipal,
    hub: Hub,
    planner: Planner,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the outcome")
    ] = 0.0,
) -> CommandOut:
    """Sends the gateway a command; 409 ``gateway_offline`` if it needs the gateway online
    and no control server holds it. With ``wait``, answers once the command finished (or
    then); wait further with the GET of the command."""
    return CommandOut.of(
        await send_command(hub, planner, principal.account_id, gateway_id, body, wait=wait)
    )


async def send_command(
    hub: ControlHub,
    planner: CommandPlanner,
    account: str,
    gateway_id: str,
    body: CommandIn,
    *,
    wait: float,
) -> MessageInfo:
    """``POST /v1/gateways/{id}/commands`` once the caller is known to act for
    ``account`` (also served by ``sgw.provider.api.lean``)."""
    if body.idempotency_key is not None and body.idempotency_key.startswith(KEY_PREFIX):
        raise BadRequestError(
            f"idempotency keys starting with {KEY_PREFIX!r} are the provider's own (snapshot "
            "schedules); choose another key"
        )
    if body.idempotency_key is not None:
        known = await asyncio.to_thread(hub.store.find, account, gateway_id, body.idempotency_key)
        if known is not None:
            return known
    # Commands that touch no records are prepared on the loop once the gateway's account
    # is known (no thread hop, no database read: what most commands are).
    inline = planner.owner_known(account, gateway_id) and not planner.needs_database(body.type)
    if inline:
        planner.check(account, gateway_id, body.type, body.args)
    else:
        await asyncio.to_thread(planner.check, account, gateway_id, body.type, body.args)
    # Refused before anything (such as a volume record) is made for it.
    if requires_online(body.type):
        await hub.check_online(gateway_id)
    if inline:
        prepared = planner.prepare(account, gateway_id, body.type, body.args)
    else:
        prepared = await asyncio.to_thread(
            planner.prepare, account, gateway_id, body.type, body.args
        )
    info, _new = await hub.post(
        account,
        gateway_id,
        prepared.type,
        prepared.args,
        idempotency_key=body.idempotency_key,
        ttl_s=min(body.ttl or prepared.ttl_s, prepared.ttl_s),
        require_online=False,
        wait=wait,
    )
    return info


@router.get(
    "/gateways/{gateway_id}/commands/{command_id}", tags=["gateways"], responses=errors(404)
)
async def get_command(
    gateway_id: str,
    command_id: str,
    principal: AdminPrincipal,
    hub: Hub,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the outcome")
    ] = 0.0,
) -> CommandOut:
    """A command and its outcome; with ``wait``, answers once it finished (or then)."""
    info = await hub.wait_finished(principal.account_id, gateway_id, command_id, wait)
    return CommandOut.of(info)


@router.delete(
    "/gateways/{gateway_id}/commands/{command_id}", tags=["gateways"], responses=errors(404)
)
async def cancel_command(
    gateway_id: str, command_id: str, principal: AdminPrincipal, hub: Hub
) -> CommandOut:
    """Cancels a command no poll took yet (it becomes ``expired`` and never runs); one
    already delivered is answered unchanged (the gateway refuses to start it after its
    deadline)."""
    return CommandOut.of(await hub.cancel(principal.account_id, gateway_id, command_id))


@router.get("/gateways/{gateway_id}/commands", tags=["gateways"], responses=errors(404))
def list_commands(
    gateway_id: str,
    principal: AdminPrincipal,
    hub: Hub,
    planner: Planner,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[CommandOut]:
    """The gateway's newest commands, newest first."""
    planner.gateways.get(principal.account_id, gateway_id)
    return [
        CommandOut.of(m) for m in hub.store.list_messages(principal.account_id, gateway_id, limit)
    ]


@router.get("/gateways/{gateway_id}/connection", tags=["gateways"], responses=errors(404))
def connection(
    gateway_id: str, principal: AdminPrincipal, hub: Hub, planner: Planner
) -> ConnectionOut:
    """Whether the gateway is online, and which control server holds it."""
    planner.gateways.get(principal.account_id, gateway_id)
    holder = hub.store.holder(gateway_id, utcnow(), hub.t.server_ttl_s)
    if holder is None:
        return ConnectionOut(
            online=False, server_id=None, server_url=None, since=None, heartbeat=None
        )
    return ConnectionOut(
        online=holder.fresh,
        server_id=holder.server_id,
        server_url=holder.url,
        since=holder.since,
        heartbeat=holder.heartbeat,
    )


# Control servers


class ServerOut(BaseModel):
    server_id: str
    url: str
    held: int = Field(description="gateways whose long-poll this server holds now")
    peers: list[str] = Field(description="live control servers, this one included")
    stats: dict[str, int] = Field(description="counters since the server started")


@router.get("/control/server", tags=["status"], responses=errors())
def control_server(_principal: OperatorPrincipal, hub: Hub) -> ServerOut:
    """The control server that answers: its gateways held and its counters (operator)."""
    return ServerOut(
        server_id=hub.server_id,
        url=hub.url,
        held=hub.held,
        peers=hub.peer_urls,
        stats=dict(hub.stats),
    )


@router.post("/control/doorbell", include_in_schema=False)
async def doorbell(request: Request, hub: Hub) -> dict[str, Any]:
    """A peer's doorbell: wakes the held polls of these gateways and the waiters of
    these commands; answers which of the gateways this server holds."""
    body = await request.body()
    caller = peers.verify(
        hub.secret, request.headers.get(peers.HEADER), "POST", request.url.path, body
    )
    if caller is None:
        raise UnauthenticatedError(
            "doorbell refused: not signed with this provider's control secret (copy "
            "DATA_DIR/control.secret to every control server)"
        )
    doc = _json_object(body)
    gateways = [str(g) for g in doc.get("gateways", []) if isinstance(g, str)]
    messages = [str(m) for m in doc.get("messages", []) if isinstance(m, str)]
    hub.notify_messages(messages)
    return {"held": hub.ring_local(gateways), "server": hub.server_id}


def _disconnect_waiter(request: Request) -> Callable[[], Awaitable[None]]:
    return disconnect_waiter(request.receive)


def disconnect_waiter(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client's connection is gone (the
    server tells the application so through ``receive``)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
