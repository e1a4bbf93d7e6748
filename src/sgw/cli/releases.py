"""``sgw releases``: build a release bundle, make the release keys, and publish, list and
revoke releases at the provider (operator; docs/updates.md, "Releases and signatures")."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from sgw.cli.config import open_client
from sgw.cli.options import common_flags, group
from sgw.cli.output import done, emit
from sgw.common.errors import ConfigError
from sgw.common.releases import Manifest, bundle_name

_COLUMNS = ["version", "channel", "severity", "length", "published", "revoked"]


def register(areas: Any) -> None:
    command = group(areas, "releases", "release bundles, their signing keys and publication")
    build = command("build", "build a release bundle from this source tree (needs root)", _build)
    build.add_argument("--version", help="the release's version (default: pyproject.toml's)")
    build.add_argument("out_dir", metavar="OUT_DIR", help="where the bundle and manifest go")
    keys = command("keys", "the release signing keys", _keys_help)
    keys_cmds = keys.add_subparsers(dest="keys_command", required=True, parser_class=type(keys))
    init = keys_cmds.add_parser(
        "init",
        parents=[common_flags()],
        help="make the root key, the online keys and the first signed root in DIR",
        description=(
            "Make the TUF keys of this provider's releases in DIR (kept offline: the root "
            "key never goes to the provider), then install the online ones with `sgw "
            "provider releases-init --keys DIR`."
        ),
    )
    init.add_argument("dir", metavar="DIR")
    init.set_defaults(handler=_keys_init)
    publish = command("publish", "sign and publish a bundle (operator)", _publish)
    publish.add_argument("bundle", metavar="BUNDLE", help="sgw-VERSION.tar.zst")
    publish.add_argument("--channel", required=True, choices=("stable", "canary"))
    publish.add_argument("--severity", default="normal", choices=("normal", "emergency"))
    command("list", "every release published at the provider", _list)
    command("revoke", "withdraw a release: gateways refuse it (operator)", _revoke).add_argument(
        "version", metavar="VERSION"
    )


def _keys_help(_args: argparse.Namespace) -> int:  # pragma: no cover (argparse requires a sub)
    return 2


def source_root() -> Path:
    """The source tree this `sgw` runs from (a checkout: image/build-release beside src/)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "image" / "build-release").is_file():
        raise ConfigError(
            f"no image/build-release under {root}: `sgw releases build` runs from a source "
            "checkout (PYTHONPATH=src or an editable install)"
        )
    return root


def build_release(out_dir: str, version: str | None = None) -> tuple[Path, Manifest]:
    """Runs image/build-release into ``out_dir``; the bundle and its manifest."""
    root = source_root()
    if version is None:
        with open(root / "pyproject.toml", "rb") as f:
            version = str(tomllib.load(f)["project"]["version"])
    if os.geteuid() != 0:
        raise ConfigError("`sgw releases build` needs root (image/build-release unshares a mount)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / bundle_name(version)
    subprocess.run(
        [str(root / "image" / "build-release"), "--version", version, str(bundle)],
        check=True,
        stdout=sys.stderr,
    )
    manifest_path = out / f"sgw-{version}.manifest.json"
    manifest = Manifest.from_json(json.loads(manifest_path.read_bytes()))
    return bundle, manifest


def _build(args: argparse.Namespace) -> int:
    try:
        bundle, manifest = build_release(args.out_dir, args.version)
    except subprocess.CalledProcessError as e:
        raise ConfigError(
            f"image/build-release failed (exit status {e.returncode}); see above"
        ) from e
    emit(args, {"bundle": str(bundle), **manifest.to_json()})
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from sgw.provider.releases.keys import fingerprint, init_keys

    root = init_keys(args.dir)
    emit(
        args,
        {
            "dir": os.path.abspath(args.dir),
            "root_fingerprint": fingerprint(root),
            "root_expires": root.signed.expires.isoformat(),
        },
    )
    if args.output != "json":
        print(
            "Keep DIR offline. Install the online keys at the provider with "
            "`sgw provider releases-init --keys DIR`; root.key.pem stays here.",
            file=sys.stderr,
        )
    return 0


def _publish(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.bundle):
        raise ConfigError(f"{args.bundle} is not a file: give a bundle from `sgw releases build`")
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.publish_release(args.bundle, args.channel, args.severity))
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        emit(args, client.list_releases(), _COLUMNS)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with open_client(args.endpoint, insecure_http=args.insecure_http) as client:
        client.revoke_release(args.version)
    done(args, f"release {args.version} revoked: gateways refuse it from their next check")
    return 0
