"""``sgw snapshots``: snapshots of your volumes. A volume on a gateway is snapshotted by
the gateway (a point in its write log, kept by the provider once uploaded); one at the
provider only by the provider."""

from __future__ import annotations

import argparse
from typing import Any

from sgw.cli.client import ApiError
from sgw.cli.config import open_client
from sgw.cli.errors import EXIT_REFUSED, CommandError
from sgw.cli.gateway_commands import result_of, run_on_gateway
from sgw.cli.options import add_timeout, group
from sgw.cli.output import done, emit


def register(areas: Any) -> None:
    command = group(areas, "snapshots", "snapshots of your volumes")
    command("list", "list snapshots", _list).add_argument(
        "--volume", metavar="ID", help="of this volume"
    )
    command("describe", "show a snapshot", _describe).add_argument("id")
    create = command("create", "snapshot a volume now", _create)
    create.add_argument("volume_id")
    create.add_argument("--description")
    create.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the gateway marked the point in time, before the upload",
    )
    add_timeout(create)
    command("delete", "delete a snapshot", _delete).add_argument("id")


def _list(args: argparse.Namespace) -> int:
    cols = ["id", "volume_id", "status", "description", "created", "scheduled_for"]
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_snapshots(args.volume), cols)
    return 0


def _describe(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.get_snapshot(args.id))
    return 0


def _create(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        volume = client.get_volume(args.volume_id)
        if volume.get("gateway_id") is None:  # the provider snapshots the map it holds
            emit(args, client.snapshot_volume(args.volume_id, args.description))
            return 0
        # The gateway marks the point in time in its write log (exactly what was written
        # before the command), then its uploads reach it and the provider keeps it.
        finished = run_on_gateway(
            client,
            volume["gateway_id"],
            "snapshot",
            {
                "volume_id": args.volume_id,
                "description": args.description,
                "wait": not args.no_wait,
            },
            timeout=args.timeout,
            label=f"snapshotting {volume['name']}",
        )
        result = result_of(finished)
        if result.get("state") == "FAILED":
            raise CommandError(f"the snapshot failed: {result.get('error')}", EXIT_REFUSED)
        try:
            emit(args, client.get_snapshot(result["snapshot_id"]))
        except ApiError as e:
            if e.status_code != 404:
                raise
            emit(args, result)  # pending: the provider holds it once the data is uploaded
    return 0


def _delete(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.delete_snapshot(args.id)
    done(args, f"snapshot {args.id} deleted")
    return 0
