"""``sgw updates``: the update policy of your gateways (channel, maintenance window,
automatic), swapping one at once, what each runs and plans; and, for the provider's
operator, rollouts of a published release in phases, halted and resumed
(docs/updates.md)."""

from __future__ import annotations

import argparse
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.options import group
from sgw.cli.output import emit
from sgw.common.errors import ConfigError
from sgw.common.maintenance import WINDOW_HELP, Window, WindowError


def register(areas: Any) -> None:
    """``sgw updates``."""
    command = group(areas, "updates", "update policies, status, update now, rollouts")
    pset = command(
        "policy-set",
        "set a gateway's update policy (or the account's default with --default)",
        _policy_set,
    )
    pset.add_argument("gateway", nargs="?", help="the gateway's id (omit with --default)")
    pset.add_argument(
        "--default", action="store_true", help="set the account's default for gateways"
    )
    pset.add_argument("--channel", choices=("canary", "stable"))
    pset.add_argument("--window", metavar="TEXT", help=WINDOW_HELP)
    pset.add_argument("--kind", choices=("weekly", "monthly"), help="instead of --window")
    pset.add_argument("--day", help="weekly: mon..sun; monthly: 1..31 (with --kind)")
    pset.add_argument("--at", metavar="HH:MM", help="local start time (with --kind)")
    pset.add_argument("--duration", metavar="MINUTES", type=int, help="(with --kind)")
    pset.add_argument(
        "--automatic",
        choices=("all", "emergency"),
        help="all: swap to every release in the window; emergency: emergency ones only",
    )
    pshow = command("policy", "show a gateway's update policy (or the default)", _policy_show)
    pshow.add_argument("gateway", nargs="?", help="the gateway's id (omit: the default)")
    pclear = command(
        "policy-clear", "drop a gateway's own policy (the default applies)", _policy_clear
    )
    pclear.add_argument("gateway")
    st = command("status", "what each gateway runs, plans and reported; the rollouts", _status)
    st.add_argument("--gateway", metavar="ID", help="one gateway only")
    now = command("now", "swap a gateway to its planned release at once, outside its window", _now)
    now.add_argument("gateway")
    ro = command("rollout", "roll a published release out in phases (operator)", _rollout)
    ro.add_argument("version")
    ro.add_argument(
        "--share", type=int, help="percent of the non-canary gateways in phase 2 (default 10)"
    )
    ro.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="how long a phase's gateways stay healthy before the next (default 60)",
    )
    ro.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="failed swaps that halt the rollout (default 1)",
    )
    ro.add_argument(
        "--heartbeat-timeout",
        type=float,
        metavar="MINUTES",
        help="silence after a swap that halts the rollout (default 10, at least 2)",
    )
    command("rollouts", "list the rollouts, newest first (operator)", _rollouts)
    halt = command("halt", "halt the running rollout (operator)", _halt)
    halt.add_argument("version", nargs="?", help="its release (default: the running one)")
    halt.add_argument("--reason", help="recorded with the halt")
    resume = command("resume", "resume the halted rollout (operator)", _resume)
    resume.add_argument("version", nargs="?", help="its release (default: the halted one)")


def window_arg(args: argparse.Namespace) -> dict[str, Any] | None:
    """The window of ``--window TEXT`` or ``--kind --day --at --duration`` (None: neither)."""
    parts = (args.kind, args.day, args.at, args.duration)
    if args.window is not None and any(p is not None for p in parts):
        raise ConfigError("give --window TEXT or --kind/--day/--at/--duration, not both")
    try:
        if args.window is not None:
            return Window.parse(args.window).to_json()
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ConfigError("--kind needs --day, --at HH:MM and --duration MINUTES too")
        return Window.parse(f"{args.kind} {args.day} {args.at} {args.duration}m").to_json()
    except WindowError as exc:
        raise ConfigError(str(exc)) from None


def _policy_set(args: argparse.Namespace) -> int:
    if args.default == (args.gateway is not None):
        raise ConfigError("name a gateway, or give --default for the account's default")
    window = window_arg(args)
    if args.channel is None and window is None and args.automatic is None:
        raise ConfigError("give --channel, --window (or --kind ...) and/or --automatic")
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        policy = client.set_update_policy(
            args.gateway, channel=args.channel, window=window, automatic=args.automatic
        )
    emit(args, _policy_row(policy))
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, _policy_row(client.get_update_policy(args.gateway)))
    return 0


def _policy_clear(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, _policy_row(client.clear_update_policy(args.gateway)))
    return 0


def _policy_row(policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "channel": policy["channel"],
        "window": policy["window_text"],
        "automatic": policy["automatic"],
        "source": policy["source"],
        "window_fields": policy["window"],
    }


def _status(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        status = client.update_status(args.gateway)
    if args.output == "json":
        emit(args, status)
        return 0
    cols = [
        "name",
        "running",
        "planned",
        "now",
        "state",
        "last_report",
        "pause_s",
        "window",
        "next_window",
    ]
    emit(args, status["gateways"], cols)
    if status["rollouts"]:
        emit(args, status["rollouts"], _ROLLOUT_COLUMNS)
    return 0


def _now(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        out = client.update_now(args.gateway)
    if args.output == "json":
        emit(args, out)
    else:
        print(
            f"gateway {args.gateway}: swapping to {out['version']} at once "
            f"(command {out['command']['id']}: {out['command']['status']}); "
            "`sgw updates status` shows its progress"
        )
    return 0


_ROLLOUT_COLUMNS = ["version", "severity", "state", "phase", "share", "started", "halt_reason"]


def _rollout(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(
            args,
            client.start_rollout(
                args.version,
                share=args.share,
                soak_minutes=args.soak,
                max_failures=args.max_failures,
                heartbeat_timeout_minutes=args.heartbeat_timeout,
            ),
        )
    return 0


def _rollouts(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_rollouts(), _ROLLOUT_COLUMNS)
    return 0


def _halt(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.halt_rollout(args.version, args.reason))
    return 0


def _resume(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.resume_rollout(args.version))
    return 0
