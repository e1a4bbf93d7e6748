"""The ``sgw`` command: the root parser, dispatch to the command's handler, and one line
with an exit status for every error a user can cause.

Each command group is a module of ``sgw.cli``: ``gateway`` and ``provider`` (the daemons
and their local tools), then the admin groups over the provider's management API
(``gateways`` with ``activate``, ``accounts``, ``tokens``, ``volumes``, ``snapshots``,
``updates``, ``health``),
which share ``client`` (the typed API client), ``config``, ``options``, ``output`` and
``gateway_commands``; their exit statuses are in ``errors``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn

from sgw import __version__
from sgw.cli import (
    accounts,
    gateway,
    gateways,
    health,
    provider,
    releases,
    snapshots,
    tokens,
    updates,
    volumes,
)
from sgw.cli.client import ApiError
from sgw.cli.errors import CommandError, exit_status
from sgw.common.errors import ConfigError, SgwError


class _Parser(argparse.ArgumentParser):
    """Reports a wrong flag in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgw", description="Storage gateway appliance.")
    parser.add_argument("--version", action="version", version=f"sgw {__version__}")
    areas = parser.add_subparsers(dest="area", required=True, parser_class=_Parser)

    gateway.register(areas)
    provider.register(areas)
    gateways.register_activate(areas)
    accounts.register(areas)
    tokens.register(areas)
    gateways.register(areas)
    volumes.register(areas)
    snapshots.register(areas)
    releases.register(areas)
    updates.register(areas)
    health.register(areas)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sgw`` console script."""
    # botocore tries urllib3's pyOpenSSL support; an old pyOpenSSL (Debian's, seen through
    # a virtualenv with system site packages) then warns on stderr about newer
    # cryptography's DSA, in the middle of our one-line errors. We never use pyOpenSSL.
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"OpenSSL(\.|$)")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
    except ConfigError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except CommandError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except SgwError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path or address that cannot be used, found at start
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"sgw: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
