"""Releases through a real provider process and the `sgw` command: keys made offline and
their online part installed, bundles published, listed and revoked by the operator, and
fetched and verified by an activated gateway over its signed requests."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from sgw.common.releases import root_fingerprint
from sgw.gateway.link.release_root import install_root
from sgw.gateway.updates.trust import ReleaseTrust, UpdateRefused
from sgw.provider.api.gate import RELEASE_BODY, body_cap
from sgw.provider.blockstore.objects import DirectoryStore
from sgw.provider.db import schema
from sgw.provider.releases.keys import load_online_keys
from sgw.provider.releases.repository import MAX_BUNDLE, ReleaseRepository
from tests.fixtures.daemons import SGW, GatewayProcess
from tests.fixtures.management import (
    SecureProvider,
    activate,
    cli_json,
    code_of,
    new_account,
)
from tests.fixtures.releases import make_bundle
from tests.fixtures.waiting import wait_for


def _set_up_releases(p: SecureProvider, keys: Path) -> Any:
    made = cli_json(p, "releases", "keys", "init", str(keys))
    res = p.sgw("provider", "releases-init", "--keys", str(keys), "--data-dir", str(p.data_dir))
    assert res.returncode == 0, res.stderr
    assert made["root_fingerprint"] in res.stdout
    p.stop()
    p.start()
    return made


def test_publish_list_fetch_revoke(tmp_path: Path, secure_provider: SecureProvider):
    p = secure_provider
    # Before the operator installs the keys, the provider says what to do.
    r = p.admin().get("/v1/releases")
    assert r.status_code == 404 and "releases-init" in r.json()["message"]

    keys = tmp_path / "keys"
    made = _set_up_releases(p, keys)
    assert made["root_fingerprint"] == root_fingerprint((keys / "root.json").read_bytes())
    for name in ("root.key.pem", "targets.key.pem", "snapshot.key.pem", "timestamp.key.pem"):
        assert os.stat(keys / name).st_mode & 0o777 == 0o600
    installed = sorted(os.listdir(p.data_dir / "releases"))
    assert "root.key.pem" not in installed  # the root key stays offline
    assert {"root.json", "targets.key.pem", "snapshot.key.pem", "timestamp.key.pem"} <= set(
        installed
    )

    bundle = make_bundle(tmp_path, "2.0.0")
    published = cli_json(
        p, "releases", "publish", str(bundle), "--channel", "canary", "--severity", "emergency"
    )
    assert published["version"] == "2.0.0"
    assert published["channel"] == "canary" and published["severity"] == "emergency"
    listed = cli_json(p, "releases", "list")
    assert [(r["version"], r["revoked"]) for r in listed] == [("2.0.0", None)]

    # An activated gateway fetches and verifies it with its signed requests.
    gw = activate(p, p.token, "gw1")
    metadata = tmp_path / "gw" / "updates" / "metadata"
    install_root(metadata, (keys / "root.json").read_bytes())
    with httpx.Client(verify=p.tls, auth=gw.auth(), timeout=30) as http:
        trust = ReleaseTrust(metadata, tmp_path / "gw" / "cache", p.url, http)
        release = trust.fetch("2.0.0")
        assert release.bundle.read_bytes() == bundle.read_bytes()
        assert release.severity == "emergency"

        cli_json(p, "releases", "revoke", "2.0.0")
        try:
            trust.fetch("2.0.0")
        except UpdateRefused as e:
            assert e.reason == "revoked", e
        else:
            raise AssertionError("a revoked release was handed out")
    assert cli_json(p, "releases", "list")[0]["revoked"] is not None


def test_who_may_read_and_publish(tmp_path: Path, secure_provider: SecureProvider):
    p = secure_provider
    _set_up_releases(p, tmp_path / "keys")
    _, token = new_account(p, "tenant")
    tenant = p.client(token)
    # Another account's admin may list, but neither publish nor read the repository.
    assert tenant.get("/v1/releases").status_code == 200
    r = tenant.post("/v1/releases", params={"channel": "stable"}, content=b"x")
    assert r.status_code == 403, r.text
    assert tenant.get("/v1/updates/metadata/timestamp.json").status_code == 403
    # Without credentials: nothing.
    assert p.client().get("/v1/updates/metadata/timestamp.json").status_code == 401
    # Names outside the repository are not found (not a store error).
    for path in ("/v1/updates/metadata/.timestamp.json", "/v1/updates/targets/releases/.x/y"):
        r = p.admin().get(path)
        assert r.status_code == 404, (path, r.text)
    # The API's description documents the routes.
    paths = p.client().get("/openapi.json").json()["paths"]
    for path in (
        "/v1/releases",
        "/v1/releases/{version}/revoke",
        "/v1/updates/metadata/{name}",
        "/v1/updates/targets/{path}",
    ):
        assert path in paths, path
    # The operator may read it (timestamp.json is signed metadata).
    r = p.admin().get("/v1/updates/metadata/timestamp.json")
    assert r.status_code == 200 and json.loads(r.content)["signed"]["_type"] == "timestamp"


def test_a_bad_bundle_is_refused_with_its_reason(tmp_path: Path, secure_provider: SecureProvider):
    p = secure_provider
    _set_up_releases(p, tmp_path / "keys")
    junk = tmp_path / "junk.tar.zst"
    junk.write_bytes(b"not a bundle" * 100)
    res = p.sgw("releases", "publish", str(junk), "--channel", "stable")
    assert res.returncode != 0
    assert "zstd tar" in res.stderr
    bundle = make_bundle(tmp_path, "2.0.0")
    cli_json(p, "releases", "publish", str(bundle), "--channel", "stable")
    again = p.sgw("releases", "publish", str(bundle), "--channel", "stable")
    assert again.returncode != 0 and "already published" in again.stderr
    # Over the cap: refused from the request's head (the gate), the body never read.
    assert body_cap("POST", "/v1/releases") == RELEASE_BODY
    assert RELEASE_BODY.limit == MAX_BUNDLE


def test_activation_pins_the_providers_root(
    tmp_path: Path, secure_provider: SecureProvider, gateway_factory: type[GatewayProcess]
):
    """A real gateway gets the root with its credentials and pins it; `sgw activate`
    shows the fingerprint the operator got from `sgw releases keys init`."""
    p = secure_provider
    made = _set_up_releases(p, tmp_path / "keys")
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f'[remote]\nurl = "{p.url}"\nca = "{p.ca}"\n\n[activation]\npoll_interval = 0.2\n'
    )
    gw = gateway_factory(tmp_path / "gw", ["vol0:16M"], extra_args=["--config", str(conf)])
    gw.start()
    key = subprocess.run(
        [SGW, "gateway", "activation-key", "--data-dir", str(gw.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    act = cli_json(p, "activate", key, "--name", "edge", "--code", code_of(gw))
    assert act["release_root_fingerprint"] == made["root_fingerprint"]
    pinned = gw.data_dir / "updates" / "metadata" / "root.json"
    wait_for(pinned.exists, timeout=20, what="the pinned root")
    assert root_fingerprint(pinned.read_bytes()) == made["root_fingerprint"]
    assert gw.stop() == 0


def test_a_starting_provider_re_signs_an_expiring_timestamp(
    tmp_path: Path, secure_provider: SecureProvider
):
    """The refresh task runs in the provider's process: a timestamp signed 20 hours ago
    (4 left of its day) is re-signed by its first pass."""
    p = secure_provider
    _set_up_releases(p, tmp_path / "keys")
    p.stop()
    keys = load_online_keys(str(p.data_dir))
    assert keys is not None
    engine = schema.make_engine(f"sqlite:///{p.data_dir / 'provider.db'}")
    try:
        old = ReleaseRepository(
            DirectoryStore(str(p.data_dir / "objects")),
            schema.session_factory(engine),
            keys,
            str(p.data_dir / "releases" / "lock"),
            clock=lambda: datetime.now(UTC) - timedelta(hours=20),
        )
        assert old.resign("timestamp") == ["timestamp"]
    finally:
        engine.dispose()
    version_then = int(_timestamp(p)["signed"]["version"])
    p.start()

    def re_signed() -> bool:
        return int(_timestamp(p)["signed"]["version"]) > version_then

    wait_for(re_signed, timeout=30, what="the timestamp re-signed")
    expires = datetime.fromisoformat(_timestamp(p)["signed"]["expires"].replace("Z", "+00:00"))
    assert expires - datetime.now(UTC) > timedelta(hours=23)


def _timestamp(p: SecureProvider) -> Any:
    return json.loads(
        (p.data_dir / "objects" / "updates" / "metadata" / "timestamp.json").read_bytes()
    )
