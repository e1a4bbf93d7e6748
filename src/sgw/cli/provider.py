"""``sgw provider``: the provider side on its own machine: ``init`` (database, operator
account, TLS files), ``serve`` (the HTTP API), ``releases-init`` (the release keys' online
part), ``gc`` (one garbage collection pass) and ``migrate-object-names`` (renames objects
stored under plaintext hashes)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from sgw.common.errors import ConfigError


def register(areas: Any) -> None:
    """Adds ``sgw provider`` and its commands to the ``sgw`` parser's sub-commands."""
    provider = areas.add_parser("provider", help="the provider side (block service, API)")
    pcmds = provider.add_subparsers(dest="command", required=True, parser_class=type(provider))
    serve = pcmds.add_parser(
        "serve",
        help="run the provider's HTTP API",
        description="Run the provider: block service over HTTP (loopback by default).",
    )
    serve.add_argument("--data-dir", metavar="DIR", help="state directory (database, objects)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address (127.0.0.1:8480)")
    serve.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)")
    serve.add_argument(
        "--store", metavar="URL", help="object store: file:///dir or s3://bucket/prefix"
    )
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="development only: no authentication, every request acts for account 'dev'",
    )
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        help="development only: plain HTTP beyond loopback even with TLS files",
    )
    serve.add_argument(
        "--refuse-legacy-signatures",
        action="store_true",
        help="refuse the old SGW1-Ed25519 request signatures (gateways before 0.2); "
        "accept only HTTP Message Signatures (RFC 9421)",
    )
    serve.add_argument(
        "--advertise-url",
        metavar="URL",
        help="where the other control servers reach this one (default: the --listen address)",
    )
    for kind, default, what in (
        ("raw", 2, "raw health samples"),
        ("hourly", 31, "hourly health aggregates"),
        ("daily", 396, "daily health aggregates"),
        ("events", 396, "health events"),
    ):
        serve.add_argument(
            f"--health-{kind}-days",
            type=float,
            metavar="DAYS",
            help=f"keep {what} this long (default {default}; docs/health.md)",
        )
    serve.add_argument("--log-level", metavar="LEVEL", default="info", help="log level")
    serve.set_defaults(handler=_serve)

    init = pcmds.add_parser(
        "init",
        help="create the database, the operator account, its first token and TLS files",
        description=(
            "Initialise a provider: database schema, master key, the operator account and "
            "its first API token (printed once), a CA and server certificate in DIR/tls."
        ),
    )
    init.add_argument("--data-dir", metavar="DIR", help="state directory (database, objects)")
    init.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)")
    init.add_argument("--account", default="admin", help="the operator account's name")
    init.add_argument(
        "--tls-name",
        metavar="NAME",
        action="append",
        default=[],
        help="a DNS name or IP address gateways reach the provider by (repeatable)",
    )
    init.add_argument("--no-tls", action="store_true", help="make no CA or certificate")
    init.add_argument("--output", choices=("table", "json"), default="table")
    init.set_defaults(handler=_init)

    rinit = pcmds.add_parser(
        "releases-init",
        help="install the release signing keys' online part (from `sgw releases keys init`)",
        description=(
            "Copy root.json and the online keys (targets, snapshot, timestamp) from DIR "
            "into the provider's data directory, never the root key; the provider then "
            "signs and serves releases (docs/updates.md). Run it again with a new root.json "
            "to rotate keys."
        ),
    )
    rinit.add_argument("--data-dir", metavar="DIR", help="the provider's state directory")
    rinit.add_argument("--keys", metavar="DIR", required=True, help="from `sgw releases keys init`")
    rinit.set_defaults(handler=_releases_init)

    gc = pcmds.add_parser(
        "gc",
        help="delete chunk objects no volume or snapshot references",
        description=(
            "One garbage collection pass over the provider's object store; safe while the "
            "provider serves. Prints a one-line summary."
        ),
    )
    gc.add_argument("--data-dir", metavar="DIR", help="the provider's state directory")
    gc.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default: SQLite in DIR)")
    gc.add_argument("--store", metavar="URL", help="object store: file:///dir or s3://bucket")
    gc.add_argument(
        "--grace",
        metavar="SECONDS",
        type=float,
        help="keep unreferenced objects younger than this (default: 86400, one day)",
    )
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc.add_argument("--log-level", metavar="LEVEL", default="warning", help="log level")
    gc.set_defaults(handler=_gc)

    names = pcmds.add_parser(
        "migrate-object-names",
        help="rename chunk objects and pack indexes stored under plaintext hashes",
        description=(
            "Rename what a store written before keyed object names holds under chunk ids "
            "(the plaintext's SHA-256) to keyed names, so a bucket listing reveals no "
            "content; safe while the provider serves, to interrupt and to run again. Run it "
            "once every provider server runs this version. Prints a one-line summary."
        ),
    )
    names.add_argument("--data-dir", metavar="DIR", help="the provider's state directory")
    names.add_argument("--store", metavar="URL", help="object store: file:///dir or s3://bucket")
    names.add_argument("--dry-run", action="store_true", help="report, change nothing")
    names.add_argument("--log-level", metavar="LEVEL", default="warning", help="log level")
    names.set_defaults(handler=_migrate_object_names)


def _serve(args: argparse.Namespace) -> int:
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
        accept_legacy_signatures=not args.refuse_legacy_signatures,
        health_days=(
            args.health_raw_days,
            args.health_hourly_days,
            args.health_events_days,
            args.health_daily_days,
        ),
    )
    setup_logging(args.log_level)
    return serve(config)


def _init(args: argparse.Namespace) -> int:
    from sgw.provider import config as pcfg
    from sgw.provider.bootstrap import initialize

    config = pcfg.load(args.data_dir, db_url=args.db)
    result = initialize(config, args.account, tls_names=args.tls_name, tls=not args.no_tls)
    doc = {
        "account_id": result.account.id,
        "account": result.account.name,
        "token": result.token,
        "ca_certificate": result.tls.ca_cert if result.tls else None,
    }
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Provider initialised in {config.data_dir}.")
    print(f"Operator account: {result.account.name} ({result.account.id})")
    print(f"API token (shown only now, store it safely): {result.token}")
    if result.tls:
        print(f"CA certificate for gateways and the CLI: {result.tls.ca_cert}")
    print("Next: sgw provider serve --data-dir ... ; export SGW_ENDPOINT=... SGW_TOKEN=...")
    return 0


def _releases_init(args: argparse.Namespace) -> int:
    from sgw.provider import config as pcfg
    from sgw.provider.releases.keys import install_online_keys

    config = pcfg.load(args.data_dir)
    fingerprint = install_online_keys(args.keys, config.data_dir)
    print(
        f"Release keys installed in {config.data_dir}/releases (the root key stays in {args.keys})."
    )
    print(f"Root fingerprint (gateways show it at activation): {fingerprint}")
    print("Restart `sgw provider serve` to serve releases.")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from sgw.common.logs import setup_logging
    from sgw.provider import config as pcfg
    from sgw.provider.blockstore import gc
    from sgw.provider.blockstore.keys import open_keyring
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
    keys = open_keyring(config.data_dir, may_create=False)  # names the referenced objects
    schema.upgrade(config.db_url)
    engine = schema.make_engine(config.db_url)
    try:
        maps = ChunkMaps(schema.session_factory(engine))
        report = gc.collect(
            maps, open_store(config.store_url), keys, grace_seconds=grace, dry_run=args.dry_run
        )
    finally:
        engine.dispose()
    print(report.summary())
    return 1 if report.errors else 0


def _migrate_object_names(args: argparse.Namespace) -> int:
    from sgw.common.logs import setup_logging
    from sgw.provider import config as pcfg
    from sgw.provider.blockstore.keys import open_keyring
    from sgw.provider.blockstore.object_names import migrate_object_names
    from sgw.provider.blockstore.objects import open_store

    config = pcfg.load(args.data_dir, store_url=args.store)
    if not os.path.isdir(config.data_dir):
        raise ConfigError(
            f"--data-dir {config.data_dir} does not exist: give the provider's state directory"
        )
    setup_logging(args.log_level)
    keys = open_keyring(config.data_dir, may_create=False)
    report = migrate_object_names(open_store(config.store_url), keys, dry_run=args.dry_run)
    print(report.summary())
    return 1 if report.left else 0
