"""Who a request acts for.

Until the management plane adds API tokens and signed gateway requests (DESIGN.md
section 4), the provider serves the API only in development mode (``--insecure-dev``),
where every request acts for the built-in account ``dev``; otherwise every call that
needs an account is refused with 401. Routes get the account through ``CurrentAccount``,
so no route can forget to ask.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import DatabaseError, UnauthenticatedError
from sgw.provider.db.models import Account

LOG = logging.getLogger(__name__)

DEV_ACCOUNT_ID = "dev"
DEV_ACCOUNT_NAME = "dev"


def current_account(request: Request) -> str:
    """The id of the account the request acts for; UnauthenticatedError if none."""
    if not request.app.state.config.insecure_dev:
        raise UnauthenticatedError(
            "this provider accepts no credentials yet: authentication arrives with the "
            "management plane; on a development machine start it with "
            "`sgw provider serve --insecure-dev`"
        )
    return DEV_ACCOUNT_ID


CurrentAccount = Annotated[str, Depends(current_account)]


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
