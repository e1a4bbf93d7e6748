"""``sgw activate`` and ``sgw gateways``: the activated gateways of your account, and what
they report and carry out through the control channel (local state, bandwidth limits,
diagnostics)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import time
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.errors import EXIT_REFUSED, CommandError
from sgw.cli.gateway_commands import result_of, run_on_gateway
from sgw.cli.options import add_timeout, common_flags, group
from sgw.cli.output import emit
from sgw.common.errors import ConfigError


def register_activate(areas: Any) -> None:
    """``sgw activate``."""
    act = areas.add_parser(
        "activate",
        parents=[common_flags()],
        help="activate a gateway with its activation key",
        description="Activate a gateway into your account with the key it handed out.",
    )
    act.add_argument("key", help="the activation key (valid 30 minutes, once)")
    act.add_argument("--name", required=True, help="the gateway's name in the account")
    act.add_argument("--timezone", help="IANA time zone, e.g. Europe/Berlin")
    act.add_argument(
        "--code",
        metavar="CODE",
        help="the confirmation code shown on the appliance's console (XXXX-XXXX-XXXX)",
    )
    act.add_argument(
        "--unconfirmed",
        action="store_true",
        help="a gateway from before confirmation codes (its key starts sgw1.): activate "
        "without one, after checking the key came from that gateway",
    )
    act.set_defaults(handler=_activate)


def register(areas: Any) -> None:
    """``sgw gateways``."""
    command = group(areas, "gateways", "activated gateways of your account")
    command("list", "list gateways", _list)
    command("describe", "show one gateway", _describe).add_argument("id")
    ren = command("rename", "rename a gateway", _rename)
    ren.add_argument("id")
    ren.add_argument("name")
    tz = command(
        "set-timezone", "set a gateway's time zone (for snapshot schedules)", _set_timezone
    )
    tz.add_argument("id")
    tz.add_argument("timezone")
    command("deactivate", "revoke a gateway's credentials for good", _deactivate).add_argument("id")
    local = command(
        "local-state", "ask the gateway for its volumes, write log and limits", _local_state
    )
    local.add_argument("id")
    add_timeout(local)
    bw = command("bandwidth", "set the gateway's upload and download limits (bytes/s)", _bandwidth)
    bw.add_argument("id")
    bw.add_argument("--upload", metavar="RATE", help="e.g. 50M; 0 or unlimited: no limit")
    bw.add_argument("--download", metavar="RATE", help="e.g. 100M; 0 or unlimited: no limit")
    add_timeout(bw)
    diag = command(
        "diagnostics",
        "collect the gateway's logs, state and configuration (tar.gz)",
        _diagnostics,
    )
    diag.add_argument("id")
    diag.add_argument("--file", metavar="PATH", help="where to save it (default: ./sgw-...)")
    add_timeout(diag)
    cmds = command("commands", "list the commands sent to the gateway, newest first", _commands)
    cmds.add_argument("id")
    cmds.add_argument("--limit", type=int, default=20)


def _activate(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        answer = client.activate(
            args.key, args.name, args.timezone, args.code, unconfirmed=args.unconfirmed
        )
        emit(args, answer)
    return 0


def _list(args: argparse.Namespace) -> int:
    cols = ["id", "name", "status", "volumes", "last_seen", "activated"]
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_gateways(), cols)
    return 0


def _describe(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        gateway = client.get_gateway(args.id)
        conn = client.get_connection(args.id)
    gateway["online"] = conn["online"]
    gateway["control_server"] = conn["server_url"] if conn["online"] else None
    emit(args, gateway)
    return 0


def _rename(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.rename_gateway(args.id, args.name))
    return 0


def _set_timezone(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.set_gateway_timezone(args.id, args.timezone))
    return 0


def _deactivate(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.deactivate_gateway(args.id))
    return 0


def _local_state(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        done = run_on_gateway(client, args.id, "describe", {}, timeout=args.timeout, label="asking")
    state = result_of(done)
    if args.output == "json":
        print(json.dumps(state, indent=2, default=str))
        return 0
    cols = ["name", "mode", "size", "status", "iscsi_access", "dirty_bytes", "remote_id", "reason"]
    emit(args, [{c: v.get(c) for c in cols} for v in state["volumes"]], cols)
    log = state["write_log"]
    gw = state.get("gateway", {})
    print(f"write log: {log['used']} of {log['size']} bytes used")
    print(f"bandwidth limits (bytes/s): {gw.get('bandwidth')}")
    return 0


def _bandwidth(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        limits = {
            k: _rate_arg(v, f"--{k}")
            for k, v in (("upload", args.upload), ("download", args.download))
            if v is not None
        }
        if not limits:
            raise ConfigError("give --upload RATE and/or --download RATE (e.g. 10M, 0: none)")
        done = run_on_gateway(
            client, args.id, "set_bandwidth", limits, timeout=args.timeout, label="setting limits"
        )
    emit(args, done["result"])
    return 0


def _diagnostics(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        done = run_on_gateway(
            client, args.id, "diagnostics", {}, timeout=args.timeout, label="collecting diagnostics"
        )
    _save_bundle(args, result_of(done))
    return 0


def _commands(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        rows: list[dict[str, Any]] = [dict(r) for r in client.list_commands(args.id, args.limit)]
    cols = ["id", "type", "status", "created", "completed", "error"]
    emit(args, [{k: r[k] for k in cols} for r in rows], cols)
    return 0


def _save_bundle(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Writes the bundle the gateway sent (checked against its SHA-256), mode 0600."""
    data = base64.b64decode(result["bundle"])
    if hashlib.sha256(data).hexdigest() != result["sha256"]:
        raise CommandError(
            "the diagnostics bundle arrived damaged; run the command again", EXIT_REFUSED
        )
    path = args.file or f"sgw-diagnostics-{args.id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    info = {"file": os.path.abspath(path), "size": len(data), "sha256": result["sha256"]}
    emit(args, {**info, "files": result.get("files")})


def _rate_arg(text: str, what: str) -> int:
    """A bandwidth in bytes/s (``10M``, ``500K``); ``0``, ``none`` or ``unlimited``: none."""
    from sgw.gateway.config import parse_size

    if text.strip().lower() in ("0", "none", "unlimited", "off"):
        return 0
    return parse_size(text, what)
