"""Routes of accounts and their API tokens (admin calls: an API token is required)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from sgw.provider.api.auth import AdminPrincipal, OperatorPrincipal
from sgw.provider.api.blocks import ErrorOut
from sgw.provider.auth.rates import DEFAULT_RATE, MIN_RATE, RateLimiter
from sgw.provider.management.accounts import AccountInfo, Accounts, TokenInfo


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers of an admin call: 401, 403 and ``statuses``."""
    return {status: {"model": ErrorOut} for status in (401, 403, *statuses)}


class AccountOut(BaseModel):
    id: str
    name: str
    operator: bool
    created: datetime
    quota_volumes: int | None = Field(description="most volumes; null: unlimited")
    quota_bytes: int | None = Field(
        description="most provisioned bytes (sum of volume sizes); null: unlimited"
    )
    quota_rate: float | None = Field(
        description=f"most requests per second per provider process; null: {DEFAULT_RATE:g}"
    )

    @classmethod
    def of(cls, a: AccountInfo) -> AccountOut:
        q = a.quotas
        return cls(
            id=a.id,
            name=a.name,
            operator=a.operator,
            created=a.created,
            quota_volumes=q.volumes,
            quota_bytes=q.bytes,
            quota_rate=q.rate,
        )


class QuotasIn(BaseModel):
    """Quotas to set; a field left out stays as it is, null lifts it."""

    model_config = ConfigDict(extra="forbid")

    volumes: int | None = Field(None, ge=0, description="most volumes; null: unlimited")
    bytes: int | None = Field(None, ge=0, description="most provisioned bytes; null: unlimited")
    rate: float | None = Field(
        None,
        ge=MIN_RATE,
        description="most requests per second per provider process; null: the default",
    )


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique, 1 to 255 characters")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("token", description="what the token is for, 1 to 255 characters")


class TokenOut(BaseModel):
    id: str
    name: str
    created: datetime
    last_used: datetime | None

    @classmethod
    def of(cls, t: TokenInfo) -> TokenOut:
        return cls(id=t.id, name=t.name, created=t.created, last_used=t.last_used)


class NewToken(TokenOut):
    token: str = Field(description="the secret token; shown only now, store it safely")


class NewAccount(BaseModel):
    account: AccountOut
    token: NewToken


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


Repo = Annotated[Accounts, Depends(_accounts)]
router = APIRouter(prefix="/v1", tags=["accounts"])


@router.get("/account", responses=errors())
def whoami(principal: AdminPrincipal, repo: Repo) -> AccountOut:
    """The account the token belongs to."""
    return AccountOut.of(repo.get_account(principal.account_id))


@router.get("/accounts", responses=errors())
def list_accounts(_principal: OperatorPrincipal, repo: Repo) -> list[AccountOut]:
    """Every account (operator only)."""
    return [AccountOut.of(a) for a in repo.list_accounts()]


@router.post("/accounts", status_code=201, responses=errors(400, 409, 422))
def create_account(body: AccountCreate, _principal: OperatorPrincipal, repo: Repo) -> NewAccount:
    """A new account and its first API token (operator only)."""
    account = repo.create_account(body.name)
    record, token = repo.create_token(account.id, "initial")
    new = NewToken(**TokenOut.of(record).model_dump(), token=token)
    return NewAccount(account=AccountOut.of(account), token=new)


@router.patch("/accounts/{account_id}/quotas", responses=errors(400, 404, 422))
def set_quotas(
    account_id: str, body: QuotasIn, _principal: OperatorPrincipal, repo: Repo, request: Request
) -> AccountOut:
    """Sets an account's quotas (operator only; docs/provider.md, "Quotas")."""
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    account = repo.set_quotas(account_id, changes)
    if "rate" in changes:  # this process at once; the others at their next refresh
        rates: RateLimiter = request.app.state.rates
        rates.set_rate(account_id, account.quotas.rate)
    return AccountOut.of(account)


@router.get("/tokens", responses=errors())
def list_tokens(principal: AdminPrincipal, repo: Repo) -> list[TokenOut]:
    """The account's API tokens (never the tokens themselves)."""
    return [TokenOut.of(t) for t in repo.list_tokens(principal.account_id)]


@router.post("/tokens", status_code=201, responses=errors(400, 422))
def create_token(
    principal: AdminPrincipal, repo: Repo, body: TokenCreate | None = None
) -> NewToken:
    """A new API token of the account; the token is in this answer only."""
    name = body.name if body is not None else "token"
    record, token = repo.create_token(principal.account_id, name)
    return NewToken(**TokenOut.of(record).model_dump(), token=token)


@router.delete("/tokens/{token_id}", status_code=204, responses=errors(404))
def revoke_token(token_id: str, principal: AdminPrincipal, repo: Repo) -> Response:
    """Revokes a token of the account at once."""
    repo.revoke_token(principal.account_id, token_id)
    return Response(status_code=204)
