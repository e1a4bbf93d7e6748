"""The ``sgw`` command: one sub-command group per area."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from sgw import __version__
from sgw.common.errors import ConfigError, SgwError


class _Parser(argparse.ArgumentParser):
    """Reports a wrong flag in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgw", description="Storage gateway appliance.")
    parser.add_argument("--version", action="version", version=f"sgw {__version__}")
    areas = parser.add_subparsers(dest="area", required=True, parser_class=_Parser)

    gateway = areas.add_parser("gateway", help="the gateway daemon on the appliance")
    gcmds = gateway.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = gcmds.add_parser(
        "serve",
        help="run the gateway daemon",
        description="Run the gateway: serve volumes over NBD from a durable write log.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument("--data-dir", metavar="DIR", help="state directory (log, volume disks)")
    serve.add_argument(
        "--volume",
        metavar="NAME:SIZE",
        action="append",
        help="a stored volume, e.g. vol0:10G (repeatable)",
    )
    serve.add_argument(
        "--nbd",
        metavar="ADDR",
        action="append",
        help="listen on unix:PATH or tcp:HOST:PORT (repeatable)",
    )
    serve.add_argument("--log-size", metavar="SIZE", help="write log size for a file (1G)")
    serve.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    serve.add_argument(
        "--provider",
        metavar="URL",
        help="upload to the provider's block API at URL (sets [remote] url)",
    )

    provider = areas.add_parser("provider", help="the provider side (block service, API)")
    pcmds = provider.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pserve = pcmds.add_parser(
        "serve",
        help="run the provider's HTTP API",
        description="Run the provider: block service over HTTP (loopback by default).",
    )
    pserve.add_argument("--data-dir", metavar="DIR", help="state directory (database, objects)")
    pserve.add_argument("--listen", metavar="HOST:PORT", help="address (127.0.0.1:8480)")
    pserve.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)")
    pserve.add_argument(
        "--store", metavar="URL", help="object store: file:///dir or s3://bucket/prefix"
    )
    pserve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="development only: no authentication, every request acts for account 'dev'",
    )
    pserve.add_argument("--log-level", metavar="LEVEL", default="info", help="log level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sgw`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.area == "gateway" and args.command == "serve":
            return _gateway_serve(args)
        if args.area == "provider" and args.command == "serve":
            return _provider_serve(args)
    except ConfigError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 2
    except SgwError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path or address that cannot be used, found at start
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"sgw: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return 2


def _gateway_serve(args: argparse.Namespace) -> int:
    from sgw.common.logs import setup_logging
    from sgw.gateway import config as cfg
    from sgw.gateway.daemon import serve

    config = cfg.load(
        args.config,
        data_dir=args.data_dir,
        volumes=args.volume,
        nbd=args.nbd,
        log_size=args.log_size,
        log_level=args.log_level,
        provider=args.provider,
    )
    setup_logging(config.log_level)
    import uvloop

    return int(uvloop.run(serve(config)))


def _provider_serve(args: argparse.Namespace) -> int:
    from sgw.common.logs import setup_logging
    from sgw.provider import config as pcfg
    from sgw.provider.server import serve

    config = pcfg.load(
        args.data_dir,
        listen=args.listen,
        db_url=args.db,
        store_url=args.store,
        insecure_dev=args.insecure_dev,
    )
    setup_logging(args.log_level)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
