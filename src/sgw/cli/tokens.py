"""``sgw tokens``: the API tokens of your account."""

from __future__ import annotations

import argparse
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.options import group
from sgw.cli.output import done, emit, warn_token_shown_once


def register(areas: Any) -> None:
    command = group(areas, "tokens", "API tokens of your account")
    command("list", "list the account's tokens", _list)
    command("create", "create a token (shown once)", _create).add_argument(
        "--name", default="token"
    )
    command("revoke", "revoke a token at once", _revoke).add_argument("id")


def _list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_tokens(), ["id", "name", "created", "last_used"])
    return 0


def _create(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.create_token(args.name))
    warn_token_shown_once(args)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.revoke_token(args.id)
    done(args, f"token {args.id} revoked")
    return 0
