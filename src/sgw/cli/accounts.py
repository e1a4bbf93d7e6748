"""``sgw accounts``: your own account, and every account for the operator."""

from __future__ import annotations

import argparse
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.options import group
from sgw.cli.output import emit, warn_token_shown_once
from sgw.common.errors import ConfigError

# What `sgw accounts list` shows; a quota of null is unlimited (the rate: the default).
_COLUMNS = ("id", "name", "operator", "created", "quota_volumes", "quota_bytes", "quota_rate")
# The defaults, as the provider documents them (docs/provider.md, "Quotas").
DEFAULT_RATE = 1000.0
MIN_RATE = 1.0


def register(areas: Any) -> None:
    command = group(areas, "accounts", "accounts (operator) and your own account")
    command("show", "show the account of your token", _show)
    command("list", "list every account (operator only)", _list)
    command(
        "create", "create an account and its first token (operator only)", _create
    ).add_argument("name")
    quota = command("quota-set", "set an account's quotas (operator only)", _quota_set)
    quota.add_argument("account", metavar="ACCOUNT", help="the account's id or name")
    quota.add_argument("--volumes", metavar="N", help="most volumes (`unlimited` lifts the quota)")
    quota.add_argument(
        "--bytes",
        metavar="SIZE",
        help="most provisioned bytes, the sum of volume sizes (10T; `unlimited` lifts it)",
    )
    quota.add_argument(
        "--rate",
        metavar="N",
        help=f"most requests per second per provider process (at least {MIN_RATE:g}; "
        f"`default` for {DEFAULT_RATE:g})",
    )


def _show(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.get_account())
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_accounts(), [*_COLUMNS])
    return 0


def _create(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        new = client.create_account(args.name)
    emit(args, {**new["account"], "token": new["token"]["token"]})
    warn_token_shown_once(args)
    return 0


def _quota_set(args: argparse.Namespace) -> int:
    from sgw.gateway.config import parse_size

    quotas: dict[str, int | float | None] = {}
    if args.volumes is not None:
        quotas["volumes"] = None if args.volumes == "unlimited" else _count(args.volumes)
    if args.bytes is not None:
        quotas["bytes"] = None if args.bytes == "unlimited" else parse_size(args.bytes, "--bytes")
    if args.rate is not None:
        quotas["rate"] = None if args.rate == "default" else _rate(args.rate)
    if not quotas:
        raise ConfigError("give at least one of --volumes, --bytes and --rate")
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        account = args.account
        accounts = client.list_accounts()
        if not any(a["id"] == account for a in accounts):
            named = [a["id"] for a in accounts if a["name"] == account]
            if not named:
                raise ConfigError(
                    f"no account has the id or name {account!r}; see `sgw accounts list`"
                )
            account = named[0]
        emit(args, client.set_quotas(account, quotas))
    return 0


def _count(text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"--volumes {text!r}: give a whole number, or `unlimited`")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not MIN_RATE <= value < float("inf"):
        raise ConfigError(
            f"--rate {text!r}: give requests per second, at least {MIN_RATE:g}, or `default`"
        )
    return value
