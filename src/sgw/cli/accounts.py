"""``sgw accounts``: your own account, and every account for the operator."""

from __future__ import annotations

import argparse
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.options import group
from sgw.cli.output import emit, warn_token_shown_once


def register(areas: Any) -> None:
    command = group(areas, "accounts", "accounts (operator) and your own account")
    command("show", "show the account of your token", _show)
    command("list", "list every account (operator only)", _list)
    command(
        "create", "create an account and its first token (operator only)", _create
    ).add_argument("name")


def _show(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.get_account())
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_accounts(), ["id", "name", "operator", "created"])
    return 0


def _create(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        new = client.create_account(args.name)
    emit(args, {**new["account"], "token": new["token"]["token"]})
    warn_token_shown_once(args)
    return 0
