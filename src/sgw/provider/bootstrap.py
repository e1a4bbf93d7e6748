"""``sgw provider init``: a new provider's database, operator account, first token and TLS.

Run once per provider (several provider processes then share the database, the master
key and the TLS directory). It refuses to run on a database that holds accounts already,
so a second run cannot mint a token nobody asked for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sgw.common.errors import ConfigError
from sgw.provider.auth.tls import TlsFiles
from sgw.provider.auth.tls import create as create_tls
from sgw.provider.blockstore.keys import open_keyring
from sgw.provider.config import ProviderConfig
from sgw.provider.control.peers import load_or_create_secret
from sgw.provider.db import schema
from sgw.provider.management.accounts import AccountInfo, Accounts

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitResult:
    account: AccountInfo
    token: str
    tls: TlsFiles | None


def initialize(
    config: ProviderConfig, account_name: str, *, tls_names: list[str], tls: bool = True
) -> InitResult:
    """Creates (or upgrades) the database, the master key, the operator account with one
    token and, with ``tls``, the CA and server certificate."""
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    schema.upgrade(config.db_url)
    open_keyring(config.data_dir, may_create=True)
    load_or_create_secret(config.data_dir)  # control servers' shared secret (0600)
    engine = schema.make_engine(config.db_url)
    try:
        accounts = Accounts(schema.session_factory(engine))
        if accounts.has_operator():
            raise ConfigError(
                f"the provider database {engine.url.render_as_string(hide_password=True)} "
                "is initialized already; make more tokens with `sgw tokens create`"
            )
        account = accounts.create_account(account_name, operator=True)
        _record, token = accounts.create_token(account.id, "initial")
    finally:
        engine.dispose()
    files = create_tls(config.data_dir, tls_names) if tls else None
    LOG.info("provider initialized", extra={"account": account.id, "tls": files is not None})
    return InitResult(account, token, files)
