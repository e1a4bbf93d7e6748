"""An update from the operator's release to the gateway's swap, every part real: a provider
with its release keys installed (`sgw provider releases-init`), a gateway daemon activated
through it (the release root pinned with its credentials), the update agent as its own
process (`python -m sgw.gateway.updates.agent`), the `sgw` commands.

The operator publishes two releases; the newer one's bundle is tampered with in the
provider's object store. `sgw updates now` sends the `update` command over the control
channel; the daemon hands it to the agent, which verifies with TUF and refuses the tampered
release (nothing installed, "refused"/"tampered" at the provider). Once it is revoked, the
next `sgw updates now` installs the older one and the daemon swaps to it while a libnbd
client writes and flushes: no I/O error, every flushed block reads back, the provider shows
the swap done with its pause, and the agent runs from the new release afterwards.

The release swapped to is this virtualenv under another version
(tests/fixtures/agent_releases.runnable_slot): the chain is proved here, a change of code
across a swap by the appliance tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sgw import version
from sgw.common.releases import root_fingerprint, tree_digest
from tests.fixtures.agent_releases import make_bundle, runnable_slot
from tests.fixtures.daemons import GatewayProcess, gateway_status, serving
from tests.fixtures.management import SecureProvider, activated_gateway, cli_json
from tests.fixtures.nbd_writer import Writer
from tests.fixtures.update_agent import agent_call, wait_for_agent_socket
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
OLD = version()
GOOD, BAD = "2.0.0", "2.0.1"
VENV = str(Path(sys.executable).parent.parent)


def status(p: SecureProvider, gateway_id: str) -> dict[str, Any]:
    """The gateway's row of `sgw updates status`."""
    doc = cli_json(p, "updates", "status", "--gateway", gateway_id)
    rows = doc["gateways"] if isinstance(doc, dict) else doc
    (row,) = [r for r in rows if r.get("gateway_id", r.get("id")) == gateway_id]
    return dict(row)


@pytest.fixture
def agent_env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield {"procs": procs}
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    # The daemon the swap started is nobody's child here: stop it too.
    for pid in serving(tmp_path / "gw"):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not serving(tmp_path / "gw"), 60, what="the gateway daemons to stop")


def test_a_published_release_reaches_the_gateway_and_a_tampered_one_does_not(
    tmp_path: Path,
    secure_provider: SecureProvider,
    gateway_factory: type[GatewayProcess],
    agent_env: dict[str, Any],
) -> None:
    p = secure_provider
    keys = tmp_path / "keys"
    made = cli_json(p, "releases", "keys", "init", str(keys))
    res = p.sgw("provider", "releases-init", "--keys", str(keys), "--data-dir", str(p.data_dir))
    assert res.returncode == 0, res.stderr
    p.stop()
    p.start()

    # The appliance's slots: `current` names this virtualenv as the running release.
    root = tmp_path / "opt"
    (root / "releases").mkdir(parents=True)
    os.symlink(VENV, root / "releases" / OLD)
    os.symlink(root / "releases" / OLD, root / "current")
    sock = str(tmp_path / "run" / "update-agent.sock")
    updates = f'\n[updates]\nsocket = "{sock}"\nroot = "{root}"\ncheck_interval = 3600\n'
    gw, gateway_id = activated_gateway(tmp_path, p, gateway_factory, ["vol0:64M"], extra=updates)
    # The provider's release root came with the credentials and is pinned.
    pinned = gw.data_dir / "updates" / "metadata" / "root.json"
    assert root_fingerprint(pinned.read_bytes()) == made["root_fingerprint"]

    # The agent, as the appliance runs it: the gateway's configuration and data directory.
    conf = tmp_path / "agent.toml"
    conf.write_text(f'data_dir = "{gw.data_dir}"\n' + (tmp_path / "gateway.toml").read_text())
    with open(tmp_path / "agent.stderr", "ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "sgw.gateway.updates.agent", "--config", str(conf)],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    agent_env["procs"].append(agent)
    wait_for_agent_socket(sock)

    # Two releases; the newer one's bundle is altered in the provider's store after it was
    # signed (what an intruder with write access to the bucket would do).
    for v in (GOOD, BAD):
        bundle, _ = make_bundle(runnable_slot(tmp_path / "build" / v, v), v, tmp_path / "dist")
        cli_json(p, "releases", "publish", str(bundle), "--channel", "stable")
    (stored,) = [f for f in (p.data_dir / "objects").rglob(f"*sgw-{BAD}.tar.zst") if f.is_file()]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    cli_json(p, "updates", "now", gateway_id)
    wait_for(lambda: status(p, gateway_id).get("state") == "refused", 120, what="the refusal")
    row = status(p, gateway_id)
    assert BAD in json.dumps(row) and "tampered" in json.dumps(row), row
    assert not (root / "releases" / BAD).exists()
    assert not [n for n in os.listdir(root / "releases") if n.endswith(".partial")]
    assert gateway_status(gw)["daemon"]["version"] == OLD

    # Revoked, it is out of the plan; the next `now` brings the good one, under I/O.
    cli_json(p, "releases", "revoke", BAD)
    writer = Writer(gw.uri(), 256, seed=17)
    writer.start()
    wait_for(lambda: len(writer.flushed) > 20 or bool(writer.errors), 60, what="writes")
    cli_json(p, "updates", "now", gateway_id)
    wait_for(lambda: status(p, gateway_id).get("state") in ("done", "failed"), 300, what="swap")
    writer.stop_and_verify()
    row = status(p, gateway_id)
    assert row["state"] == "done", row
    assert GOOD in json.dumps(row), row
    pauses = [v for k, v in row.items() if "pause" in k and v is not None]
    assert pauses and all(float(x) > 0 for x in pauses), row
    assert gateway_status(gw)["daemon"]["version"] == GOOD
    assert os.readlink(root / "current") == str(root / "releases" / GOOD)
    slot = root / "releases" / GOOD
    manifest = json.loads((slot / "sgw-release.json").read_text())
    assert tree_digest(slot) == manifest["tree_sha256"]
    # The agent re-executed itself from the new release (same process, new version).
    wait_for(
        lambda: agent_call(sock, {"op": "status"}).get("version") == GOOD,
        60,
        what="the agent on the new release",
    )
    assert agent.poll() is None
