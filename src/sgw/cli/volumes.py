"""``sgw volumes``: volumes, who may log in to them over iSCSI and their snapshot
schedules. A volume on a gateway is created and deleted by the gateway (through the control
channel); one at the provider only (the block API's) by the provider.

iSCSI access is closed by default: a volume accepts no initiator until it has a rule
(``chap-set``: an initiator with CHAP; ``acl-add``: an initiator without CHAP, for hosts on
a trusted network) or the open flag (``set-open --open``: any initiator, labs only). Each
change is handed to the volume's gateway at once (kept for it while it is offline)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from sgw.cli.client import ApiClient, ApiError
from sgw.cli.config import open_client
from sgw.cli.gateway_commands import result_of, run_on_gateway
from sgw.cli.options import add_timeout, group
from sgw.cli.output import done, emit
from sgw.common.errors import ConfigError
from sgw.common.iscsi import LEGACY_OPEN, OPEN
from sgw.common.names import VOLUME_NAME_HELP, is_volume_name


def register(areas: Any) -> None:
    command = group(
        areas, "volumes", "volumes, who may log in to them over iSCSI, snapshot schedules"
    )
    command(
        "list", "list volumes with their iSCSI access (closed, chap N, acl N, OPEN)", _list
    ).add_argument("--gateway", metavar="ID", help="of this gateway")
    command(
        "describe", "show a volume with its iSCSI access, initiators and schedule", _describe
    ).add_argument("id")
    create = command("create", "create a volume", _create)
    create.add_argument("name")
    create.add_argument("size", help="e.g. 10G")
    create.add_argument("--mode", choices=("cached", "stored"), default="cached")
    create.add_argument(
        "--gateway", metavar="ID", help="create it on this gateway (waits for it to confirm)"
    )
    create.add_argument("--from-snapshot", metavar="ID", help="start from a snapshot")
    add_timeout(create)
    vdel = command("delete", "delete a volume (from its gateway too; its snapshots stay)", _delete)
    vdel.add_argument("id")
    vdel.add_argument(
        "--drain", action="store_true", help="upload what the gateway's write log holds first"
    )
    add_timeout(vdel)
    chap = command(
        "chap-set", "set an initiator's CHAP secret (read from stdin or prompted)", _chap_set
    )
    chap.add_argument("id")
    chap.add_argument("--initiator", required=True, help="the initiator's IQN")
    chap.add_argument("--mutual", action="store_true", help="also a target secret")
    add_timeout(chap, 30.0)
    command("chap-list", "list the initiators with CHAP credentials", _chap_list).add_argument("id")
    chapdel = command(
        "chap-delete",
        "remove an initiator's CHAP credentials (the last rule: the volume closes)",
        _chap_delete,
    )
    chapdel.add_argument("id")
    chapdel.add_argument("initiator")
    add_timeout(chapdel, 30.0)
    acl = command(
        "acl-add",
        "allow an initiator without CHAP, by its name alone (hosts on a trusted network)",
        _acl_add,
    )
    acl.add_argument("id")
    acl.add_argument("--initiator", required=True, help="the initiator's IQN")
    add_timeout(acl, 30.0)
    command("acl-list", "list the initiators allowed without CHAP", _acl_list).add_argument("id")
    acldel = command(
        "acl-delete",
        "remove an initiator allowed without CHAP (the last rule: the volume closes)",
        _acl_delete,
    )
    acldel.add_argument("id")
    acldel.add_argument("initiator")
    add_timeout(acldel, 30.0)
    opener = command(
        "set-open",
        "open the volume to any initiator without authentication (labs only), or close it",
        _set_open,
    )
    opener.add_argument("id")
    flag = opener.add_mutually_exclusive_group(required=True)
    flag.add_argument(
        "--open", dest="open", action="store_true", help="any initiator, no authentication"
    )
    flag.add_argument(
        "--closed",
        dest="open",
        action="store_false",
        help="only the initiators of its rules (none: nobody); ends legacy open too",
    )
    add_timeout(opener, 30.0)
    sched = command("schedule-set", "snapshot the volume on a schedule", _schedule_set)
    sched.add_argument("id")
    sched.add_argument("--start-hour", type=int, required=True, help="0-23, gateway time")
    sched.add_argument(
        "--every", type=int, required=True, choices=(1, 2, 4, 8, 12, 24), help="hours"
    )
    sched.add_argument(
        "--retain", type=int, help="keep this many newest scheduled snapshots (not manual ones)"
    )
    sched.add_argument("--description")
    command(
        "schedule-delete", "remove the volume's snapshot schedule", _schedule_delete
    ).add_argument("id")


def _list(args: argparse.Namespace) -> int:
    cols = ["id", "name", "gateway_id", "mode", "size", "access", "map_version", "created"]
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        volumes = client.list_volumes(args.gateway)
    emit(args, volumes, cols)
    _warn_open(args, volumes)
    return 0


def _describe(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        volume = client.get_volume(args.id)
        access = client.get_access(args.id)
        volume["access"] = access["access"]
        volume["chap"] = access["chap"]
        volume["acl"] = access["acl"]
        try:
            volume["snapshot_schedule"] = client.get_snapshot_schedule(args.id)
        except ApiError as e:
            if e.status_code != 404:
                raise
            volume["snapshot_schedule"] = None
    emit(args, volume)
    _warn_open(args, [volume])
    return 0


def _create(args: argparse.Namespace) -> int:
    from sgw.gateway.config import parse_size

    _check_name(args.name, on_gateway=args.gateway is not None)
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        size = parse_size(args.size, "SIZE")
        if args.gateway is None:  # a volume at the provider only (the block API's)
            made = client.create_volume(
                args.name, size, args.mode, from_snapshot_id=args.from_snapshot
            )
            emit(args, made)
            return 0
        fields = {
            "name": args.name,
            "size": size,
            "mode": args.mode,
            "from_snapshot_id": args.from_snapshot,
        }
        finished = run_on_gateway(
            client,
            args.gateway,
            "create_volume",
            {k: v for k, v in fields.items() if v},
            timeout=args.timeout,
            label=f"creating volume {args.name}",
        )
        volume = client.get_volume(finished["args"]["volume_id"])
    volume["status"] = result_of(finished).get("status")
    emit(args, volume)
    return 0


def _check_name(name: str, *, on_gateway: bool) -> None:
    """Refuses, before anything is sent, a name the provider would refuse too."""
    if on_gateway and not is_volume_name(name):
        raise ConfigError(
            f"volume name {name[:80]!r}: a gateway's volumes are named with " + VOLUME_NAME_HELP
        )
    if not name.isprintable():
        raise ConfigError(f"volume name {name[:80]!r}: give printable characters only")


def _delete(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        volume = client.get_volume(args.id)
        gateway_id = volume.get("gateway_id")
        if gateway_id is None:
            client.delete_volume(args.id)
        else:  # the gateway removes it first; the provider's record goes after
            run_on_gateway(
                client,
                gateway_id,
                "delete_volume",
                {"volume_id": args.id, "drain": args.drain},
                timeout=args.timeout,
                label=f"deleting volume {volume['name']}",
            )
    done(args, f"volume {args.id} deleted")
    return 0


def _chap_set(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        secret, target = _read_secrets(args.mutual)
        emit(args, client.set_chap(args.id, args.initiator, secret, target))
        _sync_access(client, args)
    return 0


def _chap_list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_chap(args.id), ["initiator", "mutual", "updated"])
    return 0


def _chap_delete(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.delete_chap(args.id, args.initiator)
        _sync_access(client, args)
    done(args, f"CHAP credentials of {args.initiator} removed from volume {args.id}")
    return 0


def _acl_add(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.add_acl(args.id, args.initiator))
        _sync_access(client, args)
    return 0


def _acl_list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_acl(args.id), ["initiator", "updated"])
    return 0


def _acl_delete(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.delete_acl(args.id, args.initiator)
        _sync_access(client, args)
    done(args, f"initiator {args.initiator} no longer allowed on volume {args.id}")
    return 0


def _set_open(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        access = client.set_open(args.id, args.open)
        _sync_access(client, args)
    emit(args, {k: v for k, v in access.items() if k not in ("chap", "acl")})
    if args.open:
        print(
            f"volume {args.id} is OPEN: any initiator on its gateway's network may log in "
            f"and write it, without authentication; close it with `sgw volumes set-open "
            f"{args.id} --closed`",
            file=sys.stderr,
        )
    return 0


def _schedule_set(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        schedule = client.set_snapshot_schedule(
            args.id,
            args.start_hour,
            args.every,
            description=args.description,
            retain=args.retain,
        )
    emit(args, schedule)
    return 0


def _schedule_delete(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.delete_snapshot_schedule(args.id)
    done(args, f"snapshot schedule of volume {args.id} removed")
    return 0


def _warn_open(args: argparse.Namespace, volumes: list[dict[str, Any]]) -> None:
    """Names, on a terminal's error stream, the volumes any initiator may log in to."""
    opened = [v for v in volumes if str(v.get("access", "")).startswith(OPEN)]
    if args.output == "json" or not opened:
        return
    legacy = [v for v in opened if v.get("access") == LEGACY_OPEN]
    print(
        f"{len(opened)} volume(s) OPEN to any initiator without authentication"
        + (
            f", {len(legacy)} of them since before access was closed by default (legacy)"
            if legacy
            else ""
        )
        + ": add an initiator (chap-set, acl-add) or close them (set-open ID --closed)",
        file=sys.stderr,
    )


def _sync_access(client: ApiClient, args: argparse.Namespace) -> None:
    """Has the volume's gateway fetch its access rules (kept for it while offline)."""
    volume = client.get_volume(args.id)
    gateway_id = volume.get("gateway_id")
    if gateway_id is None:
        return
    finished = run_on_gateway(
        client,
        gateway_id,
        "sync_chap",
        {"volume_id": args.id},
        timeout=args.timeout,
        label="handing the access rules to the gateway",
        wait_offline=True,
    )
    if finished["status"] != "succeeded":
        print(
            f"gateway {gateway_id} has not taken the access rules yet (offline?); it gets "
            "them when it is back (see `sgw gateways commands`)",
            file=sys.stderr,
        )


def _read_secrets(mutual: bool) -> tuple[str, str | None]:
    """CHAP secrets from standard input (one a line) or prompted: never from argv, which
    every user of the machine can read."""
    if not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
        need = 2 if mutual else 1
        if len(lines) < need:
            raise ConfigError(f"expected {need} secret line(s) on standard input")
        return lines[0], (lines[1] if mutual else None)
    secret = getpass.getpass("CHAP secret (12-16 characters): ")
    target = getpass.getpass("mutual CHAP target secret: ") if mutual else None
    return secret, target
