"""The admin side of the ``sgw`` command: activation, accounts, tokens, gateways, volumes
and snapshots through the provider's management API (docs/provider.md).

Where the provider is and who calls: ``--endpoint`` or ``SGW_ENDPOINT``, ``SGW_TOKEN``,
``SGW_CA`` (the provider's CA for https), else the config file (``SGW_CONFIG`` or
``~/.config/sgw/config.toml``; it holds a token, so it must be mode 0600)::

    endpoint = "https://provider.example.net:8480"
    token = "sgw_..."
    ca = "/etc/sgw/provider-ca.pem"

Output: tables (rich) by default, ``--output json`` for scripts. Exit status: 0 done,
1 refused by the provider (400, 409) or by the gateway, 2 wrong usage or configuration,
3 not authenticated or not allowed (401, 403), 4 not found (404), 5 provider unreachable
or failing (5xx), 6 the gateway is offline or did not answer in time.

Commands that a gateway carries out (``sgw volumes create --gateway``, ``volumes delete``
and ``snapshots create`` of a gateway's volume, ``gateways local-state|bandwidth|
diagnostics``) go through the control channel (``sgw.gateway.link.channel``): they return
once the gateway confirmed, with a progress indicator meanwhile.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import ssl
import stat
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sgw.common.errors import ConfigError, SgwError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_GATEWAY = 6
# How long a command to a gateway is waited for by default (seconds); --timeout changes it.
COMMAND_TIMEOUT_S = 120.0
DEFAULT_CONFIG = "~/.config/sgw/config.toml"
_TIMEOUT_S = 30.0

Handler = Callable[[argparse.Namespace], int]


class ApiError(SgwError):
    """The provider refused or failed a call; ``exit_status`` is the command's status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class ClientSettings:
    endpoint: str
    token: str | None
    ca: str | None


def load_settings(endpoint_flag: str | None) -> ClientSettings:
    """Endpoint, token and CA from the flag, the environment, then the config file."""
    path = os.path.expanduser(os.environ.get("SGW_CONFIG", DEFAULT_CONFIG))
    doc: dict[str, Any] = {}
    if os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path} has mode {mode:04o} and holds a token; restrict it: chmod 600 {path}"
            )
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
    endpoint = endpoint_flag or os.environ.get("SGW_ENDPOINT") or doc.get("endpoint")
    if not endpoint:
        raise ConfigError(
            f"no provider endpoint: pass --endpoint URL, set SGW_ENDPOINT or write "
            f'endpoint = "https://..." in {path}'
        )
    token = os.environ.get("SGW_TOKEN") or doc.get("token")
    ca = os.environ.get("SGW_CA") or doc.get("ca")
    return ClientSettings(str(endpoint).rstrip("/"), token and str(token), ca and str(ca))


class AdminClient:
    """The management API over HTTP with an API token."""

    def __init__(self, settings: ClientSettings) -> None:
        if not settings.token:
            raise ConfigError(
                "no API token: set SGW_TOKEN or token = ... in the config file (`sgw provider "
                "init` printed the first one)"
            )
        self._http = httpx.Client(
            base_url=settings.endpoint,
            headers={"Authorization": f"Bearer {settings.token}"},
            verify=ssl.create_default_context(cafile=settings.ca) if settings.ca else True,
            timeout=_TIMEOUT_S,
        )

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        try:
            resp = self._http.request(method, path, json=body, params=query)
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach the provider: {e}", EXIT_UNAVAILABLE) from e
        if resp.status_code < 300:
            return None if resp.status_code == 204 or not resp.content else resp.json()
        error = ""
        try:
            doc = resp.json()
            message = doc.get("message") or resp.text
            error = str(doc.get("error") or "")
        except (ValueError, AttributeError):
            message = resp.text
        status = resp.status_code
        code = {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND}.get(status, EXIT_REFUSED)
        if status >= 500:
            code = EXIT_UNAVAILABLE
        if error == "gateway_offline":
            code = EXIT_GATEWAY
        raise ApiError(f"{status}: {message}", code)

    def command(
        self,
        gateway_id: str,
        type_: str,
        args: dict[str, Any],
        *,
        timeout: float = COMMAND_TIMEOUT_S,
        label: str = "",
        wait_offline: bool = False,
    ) -> dict[str, Any]:
        """Sends a command to the gateway and waits for its outcome, showing progress on
        a terminal. Returns the finished command; ApiError if the gateway refused it
        (exit 1) or did not answer in time (exit 6). ``wait_offline``: a command the
        provider keeps for an offline gateway is returned unfinished after ``timeout``."""
        body: dict[str, Any] = {
            "type": type_,
            "args": args,
            "idempotency_key": str(uuid.uuid4()),
        }
        if not wait_offline:  # a command not taken by then never runs
            body["ttl"] = max(1.0, timeout)
        deadline = time.monotonic() + timeout
        with _Progress(label or f"{type_} on gateway {gateway_id}") as show:
            first_wait = round(min(20.0, timeout), 1)
            cmd: dict[str, Any] = self.call(
                "POST", f"/v1/gateways/{gateway_id}/commands", body, wait=first_wait
            )
            path = f"/v1/gateways/{gateway_id}/commands/{cmd['id']}"
            while cmd["status"] in _OPEN:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                show(_STAGES.get(cmd["status"], cmd["status"]))
                cmd = self.call("GET", path, wait=round(min(20.0, remaining), 1))
        cancelled = False
        if cmd["status"] in _OPEN and not wait_offline:
            cmd = self.call("DELETE", path)  # cancelled unless the gateway took it
            cancelled = cmd["status"] == "expired"
        if cmd["status"] == "succeeded" or (wait_offline and cmd["status"] in _OPEN):
            return cmd
        if cmd["status"] == "failed":
            raise ApiError(f"the gateway refused: {cmd.get('error')}", EXIT_REFUSED)
        if cancelled:
            raise ApiError(
                f"no answer from gateway {gateway_id} within {timeout:.0f} s (offline or "
                "unreachable); the command was cancelled, nothing was done",
                EXIT_GATEWAY,
            )
        if cmd["status"] == "expired":
            raise ApiError(
                f"gateway {gateway_id} did not take the command before its deadline (it is "
                "offline or cannot reach the provider); nothing was done",
                EXIT_GATEWAY,
            )
        if cmd["status"] == "delivered":
            raise ApiError(
                f"no answer from gateway {gateway_id} within {timeout:.0f} s: it did not "
                "confirm that it took the command, and refuses to start it from now on",
                EXIT_GATEWAY,
            )
        raise ApiError(
            f"gateway {gateway_id} took the command but did not finish it within "
            f"{timeout:.0f} s; it goes on there (see `sgw gateways commands {gateway_id}`)",
            EXIT_GATEWAY,
        )


_OPEN = ("queued", "delivered", "acknowledged")
_STAGES = {
    "queued": "waiting for the gateway to take it",
    "delivered": "delivered, waiting for the gateway's acknowledgement",
    "acknowledged": "running on the gateway",
}


class _Progress:
    """A spinner with a status line on standard error while a command runs (only on a
    terminal; nothing is printed otherwise)."""

    def __init__(self, label: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.label = label
        self._status: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.console.is_terminal:
            self._status = self.console.status(f"{self.label}: waiting for the gateway")
            self._status.__enter__()
        return self.update

    def update(self, stage: str) -> None:
        if self._status is not None:
            self._status.update(f"{self.label}: {stage}")

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)


# Output


def emit(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    """Prints ``data`` (a dict or a list of dicts) as a table or as JSON."""
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if isinstance(data, dict):
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in data.items():
            table.add_row(key, _cell(value))
    else:
        cols = list(columns or (data[0].keys() if data else []))
        table = Table()
        for col in cols:
            table.add_column(col, overflow="fold")
        for row in data:
            table.add_row(*(_cell(row.get(c)) for c in cols))
        if not data:
            console.print("(none)")
            return
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


# Commands


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(load_settings(args.endpoint))


def _activate(args: argparse.Namespace) -> int:
    body = {"activation_key": args.key, "name": args.name, "timezone": args.timezone}
    emit(args, _client(args).call("POST", "/v1/activations", body))
    return 0


def _accounts(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "show":
        emit(args, client.call("GET", "/v1/account"))
    elif args.command == "list":
        emit(args, client.call("GET", "/v1/accounts"), ["id", "name", "operator", "created"])
    elif args.command == "create":
        new = client.call("POST", "/v1/accounts", {"name": args.name})
        emit(args, {**new["account"], "token": new["token"]["token"]})
        _warn_once_only(args)
    return 0


def _tokens(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "list":
        emit(args, client.call("GET", "/v1/tokens"), ["id", "name", "created", "last_used"])
    elif args.command == "create":
        emit(args, client.call("POST", "/v1/tokens", {"name": args.name}))
        _warn_once_only(args)
    elif args.command == "revoke":
        client.call("DELETE", f"/v1/tokens/{args.id}")
        _done(args, f"token {args.id} revoked")
    return 0


def _gateways(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "list":
        cols = ["id", "name", "status", "volumes", "last_seen", "activated"]
        emit(args, client.call("GET", "/v1/gateways"), cols)
    elif args.command == "describe":
        gateway = client.call("GET", f"/v1/gateways/{args.id}")
        conn = client.call("GET", f"/v1/gateways/{args.id}/connection")
        gateway["online"] = conn["online"]
        gateway["control_server"] = conn["server_url"] if conn["online"] else None
        emit(args, gateway)
    elif args.command == "local-state":
        done = client.command(args.id, "describe", {}, timeout=args.timeout, label="asking")
        _emit_local_state(args, done["result"])
    elif args.command == "bandwidth":
        limits = {
            k: _rate_arg(v, f"--{k}")
            for k, v in (("upload", args.upload), ("download", args.download))
            if v is not None
        }
        if not limits:
            raise ConfigError("give --upload RATE and/or --download RATE (e.g. 10M, 0: none)")
        done = client.command(
            args.id, "set_bandwidth", limits, timeout=args.timeout, label="setting limits"
        )
        emit(args, done["result"])
    elif args.command == "diagnostics":
        done = client.command(
            args.id, "diagnostics", {}, timeout=args.timeout, label="collecting diagnostics"
        )
        _save_bundle(args, done["result"])
    elif args.command == "commands":
        rows = client.call("GET", f"/v1/gateways/{args.id}/commands", limit=args.limit)
        cols = ["id", "type", "status", "created", "completed", "error"]
        emit(args, [{k: r[k] for k in cols} for r in rows], cols)
    elif args.command == "rename":
        emit(args, client.call("PATCH", f"/v1/gateways/{args.id}", {"name": args.name}))
    elif args.command == "set-timezone":
        body = {"timezone": args.timezone}
        emit(args, client.call("PATCH", f"/v1/gateways/{args.id}", body))
    elif args.command == "deactivate":
        emit(args, client.call("POST", f"/v1/gateways/{args.id}/deactivate"))
    return 0


def _volumes(args: argparse.Namespace) -> int:
    client = _client(args)
    cmd = args.command
    if cmd == "list":
        cols = ["id", "name", "gateway_id", "mode", "size", "map_version", "created"]
        emit(args, client.call("GET", "/v1/volumes", gateway_id=args.gateway), cols)
    elif cmd == "describe":
        volume = client.call("GET", f"/v1/volumes/{args.id}")
        volume["chap"] = client.call("GET", f"/v1/volumes/{args.id}/chap")
        try:
            volume["snapshot_schedule"] = client.call(
                "GET", f"/v1/volumes/{args.id}/snapshot-schedule"
            )
        except ApiError as e:
            if e.exit_status != EXIT_NOT_FOUND:
                raise
            volume["snapshot_schedule"] = None
        emit(args, volume)
    elif cmd == "create":
        from sgw.gateway.config import parse_size

        body = {
            "name": args.name,
            "size": parse_size(args.size, "SIZE"),
            "mode": args.mode,
            "gateway_id": args.gateway,
            "from_snapshot_id": args.from_snapshot,
        }
        if args.gateway is None:  # a volume at the provider only (the block API's)
            emit(args, client.call("POST", "/v1/volumes", {k: v for k, v in body.items() if v}))
            return 0
        del body["gateway_id"]
        done = client.command(
            args.gateway,
            "create_volume",
            {k: v for k, v in body.items() if v},
            timeout=args.timeout,
            label=f"creating volume {args.name}",
        )
        volume = client.call("GET", f"/v1/volumes/{done['args']['volume_id']}")
        volume["status"] = done["result"].get("status")
        emit(args, volume)
    elif cmd == "delete":
        volume = client.call("GET", f"/v1/volumes/{args.id}")
        gateway_id = volume.get("gateway_id")
        if gateway_id is None:
            client.call("DELETE", f"/v1/volumes/{args.id}")
        else:  # the gateway removes it first; the provider's record goes after
            client.command(
                gateway_id,
                "delete_volume",
                {"volume_id": args.id, "drain": args.drain},
                timeout=args.timeout,
                label=f"deleting volume {volume['name']}",
            )
        _done(args, f"volume {args.id} deleted")
    elif cmd == "chap-set":
        secret, target = _read_secrets(args.mutual)
        body = {"initiator": args.initiator, "secret": secret, "target_secret": target}
        emit(args, client.call("PUT", f"/v1/volumes/{args.id}/chap", body))
        _sync_chap(client, args)
    elif cmd == "chap-list":
        rows = client.call("GET", f"/v1/volumes/{args.id}/chap")
        emit(args, rows, ["initiator", "mutual", "updated"])
    elif cmd == "chap-delete":
        client.call("DELETE", f"/v1/volumes/{args.id}/chap/{args.initiator}")
        _sync_chap(client, args)
        _done(args, f"CHAP credentials of {args.initiator} removed from volume {args.id}")
    elif cmd == "schedule-set":
        body = {
            "start_hour": args.start_hour,
            "recurrence_hours": args.every,
            "description": args.description,
            "retain": args.retain,
        }
        emit(args, client.call("PUT", f"/v1/volumes/{args.id}/snapshot-schedule", body))
    elif cmd == "schedule-delete":
        client.call("DELETE", f"/v1/volumes/{args.id}/snapshot-schedule")
        _done(args, f"snapshot schedule of volume {args.id} removed")
    return 0


def _snapshots(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "list":
        cols = ["id", "volume_id", "status", "description", "created", "scheduled_for"]
        emit(args, client.call("GET", "/v1/snapshots", volume_id=args.volume), cols)
    elif args.command == "describe":
        emit(args, client.call("GET", f"/v1/snapshots/{args.id}"))
    elif args.command == "create":
        volume = client.call("GET", f"/v1/volumes/{args.volume_id}")
        if volume.get("gateway_id") is None:  # the provider snapshots the map it holds
            body = {"description": args.description} if args.description else None
            emit(args, client.call("POST", f"/v1/volumes/{args.volume_id}/snapshots", body))
            return 0
        # The gateway marks the point in time in its write log (exactly what was written
        # before the command), then its uploads reach it and the provider keeps it.
        done = client.command(
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
        result = done["result"]
        if result.get("state") == "FAILED":
            raise ApiError(f"the snapshot failed: {result.get('error')}", EXIT_REFUSED)
        try:
            emit(args, client.call("GET", f"/v1/snapshots/{result['snapshot_id']}"))
        except ApiError as e:
            if e.exit_status != EXIT_NOT_FOUND:
                raise
            emit(args, result)  # pending: the provider holds it once the data is uploaded
    elif args.command == "delete":
        client.call("DELETE", f"/v1/snapshots/{args.id}")
        _done(args, f"snapshot {args.id} deleted")
    return 0


def _sync_chap(client: AdminClient, args: argparse.Namespace) -> None:
    """Has the volume's gateway fetch its CHAP credentials (kept for it while offline)."""
    volume = client.call("GET", f"/v1/volumes/{args.id}")
    gateway_id = volume.get("gateway_id")
    if gateway_id is None:
        return
    done = client.command(
        gateway_id,
        "sync_chap",
        {"volume_id": args.id},
        timeout=args.timeout,
        label="handing the credentials to the gateway",
        wait_offline=True,
    )
    if done["status"] != "succeeded":
        print(
            f"gateway {gateway_id} has not taken the credentials yet (offline?); it gets "
            "them when it is back (see `sgw gateways commands`)",
            file=sys.stderr,
        )


def _emit_local_state(args: argparse.Namespace, state: dict[str, Any]) -> None:
    if args.output == "json":
        print(json.dumps(state, indent=2, default=str))
        return
    cols = ["name", "mode", "size", "status", "dirty_bytes", "remote_id", "reason"]
    emit(args, [{c: v.get(c) for c in cols} for v in state["volumes"]], cols)
    log = state["write_log"]
    gw = state.get("gateway", {})
    print(f"write log: {log['used']} of {log['size']} bytes used")
    print(f"bandwidth limits (bytes/s): {gw.get('bandwidth')}")


def _save_bundle(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import base64
    import hashlib

    data = base64.b64decode(result["bundle"])
    if hashlib.sha256(data).hexdigest() != result["sha256"]:
        raise ApiError("the diagnostics bundle arrived damaged; run the command again", 1)
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


def _warn_once_only(args: argparse.Namespace) -> None:
    if args.output != "json":
        print("The token is shown only now: store it safely.", file=sys.stderr)


def _done(args: argparse.Namespace, message: str) -> None:
    if args.output == "json":
        print(json.dumps({"ok": True, "message": message}))
    else:
        print(message)


# Parsers


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--endpoint", metavar="URL", help="provider URL (or SGW_ENDPOINT)")
    parent.add_argument(
        "--output", choices=("table", "json"), default="table", help="table (default) or json"
    )
    return parent


def register(areas: Any) -> None:
    """Adds the admin commands to the ``sgw`` parser's sub-commands."""
    common = _common()
    act = areas.add_parser(
        "activate",
        parents=[common],
        help="activate a gateway with its activation key",
        description="Activate a gateway into your account with the key it handed out.",
    )
    act.add_argument("key", help="the activation key (valid 30 minutes, once)")
    act.add_argument("--name", required=True, help="the gateway's name in the account")
    act.add_argument("--timezone", help="IANA time zone, e.g. Europe/Berlin")
    act.set_defaults(handler=_activate)

    def group(name: str, helptext: str, handler: Handler) -> Any:
        parser = areas.add_parser(name, help=helptext, description=helptext)
        subs = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
        parser.set_defaults(handler=handler)

        def cmd(cname: str, chelp: str) -> argparse.ArgumentParser:
            sub: argparse.ArgumentParser = subs.add_parser(
                cname, parents=[common], help=chelp, description=chelp
            )
            return sub

        return cmd

    acc = group("accounts", "accounts (operator) and your own account", _accounts)
    acc("show", "show the account of your token")
    acc("list", "list every account (operator only)")
    acc("create", "create an account and its first token (operator only)").add_argument("name")

    tok = group("tokens", "API tokens of your account", _tokens)
    tok("list", "list the account's tokens")
    tok("create", "create a token (shown once)").add_argument("--name", default="token")
    tok("revoke", "revoke a token at once").add_argument("id")

    gw = group("gateways", "activated gateways of your account", _gateways)
    gw("list", "list gateways")
    gw("describe", "show one gateway").add_argument("id")
    ren = gw("rename", "rename a gateway")
    ren.add_argument("id")
    ren.add_argument("name")
    tz = gw("set-timezone", "set a gateway's time zone (for snapshot schedules)")
    tz.add_argument("id")
    tz.add_argument("timezone")
    gw("deactivate", "revoke a gateway's credentials for good").add_argument("id")
    local = gw("local-state", "ask the gateway for its volumes, write log and limits")
    local.add_argument("id")
    _timeout(local)
    bw = gw("bandwidth", "set the gateway's upload and download limits (bytes/s)")
    bw.add_argument("id")
    bw.add_argument("--upload", metavar="RATE", help="e.g. 50M; 0 or unlimited: no limit")
    bw.add_argument("--download", metavar="RATE", help="e.g. 100M; 0 or unlimited: no limit")
    _timeout(bw)
    diag = gw("diagnostics", "collect the gateway's logs, state and configuration (tar.gz)")
    diag.add_argument("id")
    diag.add_argument("--file", metavar="PATH", help="where to save it (default: ./sgw-...)")
    _timeout(diag)
    cmds = gw("commands", "list the commands sent to the gateway, newest first")
    cmds.add_argument("id")
    cmds.add_argument("--limit", type=int, default=20)

    vol = group("volumes", "volumes, their CHAP credentials and snapshot schedules", _volumes)
    vol("list", "list volumes").add_argument("--gateway", metavar="ID", help="of this gateway")
    vol("describe", "show a volume with its CHAP initiators and schedule").add_argument("id")
    create = vol("create", "create a volume")
    create.add_argument("name")
    create.add_argument("size", help="e.g. 10G")
    create.add_argument("--mode", choices=("cached", "stored"), default="cached")
    create.add_argument(
        "--gateway", metavar="ID", help="create it on this gateway (waits for it to confirm)"
    )
    create.add_argument("--from-snapshot", metavar="ID", help="start from a snapshot")
    _timeout(create)
    vdel = vol("delete", "delete a volume (from its gateway too; its snapshots stay)")
    vdel.add_argument("id")
    vdel.add_argument(
        "--drain", action="store_true", help="upload what the gateway's write log holds first"
    )
    _timeout(vdel)
    chap = vol("chap-set", "set an initiator's CHAP secret (read from stdin or prompted)")
    chap.add_argument("id")
    chap.add_argument("--initiator", required=True, help="the initiator's IQN")
    chap.add_argument("--mutual", action="store_true", help="also a target secret")
    _timeout(chap, 30.0)
    vol("chap-list", "list the initiators with CHAP credentials").add_argument("id")
    chapdel = vol("chap-delete", "remove an initiator's CHAP credentials")
    chapdel.add_argument("id")
    chapdel.add_argument("initiator")
    _timeout(chapdel, 30.0)
    sched = vol("schedule-set", "snapshot the volume on a schedule")
    sched.add_argument("id")
    sched.add_argument("--start-hour", type=int, required=True, help="0-23, gateway time")
    sched.add_argument(
        "--every", type=int, required=True, choices=(1, 2, 4, 8, 12, 24), help="hours"
    )
    sched.add_argument(
        "--retain", type=int, help="keep this many newest scheduled snapshots (not manual ones)"
    )
    sched.add_argument("--description")
    vol("schedule-delete", "remove the volume's snapshot schedule").add_argument("id")

    snap = group("snapshots", "snapshots of your volumes", _snapshots)
    snap("list", "list snapshots").add_argument("--volume", metavar="ID", help="of this volume")
    snap("describe", "show a snapshot").add_argument("id")
    screate = snap("create", "snapshot a volume now")
    screate.add_argument("volume_id")
    screate.add_argument("--description")
    screate.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the gateway marked the point in time, before the upload",
    )
    _timeout(screate)
    snap("delete", "delete a snapshot").add_argument("id")


def _timeout(parser: argparse.ArgumentParser, default: float = COMMAND_TIMEOUT_S) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"how long to wait for the gateway (default {default:.0f})",
    )
