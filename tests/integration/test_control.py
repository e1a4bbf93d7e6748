"""The control channel end to end with real processes: `sgw provider init` and `serve`
(HTTPS), an activated `sgw gateway serve` holding its long-poll, and the admin CLI
sending it commands: volumes created (stored, cached, from a snapshot) and deleted,
snapshots, iSCSI access rules, bandwidth limits, its local state, a diagnostics bundle;
refusals and an offline gateway give clear errors and leave nothing behind."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import tarfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.fixtures.daemons import SGW, GatewayProcess, need
from tests.fixtures.management import SecureProvider, activated_gateway, cli_json, online
from tests.fixtures.waiting import wait_for

MIB = 1 << 20


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[bytes]:
    args = [need("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, timeout=60, check=False)


def volume_names(p: SecureProvider) -> set[str]:
    return {v["name"] for v in p.admin().get("/v1/volumes").json()}


def test_console_commands_run_on_the_gateway(
    tmp_path: Path,
    secure_provider: SecureProvider,
    gateway_factory: type[GatewayProcess],
) -> None:
    p = secure_provider
    # A long idle time: what is written stays in the write log until something drains it.
    gw, gid = activated_gateway(tmp_path, p, gateway_factory, ["local0:16M"], idle=30.0)

    # A stored volume, created through the console: served over NBD at once.
    vol = cli_json(p, "volumes", "create", "vol1", "32M", "--gateway", gid, "--mode", "stored")
    assert (vol["name"], vol["gateway_id"], vol["mode"], vol["status"]) == (
        "vol1", gid, "stored", "AVAILABLE"
    )  # fmt: skip
    vid = vol["id"]
    done = qemu_io(gw.uri("vol1"), "write -P 0x5a 0 4M")
    assert done.returncode == 0, done.stderr
    # A snapshot taken on the gateway holds exactly what was written before it.
    snap = cli_json(p, "snapshots", "create", vid, "--description", "after 0x5a")
    assert snap["status"] == "completed" and snap["volume_id"] == vid
    sid = snap["id"]
    # Volumes from it, cached and stored (restored lazily), read the same data.
    cached = cli_json(
        p, "volumes", "create", "vol2", "32M", "--gateway", gid, "--from-snapshot", sid
    )
    assert cached["mode"] == "cached"
    stored = cli_json(p, "volumes", "create", "vol3", "32M", "--gateway", gid, "--mode",
                      "stored", "--from-snapshot", sid)  # fmt: skip
    assert stored["mode"] == "stored" and stored["status"] == "RESTORING"
    for name in ("vol2", "vol3"):
        check = qemu_io(gw.uri(name), "read -P 0x5a 0 4M", "read -P 0 4M 4M")
        assert check.returncode == 0 and b"failed" not in check.stdout, (name, check.stdout)

    state = cli_json(p, "gateways", "local-state", gid)
    assert {v["name"] for v in state["volumes"]} == {"local0", "vol1", "vol2", "vol3"}
    table = p.sgw("gateways", "local-state", gid)
    assert table.returncode == 0 and "vol3" in table.stdout and "write log" in table.stdout

    # Bandwidth limits change at once and are kept for the next start.
    limits = cli_json(p, "gateways", "bandwidth", gid, "--upload", "10M", "--download", "20M")
    assert limits == {"upload": 10 * MIB, "download": 20 * MIB}
    assert json.loads((gw.data_dir / "bandwidth.json").read_text()) == limits

    # CHAP credentials reach the gateway's data directory, readable by its owner only.
    chap = subprocess.run(
        [SGW, "volumes", "chap-set", vid, "--initiator", "iqn.2024-01.test:host", "--mutual"],
        input="initiator-pw1\ntarget-pw-22\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=p.cli_env(),
        check=False,
    )
    assert chap.returncode == 0, chap.stderr
    chap_file = gw.data_dir / "chap.json"
    assert stat.S_IMODE(chap_file.stat().st_mode) == 0o600
    assert json.loads(chap_file.read_text())["volumes"]["vol1"] == [
        {
            "initiator": "iqn.2024-01.test:host",
            "secret": "initiator-pw1",
            "target_secret": "target-pw-22",
        }
    ]

    # A diagnostics bundle: logs, state and configuration, no secrets.
    bundle_path = tmp_path / "diag.tar.gz"
    diag = cli_json(p, "gateways", "diagnostics", gid, "--file", str(bundle_path))
    assert diag["size"] == bundle_path.stat().st_size
    assert stat.S_IMODE(bundle_path.stat().st_mode) == 0o600
    with tarfile.open(bundle_path) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m) for m in tar.getmembers()}
        contents = {n: f.read() if f else b"" for n, f in members.items()}
    assert set(contents) >= {"status.json", "config.json", "volumes.json", "logs.jsonl"}
    assert b"command received" in contents["logs.jsonl"]
    everything = b"".join(contents.values())
    identity = (gw.data_dir / "identity.key").read_bytes()
    for secret in (b"initiator-pw1", b"target-pw-22", identity, identity.hex().encode()):
        assert secret not in everything
    assert json.loads(contents["status.json"])["volumes"]

    # Deleting a volume whose data is still in the write log is refused, unless drained.
    done = qemu_io(gw.uri("vol1"), "write -P 0x77 0 1M")
    assert done.returncode == 0, done.stderr
    refused = p.sgw("volumes", "delete", vid)
    assert refused.returncode == 1 and "write log still holds" in refused.stderr
    assert "vol1" in volume_names(p)
    assert cli_json(p, "volumes", "delete", vid, "--drain")["ok"]
    assert "vol1" not in volume_names(p)
    assert not (gw.data_dir / "volumes" / "vol1.img").exists()
    assert "vol1" not in json.loads((gw.data_dir / "volumes.json").read_text())

    # The gateway refuses a volume it has already (configured locally): the provider's
    # record made for the command goes again.
    clash = p.sgw("volumes", "create", "local0", "16M", "--gateway", gid)
    assert clash.returncode == 1 and "exists on this gateway" in clash.stderr, clash.stderr
    assert "local0" not in volume_names(p)

    # Volumes made at runtime come back after a restart; the limits too.
    assert gw.stop() == 0
    gw.start()
    wait_for(lambda: online(p, gid), what="the gateway back online")
    state = cli_json(p, "gateways", "local-state", gid)
    assert {v["name"] for v in state["volumes"]} == {"local0", "vol2", "vol3"}
    assert state["gateway"]["bandwidth"] == limits
    check = qemu_io(gw.uri("vol3"), "read -P 0x5a 0 4M")
    assert check.returncode == 0 and b"failed" not in check.stdout

    # An offline gateway: a clear error at once (exit 6), nothing left behind.
    assert gw.stop() == 0
    wait_for(lambda: not online(p, gid), timeout=15, what="the gateway offline")
    before = cli_json(p, "gateways", "commands", gid, "--limit", "100")
    offline = p.sgw("volumes", "create", "vol9", "16M", "--gateway", gid)
    assert offline.returncode == 6 and "offline" in offline.stderr
    # At once: the provider refused it before queueing anything (its own words, not the
    # CLI's "did not take the command before its deadline" after a wait).
    assert "no control server holds its connection" in offline.stderr, offline.stderr
    assert "vol9" not in volume_names(p)
    commands = cli_json(p, "gateways", "commands", gid, "--limit", "100")
    assert [c["id"] for c in commands] == [c["id"] for c in before]
    assert commands and all(c["status"] in ("succeeded", "failed") for c in commands)
    assert "request refused" not in p.log_text()


def test_commands_wait_for_a_gateway_that_comes_back(
    tmp_path: Path,
    secure_provider: SecureProvider,
    gateway_factory: type[GatewayProcess],
) -> None:
    """CHAP credentials set while the gateway is offline are kept for it and delivered
    when it reconnects; a command that times out while the gateway is away is
    cancelled and never runs."""
    p = secure_provider
    gw, gid = activated_gateway(tmp_path, p, gateway_factory, ["local0:16M"])
    vid = cli_json(p, "volumes", "create", "v", "16M", "--gateway", gid)["id"]
    assert gw.stop() == 0
    wait_for(lambda: not online(p, gid), timeout=15, what="the gateway offline")
    chap = subprocess.run(
        [SGW, "volumes", "chap-set", vid, "--initiator", "iqn.2024-01.test:a", "--timeout", "1"],
        input="offline-secret\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=p.cli_env(),
        check=False,
    )
    assert chap.returncode == 0 and "gets them when it is back" in chap.stderr, chap.stderr
    gw.start()
    chap_file = gw.data_dir / "chap.json"
    wait_for(chap_file.exists, what="the CHAP credentials delivered late")
    assert json.loads(chap_file.read_text())["volumes"]["v"][0]["secret"] == "offline-secret"
    wait_for(lambda: online(p, gid), what="the gateway back online")
    cmds = cli_json(p, "gateways", "commands", gid)
    assert cmds[0]["type"] == "sync_chap" and cmds[0]["status"] == "succeeded"

    # A gateway that holds its connection but does not answer (stopped, not dead): the
    # command times out, and the gateway refuses to start it later, past its deadline.
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGSTOP)
    try:
        late = p.sgw("gateways", "bandwidth", gid, "--upload", "1M", "--timeout", "2")
        assert late.returncode == 6 and "no answer" in late.stderr, late.stderr
        # It gave up on its own deadline, not the default one: the CLI says so, and the
        # command it sent carries that deadline.
        assert "within 2 s" in late.stderr, late.stderr
        sent = p.admin().get(f"/v1/gateways/{gid}/commands").json()[0]
        assert sent["type"] == "set_bandwidth"
        ttl = datetime.fromisoformat(sent["expires"]) - datetime.fromisoformat(sent["created"])
        assert ttl == timedelta(seconds=2), sent
    finally:
        gw.proc.send_signal(signal.SIGCONT)

    def refused_late() -> bool:
        cmd = cli_json(p, "gateways", "commands", gid)[0]
        return cmd["type"] == "set_bandwidth" and cmd["status"] in ("failed", "expired")

    wait_for(refused_late, timeout=60, what="the late command refused")
    assert not (gw.data_dir / "bandwidth.json").exists()
    assert gw.stop() == 0


def test_iscsi_access_rules_reach_the_gateway_and_close_with_the_last(
    tmp_path: Path,
    secure_provider: SecureProvider,
    gateway_factory: type[GatewayProcess],
) -> None:
    """Each access change at the provider reaches the gateway's chap.json through
    sync_chap: initiators without CHAP, with CHAP, the open flag; removing the last rule
    takes the volume out of the file (closed). What the gateway reports in a describe
    (here: nothing is exported over iSCSI, so nothing is legacy open) corrects the
    provider's record of a legacy open volume."""
    p = secure_provider
    gw, gid = activated_gateway(tmp_path, p, gateway_factory, ["local0:16M"])
    vid = cli_json(p, "volumes", "create", "vol1", "16M", "--gateway", gid)["id"]
    chap_file = gw.data_dir / "chap.json"

    def access() -> str:
        rows = {v["id"]: v for v in cli_json(p, "volumes", "list")}
        return str(rows[vid]["access"])

    def on_gateway() -> dict[str, Any]:
        return dict(json.loads(chap_file.read_text()))

    assert access() == "closed" and not chap_file.exists()
    added = cli_json(p, "volumes", "acl-add", vid, "--initiator", "iqn.2024-01.test:plain")
    assert added["initiator"] == "iqn.2024-01.test:plain"
    doc = on_gateway()
    assert doc["version"] == 2 and doc["initiators"] == {"vol1": ["iqn.2024-01.test:plain"]}
    assert stat.S_IMODE(chap_file.stat().st_mode) == 0o600
    chap = subprocess.run(
        [SGW, "volumes", "chap-set", vid, "--initiator", "iqn.2024-01.test:host"],
        input="initiator-pw1\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=p.cli_env(),
        check=False,
    )
    assert chap.returncode == 0, chap.stderr
    assert on_gateway()["volumes"]["vol1"][0]["initiator"] == "iqn.2024-01.test:host"
    assert access() == "chap 1, acl 1"
    described = cli_json(p, "volumes", "describe", vid)
    assert described["access"] == "chap 1, acl 1"
    assert [a["initiator"] for a in described["acl"]] == ["iqn.2024-01.test:plain"]

    opened = p.sgw("volumes", "set-open", vid, "--open")
    assert opened.returncode == 0 and "is OPEN" in opened.stderr, opened.stderr
    assert on_gateway()["open"] == ["vol1"] and access() == "OPEN"
    listing = p.sgw("volumes", "list")
    assert "1 volume(s) OPEN" in listing.stderr, listing.stderr
    assert p.sgw("volumes", "set-open", vid, "--closed").returncode == 0
    assert on_gateway()["open"] == []

    # The last rule removed: the volume leaves the gateway's file, closed.
    assert p.sgw("volumes", "acl-delete", vid, "iqn.2024-01.test:plain").returncode == 0
    assert p.sgw("volumes", "chap-delete", vid, "iqn.2024-01.test:host").returncode == 0
    doc = on_gateway()
    assert "vol1" not in doc["volumes"] and "vol1" not in doc["initiators"]
    assert access() == "closed"
    commands = cli_json(p, "gateways", "commands", gid, "--limit", "20")
    syncs = [c for c in commands if c["type"] == "sync_chap"]
    assert len(syncs) == 6 and all(c["status"] == "succeeded" for c in syncs)

    # A record of legacy open (as the schema upgrade makes) is corrected by the gateway's
    # report: this gateway exports nothing over iSCSI.
    db = sqlite3.connect(p.data_dir / "provider.db")
    with db:
        db.execute("UPDATE volumes SET iscsi_legacy_open = 1 WHERE id = ?", (vid,))
    db.close()
    assert access() == "OPEN (legacy)"
    state = cli_json(p, "gateways", "local-state", gid)
    reported = {v["name"]: v["iscsi_access"] for v in state["volumes"]}
    assert reported == {"local0": "not exported", "vol1": "not exported"}
    wait_for(lambda: access() == "closed", timeout=30, what="the gateway's report recorded")
