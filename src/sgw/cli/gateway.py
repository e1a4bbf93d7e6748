"""``sgw gateway``: the gateway daemon on the appliance (``serve``), its activation key,
and ``status`` and ``snapshot`` of the running daemon through its local admin socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from typing import Any

from sgw.common.errors import ConfigError


def register(areas: Any) -> None:
    """Adds ``sgw gateway`` and its commands to the ``sgw`` parser's sub-commands."""
    gateway = areas.add_parser("gateway", help="the gateway daemon on the appliance")
    gcmds = gateway.add_subparsers(dest="command", required=True, parser_class=type(gateway))
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
    # The successor's end of the blue-green swap's socket (set by the running daemon).
    serve.add_argument("--standby-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(handler=_serve)

    upgrade = gcmds.add_parser(
        "upgrade",
        help="swap the running daemon for another release, without failing any I/O",
        description=(
            "Start the release's daemon beside the running one and hand it every "
            "connection (blue-green swap); initiators see a pause, not an error. A release "
            "slot (ROOT/releases/VERSION) becomes ROOT/current once its daemon serves."
        ),
    )
    upgrade.add_argument(
        "--to",
        required=True,
        metavar="DIR",
        help="the release directory (with bin/sgw), e.g. /opt/sgw/releases/VERSION",
    )
    upgrade.add_argument("--data-dir", metavar="DIR", default="/var/lib/sgw")
    upgrade.add_argument("--output", choices=("table", "json"), default="table")
    upgrade.set_defaults(handler=_upgrade)

    key = gcmds.add_parser(
        "activation-key",
        help="print a new one-time activation key of this gateway",
        description="Print a new activation key (valid 30 minutes, once) for `sgw activate`.",
    )
    key.add_argument("--config", metavar="FILE", help="the gateway's TOML configuration")
    key.add_argument("--data-dir", metavar="DIR", help="the gateway's state directory")
    key.add_argument("--region", default="", help="activation region to bind the key to")
    key.set_defaults(handler=_activation_key)

    code = gcmds.add_parser(
        "activation-code",
        help="print this gateway's activation confirmation code (for `sgw activate --code`)",
        description="Print the confirmation code that `sgw activate` must be given with this "
        "gateway's keys. It is shown on the appliance's console and is never served over "
        "the network: whoever activates the gateway must have seen it there.",
    )
    code.add_argument("--config", metavar="FILE", help="the gateway's TOML configuration")
    code.add_argument("--data-dir", metavar="DIR", help="the gateway's state directory")
    code.add_argument(
        "--issue",
        action="store_true",
        help="print it as a login-prompt banner (for /etc/issue.d)",
    )
    code.set_defaults(handler=_activation_code)

    status = gcmds.add_parser(
        "status",
        help="show the running gateway's volumes, write log and snapshots",
        description="Ask the running gateway (through its admin socket) for its state.",
    )
    status.add_argument("--data-dir", metavar="DIR", default="/var/lib/sgw")
    status.add_argument("--output", choices=("table", "json"), default="table")
    status.set_defaults(handler=_admin_socket)
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
    snap.set_defaults(handler=_admin_socket)


def _serve_args(args: argparse.Namespace) -> list[str]:
    """The ``sgw gateway serve`` arguments this daemon was started with (for the release
    that takes over from it)."""
    out: list[str] = []
    for flag, value in (
        ("--config", args.config),
        ("--data-dir", args.data_dir),
        ("--log-size", args.log_size),
        ("--log-level", args.log_level),
        ("--provider", args.provider),
        ("--provider-ca", args.provider_ca),
        ("--activation-listen", args.activation_listen),
    ):
        if value is not None:
            out += [flag, os.path.abspath(value) if flag in ("--config", "--data-dir") else value]
    for flag, values in (("--volume", args.volume), ("--nbd", args.nbd)):
        for value in values or ():
            out += [flag, value]
    return out


def _serve(args: argparse.Namespace) -> int:
    from sgw.common.logs import setup_logging
    from sgw.gateway import config as cfg
    from sgw.gateway.service import serve

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

    return int(uvloop.run(serve(config, _serve_args(args), args.standby_fd)))


def _upgrade(args: argparse.Namespace) -> int:
    """``sgw gateway upgrade --to DIR``: the running daemon swaps itself for the release."""
    import asyncio

    from sgw.gateway import admin_socket

    release = os.path.abspath(args.to)
    path = admin_socket.socket_path(args.data_dir)
    answer = asyncio.run(admin_socket.call(path, {"op": "upgrade", "release": release}))
    answer.pop("ok", None)
    if args.output == "json":
        print(json.dumps(answer, indent=2))
    else:
        pause = answer.get("pause_s")
        shown = "unknown" if pause is None else f"{pause * 1000:.1f} ms"
        print(f"swapped to sgw {answer.get('version')} (pid {answer.get('pid')}); pause {shown}")
        current = answer.get("current") or {}
        if current.get("switched"):
            print(f"{current['link']} -> {current['release']} (was {current['previous']})")
        else:
            print(f"release slots unchanged: {current.get('reason')}")
    return 0


def _data_dir(args: argparse.Namespace) -> str:
    data_dir = args.data_dir
    if not data_dir and args.config:
        with open(args.config, "rb") as f:
            data_dir = tomllib.load(f).get("data_dir")
    if not data_dir:
        raise ConfigError("no data directory: pass --data-dir DIR or --config FILE")
    return os.path.abspath(str(data_dir))


def _activation_key(args: argparse.Namespace) -> int:
    from sgw.common import activation_key
    from sgw.gateway.link.identity import load_or_create_code, load_or_create_key, read_credentials

    data_dir = _data_dir(args)
    credentials = read_credentials(data_dir)
    if credentials is not None:
        raise ConfigError(
            f"this gateway is activated already (gateway {credentials.gateway_id}, "
            f"{credentials.name!r}); it hands out no more activation keys"
        )
    key = load_or_create_key(data_dir)
    code = load_or_create_code(data_dir)
    print(activation_key.mint(key, time.time(), args.region, code=code))
    return 0


def _activation_code(args: argparse.Namespace) -> int:
    from sgw.common.activation_key import show_code
    from sgw.gateway.link.identity import load_or_create_code, read_credentials

    data_dir = _data_dir(args)
    credentials = read_credentials(data_dir)
    code = show_code(load_or_create_code(data_dir))
    if not args.issue:
        print(code)
    elif credentials is None:
        print(f"sgw gateway: not activated. Activation confirmation code: {code}")
        print("Give it to `sgw activate --code` (or the console's activation page).\n")
    else:
        print(f"sgw gateway: activated as {credentials.name!r} ({credentials.gateway_id}).\n")
    return 0


def _admin_socket(args: argparse.Namespace) -> int:
    """``status`` and ``snapshot``: one request to the running daemon's admin socket."""
    import asyncio

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
        daemon = answer.get("daemon")
        if daemon:
            line = f"daemon: pid {daemon['pid']}, version {daemon['version']}"
            swap = daemon.get("took_over")
            if swap:
                line += (
                    f", took over from pid {swap['from_pid']} ({swap['from_version']}), "
                    f"pause {swap['pause_s'] * 1000:.1f} ms"
                )
            print(line)
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
