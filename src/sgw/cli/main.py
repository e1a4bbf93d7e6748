"""The ``sgw`` command: one sub-command group per area."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn

from sgw import __version__
from sgw.cli import admin
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
        metavar="NAME:SIZE[:MODE]",
        action="append",
        help="a volume, e.g. vol0:10G (stored) or vol1:10G:cached (repeatable)",
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
    serve.add_argument("--provider-ca", metavar="FILE", help="pin the provider's CA (PEM)")
    serve.add_argument(
        "--activation-listen", metavar="HOST:PORT", help="serve the activation page there"
    )
    admin.add_activation_key(gcmds)

    status = gcmds.add_parser(
        "status",
        help="show the running gateway's volumes, write log and snapshots",
        description="Ask the running gateway (through its admin socket) for its state.",
    )
    status.add_argument("--data-dir", metavar="DIR", default="/var/lib/sgw")
    status.add_argument("--output", choices=("table", "json"), default="table")
    snap = gcmds.add_parser(
        "snapshot",
        help="snapshot a volume as of now",
        description="Snapshot a volume of the running gateway: the snapshot holds every "
        "write acknowledged before the command and none after it; the provider keeps it.",
    )
    snap.add_argument("volume", metavar="VOLUME")
    snap.add_argument("--description", metavar="TEXT")
    snap.add_argument(
        "--wait", action="store_true", help="return once the provider holds the snapshot"
    )
    snap.add_argument("--data-dir", metavar="DIR", default="/var/lib/sgw")
    snap.add_argument("--output", choices=("table", "json"), default="table")

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
    pserve.add_argument(
        "--insecure-http",
        action="store_true",
        help="development only: plain HTTP beyond loopback even with TLS files",
    )
    pserve.add_argument(
        "--advertise-url",
        metavar="URL",
        help="where the other control servers reach this one (default: the --listen address)",
    )
    admin.add_provider_init(pcmds)
    pserve.add_argument("--log-level", metavar="LEVEL", default="info", help="log level")
    pgc = pcmds.add_parser(
        "gc",
        help="delete chunk objects no volume or snapshot references",
        description=(
            "One garbage collection pass over the provider's object store; safe while the "
            "provider serves. Prints a one-line summary."
        ),
    )
    pgc.add_argument("--data-dir", metavar="DIR", help="the provider's state directory")
    pgc.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)")
    pgc.add_argument("--store", metavar="URL", help="object store: file:///dir or s3://bucket")
    pgc.add_argument(
        "--grace",
        metavar="SECONDS",
        type=float,
        help="keep unreferenced objects younger than this (default: 86400, one day)",
    )
    pgc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    pgc.add_argument("--log-level", metavar="LEVEL", default="warning", help="log level")
    admin.register(areas)
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
        if args.area == "gateway" and args.command == "serve":
            return _gateway_serve(args)
        if args.area == "gateway" and args.command in ("status", "snapshot"):
            return _gateway_admin(args)
        if args.area == "provider" and args.command == "serve":
            return _provider_serve(args)
        if args.area == "provider" and args.command == "gc":
            return _provider_gc(args)
    except ConfigError as exc:
        print(f"sgw: error: {exc}", file=sys.stderr)
        return 2
    except admin.ApiError as exc:
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
        provider_ca=args.provider_ca,
        activation_listen=args.activation_listen,
    )
    setup_logging(config.log_level)
    import uvloop

    return int(uvloop.run(serve(config)))


def _gateway_admin(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from sgw.gateway import admin_socket

    path = admin_socket.socket_path(args.data_dir)
    if args.command == "status":
        request: dict[str, object] = {"op": "status"}
    else:
        request = {
            "op": "snapshot",
            "volume": args.volume,
            "description": args.description,
            "wait": args.wait,
        }
    answer = asyncio.run(admin_socket.call(path, request))
    answer.pop("ok", None)
    if args.output == "json":
        print(json.dumps(answer, indent=2))
    elif args.command == "status":
        for vol in answer["volumes"]:
            reason = f" ({vol['reason']})" if vol.get("reason") else ""
            print(f"{vol['name']:16} {vol['mode']:7} {vol['size']:>16} {vol['status']}{reason}")
        log = answer["write_log"]
        print(f"write log: {log['used']} of {log['size']} bytes used")
    else:
        print(f"{answer['snapshot_id']} {answer['state']}")
    if args.command == "snapshot" and answer.get("state") == "FAILED":
        print(f"sgw: error: snapshot failed: {answer.get('error')}", file=sys.stderr)
        return 1
    return 0


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
        insecure_http=args.insecure_http,
        advertise_url=args.advertise_url,
    )
    setup_logging(args.log_level)
    return serve(config)


def _provider_gc(args: argparse.Namespace) -> int:
    import os

    from sgw.common.logs import setup_logging
    from sgw.provider import config as pcfg
    from sgw.provider.blockstore import gc
    from sgw.provider.blockstore.maps import ChunkMaps
    from sgw.provider.blockstore.objects import open_store
    from sgw.provider.db import schema

    config = pcfg.load(args.data_dir, db_url=args.db, store_url=args.store)
    if not os.path.isdir(config.data_dir):
        raise ConfigError(
            f"--data-dir {config.data_dir} does not exist: give the provider's state directory"
        )
    grace = gc.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace
    if grace < 0:
        raise ConfigError(f"--grace {args.grace}: give 0 or more seconds")
    setup_logging(args.log_level)
    schema.upgrade(config.db_url)
    engine = schema.make_engine(config.db_url)
    try:
        maps = ChunkMaps(schema.session_factory(engine))
        report = gc.collect(
            maps, open_store(config.store_url), grace_seconds=grace, dry_run=args.dry_run
        )
    finally:
        engine.dispose()
    print(report.summary())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
