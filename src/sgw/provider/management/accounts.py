"""Accounts and their admin API tokens.

A token is ``sgw_`` + 43 base64url characters (256 random bits). Only its SHA-256 is
stored: it is shown once, when made, and a database leak reveals no usable token.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError, NameTakenError, NotFoundError
from sgw.provider.auth.rates import MIN_RATE
from sgw.provider.db.models import NAME_MAX, Account, ApiToken, utcnow

LOG = logging.getLogger(__name__)

TOKEN_PREFIX = "sgw_"
# A token's last-use time is written at most this often (seconds): it is for humans
# auditing tokens, not worth a database write per request.
LAST_USED_EVERY_S = 60.0
# Quota fields of the API -> the account's columns.
_QUOTA_FIELDS = {"volumes": "quota_volumes", "bytes": "quota_bytes", "rate": "quota_rate"}
# The largest quota value: what a 64-bit column holds.
_QUOTA_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Quotas:
    """An account's quotas (docs/provider.md, "Quotas"): most volumes, most provisioned
    bytes (sum of volume sizes), most requests per second per provider process. None:
    unlimited volumes or bytes, the default rate."""

    volumes: int | None = None
    bytes: int | None = None
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class AccountInfo:
    id: str
    name: str
    operator: bool
    created: datetime
    quotas: Quotas = Quotas()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    account_id: str
    name: str
    created: datetime
    last_used: datetime | None


def token_hash(token: str) -> str:
    """What is stored of a token: its SHA-256 in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _check_name(name: str, what: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        raise BadRequestError(
            f"{what} name {name[:80]!r}: give 1 to {NAME_MAX} printable characters"
        )
    return name


class Accounts:
    """The account and token repository."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        # Counts revocations in this process: a cache of tokens (sgw.provider.api.auth)
        # that sees it change forgets what it holds.
        self.revocations = 0

    def create_account(self, name: str, *, operator: bool = False) -> AccountInfo:
        name = _check_name(name, "account")
        account = Account(id=str(uuid.uuid4()), name=name, operator=operator, created=utcnow())
        try:
            with self._sessions.begin() as s:
                if s.scalar(select(Account.id).where(Account.name == name)) is not None:
                    raise NameTakenError(f"an account named {name!r} exists; pick another name")
                s.add(account)
        except IntegrityError as e:
            raise NameTakenError(f"an account named {name!r} exists; pick another name") from e
        LOG.info("account created", extra={"account": account.id, "operator": operator})
        return _account(account)

    def get_account(self, account_id: str) -> AccountInfo:
        with self._sessions() as s:
            account = s.get(Account, account_id)
            if account is None:
                raise NotFoundError(f"account {account_id} not found")
            return _account(account)

    def list_accounts(self) -> list[AccountInfo]:
        with self._sessions() as s:
            return [_account(a) for a in s.scalars(select(Account).order_by(Account.created))]

    def set_quotas(self, account_id: str, changes: Mapping[str, int | float | None]) -> AccountInfo:
        """Sets the quotas named in ``changes`` (``volumes``, ``bytes``, ``rate``; None
        lifts one); the others stay. Quotas already exceeded refuse only new volumes."""
        for field, value in changes.items():
            if field not in _QUOTA_FIELDS:
                raise BadRequestError(f"unknown quota {field!r}: use volumes, bytes or rate")
            low = MIN_RATE if field == "rate" else 0
            if value is not None and not low <= value <= _QUOTA_MAX:
                raise BadRequestError(
                    f"{field} quota {value}: give {low:g} to {_QUOTA_MAX}, or null to lift it"
                )
        with self._sessions.begin() as s:
            account = s.get(Account, account_id, with_for_update=True)
            if account is None:
                raise NotFoundError(f"account {account_id} not found")
            for field, value in changes.items():
                setattr(account, _QUOTA_FIELDS[field], value)
            info = _account(account)
        LOG.info(
            "account quotas set",
            extra={"account": account_id, "quotas": {k: changes[k] for k in sorted(changes)}},
        )
        return info

    def rate_quotas(self) -> dict[str, float]:
        """The accounts whose request rate the operator set, with that rate."""
        with self._sessions() as s:
            rows = s.execute(
                select(Account.id, Account.quota_rate).where(Account.quota_rate.is_not(None))
            )
            return {account_id: float(rate) for account_id, rate in rows if rate is not None}

    def has_operator(self) -> bool:
        """True once ``sgw provider init`` made the operator account."""
        with self._sessions() as s:
            return s.scalar(select(Account.id).where(Account.operator.is_(True))) is not None

    def create_token(self, account_id: str, name: str) -> tuple[TokenInfo, str]:
        """A new token of the account: its record and the token itself (shown once)."""
        name = _check_name(name, "token")
        token = new_token()
        record = ApiToken(
            id=str(uuid.uuid4()),
            account_id=account_id,
            name=name,
            token_hash=token_hash(token),
            created=utcnow(),
        )
        with self._sessions.begin() as s:
            if s.get(Account, account_id) is None:
                raise NotFoundError(f"account {account_id} not found")
            s.add(record)
        LOG.info("api token created", extra={"account": account_id, "token_id": record.id})
        return _token(record), token

    def list_tokens(self, account_id: str) -> list[TokenInfo]:
        with self._sessions() as s:
            rows = s.scalars(
                select(ApiToken).where(ApiToken.account_id == account_id).order_by(ApiToken.created)
            )
            return [_token(t) for t in rows]

    def revoke_token(self, account_id: str, token_id: str) -> None:
        with self._sessions.begin() as s:
            token = s.get(ApiToken, token_id)
            if token is None or token.account_id != account_id:
                raise NotFoundError(f"token {token_id} not found in account {account_id}")
            s.delete(token)
        self.revocations += 1
        LOG.info("api token revoked", extra={"account": account_id, "token_id": token_id})

    def authenticate(self, token: str) -> tuple[TokenInfo, AccountInfo] | None:
        """The token's record and account, or None if no such token exists."""
        digest = token_hash(token)
        with self._sessions() as s:
            row = s.execute(
                select(ApiToken, Account)
                .join(Account, Account.id == ApiToken.account_id)
                .where(ApiToken.token_hash == digest)
            ).first()
            if row is None:
                return None
            record, account = row.tuple()
            info = _token(record), _account(account)
        self._touch(record.id)
        return info

    def _touch(self, token_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(token_id, -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
                return
            self._touched[token_id] = now
        with self._sessions.begin() as s:
            s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used=utcnow()))


def _account(a: Account) -> AccountInfo:
    quotas = Quotas(a.quota_volumes, a.quota_bytes, a.quota_rate)
    return AccountInfo(a.id, a.name, bool(a.operator), a.created, quotas)


def _token(t: ApiToken) -> TokenInfo:
    return TokenInfo(t.id, t.account_id, t.name, t.created, t.last_used)
