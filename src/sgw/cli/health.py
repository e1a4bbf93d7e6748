"""``sgw health GW`` (a gateway's newest metrics and recent events) and ``sgw health
--fleet`` (every gateway at a glance) over the provider's health API (docs/health.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sgw.cli.client import ApiClient
from sgw.cli.config import open_client
from sgw.cli.options import common_flags
from sgw.common.errors import ConfigError

FLEET_COLUMNS = (
    "name",
    "version",
    "last report",
    "log used %",
    "queued",
    "recovery point",
    "errors (24 h)",
)


def register(areas: Any) -> None:
    """``sgw health``."""
    helptext = "a gateway's health (newest metrics, recent events), or the fleet's"
    parser = areas.add_parser(
        "health", parents=[common_flags()], help=helptext, description=helptext
    )
    parser.add_argument("gateway", nargs="?", help="the gateway's id or name")
    parser.add_argument("--fleet", action="store_true", help="every gateway, one line each")
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="as --output json"
    )
    parser.set_defaults(handler=_health)


def _health(args: argparse.Namespace) -> int:
    if args.fleet == (args.gateway is not None):
        raise ConfigError("name a gateway (sgw health GW), or give --fleet")
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        if args.fleet:
            fleet = client.fleet_health()
            if args.output == "json":
                print(json.dumps(fleet, indent=2))
            else:
                _print_fleet(fleet)
            return 0
        doc = client.gateway_health(_gateway_id(client, args.gateway))
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        _print_gateway(doc)
    return 0


def _gateway_id(client: ApiClient, ref: str) -> str:
    """The id of the account's gateway with id or name ``ref`` (else ``ref`` itself: the
    operator may name any account's gateway by its id)."""
    gateways = client.list_gateways()
    if any(g["id"] == ref for g in gateways):
        return ref
    named = [g["id"] for g in gateways if g["name"] == ref]
    if len(named) == 1:
        return str(named[0])
    return ref


def _print_gateway(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    latest = doc.get("latest")
    state = "online" if doc["online"] else "offline"
    console.print(f"[bold]{doc['name']}[/bold] ({doc['gateway_id']}), {state}")
    if latest is None:
        console.print("no health report yet")
    else:
        console.print(
            f"report {latest['seq']} at {latest['at']} (received {latest['received']}); "
            f"version {latest['version'] or '-'}, kernel {latest['kernel'] or '-'}, "
            f"hypervisor {latest['hypervisor'] or '-'}, site {latest['site'] or '-'}"
        )
        table = Table("metric", "gateway", *sorted(latest["volumes"]))
        names = sorted(set(latest["gateway"]).union(*(set(m) for m in latest["volumes"].values())))
        for name in names:
            table.add_row(
                name,
                _number(latest["gateway"].get(name)),
                *(_number(latest["volumes"][v].get(name)) for v in sorted(latest["volumes"])),
            )
        console.print(table)
    events = doc.get("events", [])
    if not events:
        console.print("no events in the last day")
        return
    table = Table("at", "severity", "kind", "volume", "detail", title="events (last day)")
    for e in events:
        table.add_row(e["at"], e["severity"], e["kind"], e["volume"] or "-", e["detail"])
    console.print(table)


def _print_fleet(fleet: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not fleet:
        console.print("(none)")
        return
    table = Table(*FLEET_COLUMNS)
    for g in fleet:
        age = g["last_report_age_s"]
        table.add_row(
            g["name"],
            g["version"] or "-",
            "never" if age is None else f"{age:.0f} s ago",
            _number(g["log_used_percent"]),
            _number(g["queued_write_bytes"]),
            "-" if g["recovery_point_age_s"] is None else f"{g['recovery_point_age_s']:.0f} s",
            str(g["error_events"]),
        )
    console.print(table)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
