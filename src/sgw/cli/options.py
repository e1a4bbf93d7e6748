"""Parser pieces the admin groups share: the flags every admin command takes
(``--endpoint``, ``--insecure-http``, ``--output``), ``--timeout`` of commands a gateway
carries out, and a command group (``sgw GROUP COMMAND``) whose commands each name their handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sgw.cli.config import INSECURE_HTTP_ENV
from sgw.cli.gateway_commands import COMMAND_TIMEOUT_S

Handler = Callable[[argparse.Namespace], int]
# Adds one command to a group: (name, help, handler) -> its parser.
AddCommand = Callable[[str, str, Handler], argparse.ArgumentParser]


def common_flags() -> argparse.ArgumentParser:
    """A parent parser with ``--endpoint``, ``--insecure-http`` and ``--output``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--endpoint", metavar="URL", help="provider URL (or SGW_ENDPOINT)")
    parent.add_argument(
        "--insecure-http",
        action="store_true",
        help=(
            "development networks only: send the API token over plain http:// to another "
            f"machine (or {INSECURE_HTTP_ENV}=1)"
        ),
    )
    parent.add_argument(
        "--output", choices=("table", "json"), default="table", help="table (default) or json"
    )
    return parent


def group(areas: Any, name: str, helptext: str) -> AddCommand:
    """Adds ``sgw NAME`` to the ``sgw`` parser's sub-commands; returns what adds its
    commands (each with the common flags)."""
    common = common_flags()
    parser = areas.add_parser(name, help=helptext, description=helptext)
    subs = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))

    def command(cname: str, chelp: str, handler: Handler) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subs.add_parser(
            cname, parents=[common], help=chelp, description=chelp
        )
        sub.set_defaults(handler=handler)
        return sub

    return command


def add_timeout(parser: argparse.ArgumentParser, default: float = COMMAND_TIMEOUT_S) -> None:
    """``--timeout``: how long a command waits for the gateway to carry it out."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"how long to wait for the gateway (default {default:.0f})",
    )
