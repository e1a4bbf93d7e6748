"""Who a request acts for, and what it may touch (DESIGN.md section 4).

Two kinds of credentials (docs/adr/0003-gateway-authentication.md):

- ``Authorization: Bearer sgw_...``: an admin API token of an account (``sgw provider
  init`` makes the first). It may call everything of its account.
- ``Authorization: SGW1-Ed25519 ...``: a gateway's request, signed with its identity key
  (``sgw.common.signing``), within the clock-skew window, each nonce once. It acts for
  the gateway's account but touches only the volumes bound to the gateway and their
  snapshots (anything else is 404 to it), and no admin call (403). A not yet activated
  gateway signs with its bare public key and may only fetch its credentials.

``AuthMiddleware`` checks credentials before anything else runs (a bad one is a 401,
logged); the route dependencies (``CurrentAccount``, ``AdminPrincipal``) say what a route
needs, so no route can forget to ask. In development mode (``--insecure-dev``) a request
without credentials acts for the built-in account ``dev``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgw.common import signing
from sgw.common.errors import (
    DatabaseError,
    ForbiddenError,
    NotFoundError,
    UnauthenticatedError,
)
from sgw.provider.accounts import TOKEN_PREFIX, Accounts
from sgw.provider.db.models import Account, GatewayStatus
from sgw.provider.gateways import Gateways
from sgw.provider.nonces import NonceLedger

LOG = logging.getLogger(__name__)

DEV_ACCOUNT_ID = "dev"
DEV_ACCOUNT_NAME = "dev"
_NO_CREDENTIALS = (
    "no credentials: send an API token of the management plane (Authorization: Bearer "
    "TOKEN; `sgw provider init` prints the first) or a request signed by an activated "
    "gateway; on a development machine start the provider with `sgw provider serve "
    "--insecure-dev` to serve without them"
)


class Kind(enum.StrEnum):
    TOKEN = "token"  # an admin API token
    GATEWAY = "gateway"  # an activated gateway's signed request
    CANDIDATE = "candidate"  # a gateway not activated (yet), signing with its public key
    DEV = "dev"  # no credentials, --insecure-dev


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for."""

    kind: Kind
    account_id: str = ""
    operator: bool = False
    token_id: str | None = None
    gateway_id: str | None = None
    public_key: bytes | None = None


DEV_PRINCIPAL = Principal(Kind.DEV, DEV_ACCOUNT_ID)


class Authenticator:
    """Turns credentials into a Principal, or UnauthenticatedError naming what is wrong."""

    def __init__(
        self,
        accounts: Accounts,
        gateways: Gateways,
        nonces: NonceLedger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.accounts = accounts
        self.gateways = gateways
        self.nonces = nonces
        self.clock = clock

    def bearer(self, token: str) -> Principal:
        found = self.accounts.authenticate(token) if token.startswith(TOKEN_PREFIX) else None
        if found is None:
            raise UnauthenticatedError(
                "the API token is not valid (revoked, mistyped or of another provider); "
                "create one with `sgw tokens create`"
            )
        record, account = found
        return Principal(Kind.TOKEN, account.id, account.operator, token_id=record.id)

    def signed(self, header: str, method: str, target: bytes, body: bytes) -> Principal:
        parsed = signing.parse_header(header)
        if parsed is None:
            raise UnauthenticatedError(
                f"malformed {signing.SCHEME} Authorization header; see "
                "docs/adr/0003-gateway-authentication.md"
            )
        skew = parsed.timestamp - self.clock()
        if abs(skew) > signing.CLOCK_SKEW_S:
            raise UnauthenticatedError(
                f"stale request: its timestamp is {skew:+.0f} s from the provider's clock, "
                f"more than the {signing.CLOCK_SKEW_S} s allowed; set the gateway's clock (NTP)"
            )
        principal, public_key = self._signer(parsed.key_id)
        if not signing.verify(public_key, parsed, method, target, signing.body_digest(body)):
            raise UnauthenticatedError(
                f"bad signature from {parsed.key_id}: the request was altered or not signed "
                "with the gateway's identity key"
            )
        expires = datetime.fromtimestamp(parsed.timestamp + signing.CLOCK_SKEW_S + 1, UTC)
        if not self.nonces.first_use(parsed.key_id, parsed.nonce, expires):
            raise UnauthenticatedError(
                f"replayed request: nonce {parsed.nonce} of {parsed.key_id} was used before; "
                "sign every request with a new nonce"
            )
        if principal.gateway_id is not None:
            self.gateways.touch(principal.gateway_id)
        return principal

    def _signer(self, key_id: str) -> tuple[Principal, bytes]:
        if key_id.startswith(signing.GATEWAY_PREFIX):
            gateway_id = key_id.removeprefix(signing.GATEWAY_PREFIX)
            gateway = self.gateways.by_id(gateway_id)
            if gateway is None or gateway.public_key is None:
                raise UnauthenticatedError(f"unknown gateway {gateway_id}; activate it first")
            if gateway.status != GatewayStatus.ACTIVE.value:
                raise UnauthenticatedError(
                    f"gateway {gateway_id} is {gateway.status}: its credentials are revoked"
                )
            principal = Principal(Kind.GATEWAY, gateway.account_id, gateway_id=gateway_id)
            return principal, bytes.fromhex(gateway.public_key)
        if key_id.startswith(signing.PUBLIC_KEY_PREFIX):
            hex_key = key_id.removeprefix(signing.PUBLIC_KEY_PREFIX)
            try:
                public_key = bytes.fromhex(hex_key)
            except ValueError:
                public_key = b""
            if len(public_key) != 32:
                raise UnauthenticatedError(f"key id {key_id[:80]!r}: not an Ed25519 public key")
            return Principal(Kind.CANDIDATE, public_key=public_key), public_key
        raise UnauthenticatedError(f"key id {key_id[:80]!r}: expected gw:ID or pk:HEX")


class AuthMiddleware:
    """Authenticates every request that carries credentials before the application sees
    it; stores the Principal in the request state. Bodies of signed requests (at most
    ``limit`` bytes) are read here, hashed, and handed on unchanged."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, limit: int) -> None:
        self.app = app
        self.auth = authenticator
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        if header is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            if header[:7].lower() == "bearer ":
                principal = await run_in_threadpool(self.auth.bearer, header[7:].strip())
            elif signing.is_signed(header):
                body = await _read_body(receive, self.limit)
                if body is None:
                    await _reply(scope, send, 413, "payload_too_large", "request body too large")
                    return
                receive = _replay(body, receive)
                principal = await run_in_threadpool(self.auth.signed, header, method, target, body)
            else:
                raise UnauthenticatedError(
                    f"unknown Authorization scheme {header.split(' ', 1)[0][:40]!r}: use "
                    f"Bearer (API tokens) or {signing.SCHEME} (gateways)"
                )
        except UnauthenticatedError as exc:
            client = scope.get("client")
            LOG.warning(
                "request refused: %s",
                exc,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "client": client[0] if client else None,
                },
            )
            await _reply(scope, send, 401, "unauthenticated", str(exc))
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            msg = await receive()
        except HTTPException:  # the body limit's own refusal
            return None
        if msg["type"] == "http.disconnect":
            raise UnauthenticatedError("the client went away before sending its body")
        if msg["type"] == "http.request":
            part = msg.get("body", b"")
            size += len(part)
            if size > limit:
                return None
            parts.append(part)
            if not msg.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    headers = {"WWW-Authenticate": 'Bearer realm="sgw"'} if status == 401 else None
    response = JSONResponse({"error": code, "message": message}, status, headers=headers)

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, nothing, send)


# Route dependencies


def current_principal(request: Request) -> Principal:
    """Who the request acts for; UnauthenticatedError if it carries no credentials."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is not None:
        return principal
    if request.app.state.config.insecure_dev:
        return DEV_PRINCIPAL
    raise UnauthenticatedError(_NO_CREDENTIALS)


def current_account(request: Request) -> str:
    """The account the request acts for. A gateway's request is refused (404) when the
    volume or snapshot in its path or query is not the gateway's."""
    principal = current_principal(request)
    if principal.kind is Kind.CANDIDATE:
        raise UnauthenticatedError(
            "this gateway is not activated: activate it with `sgw activate KEY --name NAME`"
        )
    if principal.kind is Kind.GATEWAY:
        volume_id = request.path_params.get("volume_id")
        if volume_id is not None:
            check_volume(request, principal, volume_id)
        for snapshot_id in (
            request.path_params.get("snapshot_id"),
            request.query_params.get("first_snapshot_id"),
        ):
            if snapshot_id is not None:
                check_snapshot(request, principal, snapshot_id)
    return principal.account_id


def admin_principal(request: Request) -> Principal:
    """An API token's (or development mode's) principal; gateways get 403."""
    principal = current_principal(request)
    if principal.kind not in (Kind.TOKEN, Kind.DEV):
        raise ForbiddenError(
            "admin calls need an API token (Authorization: Bearer TOKEN); gateway "
            "credentials cannot make them"
        )
    return principal


def operator_principal(request: Request) -> Principal:
    """An API token of the provider's operator account."""
    principal = admin_principal(request)
    if not principal.operator:
        raise ForbiddenError(
            "only the operator account (made by `sgw provider init`) may manage accounts"
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAccount = Annotated[str, Depends(current_account)]
AdminPrincipal = Annotated[Principal, Depends(admin_principal)]
OperatorPrincipal = Annotated[Principal, Depends(operator_principal)]


# What a gateway may touch (a token may touch its whole account)


def _gateways(request: Request) -> Gateways:
    gateways: Gateways = request.app.state.gateways
    return gateways


def check_volume(request: Request, principal: Principal, volume_id: str) -> None:
    """NotFoundError unless the principal is no gateway or the volume is bound to it."""
    if principal.gateway_id is None:
        return
    if not _gateways(request).owns_volume(principal.gateway_id, volume_id):
        raise NotFoundError(f"volume {volume_id} not found for gateway {principal.gateway_id}")


def check_snapshot(request: Request, principal: Principal, snapshot_id: str) -> None:
    """NotFoundError unless the principal is no gateway or may use the snapshot."""
    if principal.gateway_id is None:
        return
    if not _gateways(request).owns_snapshot(principal.gateway_id, snapshot_id):
        raise NotFoundError(f"snapshot {snapshot_id} not found for gateway {principal.gateway_id}")


def volume_gateway(
    request: Request, principal: Principal, gateway_id: str | None, from_snapshot_id: str | None
) -> str | None:
    """The gateway a new volume is bound to: a gateway's own volumes are bound to it (it
    may name no other gateway nor use another's snapshot); an admin chooses."""
    if from_snapshot_id is not None:
        check_snapshot(request, principal, from_snapshot_id)
    if principal.gateway_id is None:
        return gateway_id
    if gateway_id is not None and gateway_id != principal.gateway_id:
        raise NotFoundError(f"gateway {gateway_id} not found for gateway {principal.gateway_id}")
    return principal.gateway_id


def record_snapshot(request: Request, principal: Principal, snapshot_id: str) -> None:
    """Remembers that a gateway started the snapshot (it keeps it after its volume goes)."""
    if principal.gateway_id is not None:
        _gateways(request).claim_snapshot(principal.gateway_id, snapshot_id)


def ensure_account(sessions: sessionmaker[Session], account_id: str, name: str) -> None:
    """Creates the account unless it exists (several providers may start at once)."""
    with sessions() as s:
        if s.get(Account, account_id) is not None:
            return
    try:
        with sessions.begin() as s:
            s.add(Account(id=account_id, name=name))
    except IntegrityError as e:
        with sessions() as s:
            if s.get(Account, account_id) is not None:
                return  # another process created it first
        raise DatabaseError(
            f"cannot create account {account_id!r}: another account is named {name!r}; "
            "rename that account"
        ) from e
    LOG.info("account created", extra={"account": account_id})
