"""Updates from the provider on the booted appliance (issue 17): the host's provider had
its release keys set up before the appliance activated, so the appliance pinned its TUF
root with its credentials. A release built with ``sgw releases build`` is published and
``sgw updates now`` sent; the appliance's update agent (its own unit) fetches it with
signed requests, verifies it with TUF, installs it into a slot and has the daemon swap to
it, while an initiator on the host writes (FUA) and reads back through iSCSI with CHAP.

First the release's bundle is altered in the provider's object store after it was signed:
the agent refuses it ("tampered"), installs nothing and the provider shows the refusal.
With the bundle put back, the next ``now`` brings it: no failed or mismatched SCSI command
and none slower than a Linux initiator's 15 s timeout, the data written before intact, the
appliance on the new release (``current`` names it, the supervisor still the service's main
process), and the provider shows the swap done with its pause. Runs after
test_release_swap.py and before test_shutdown.py (which ends the session's appliance)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.appliance import DIST, Appliance
from tests.fixtures.iscsi_loop import (
    KEPT_LENGTH,
    KEPT_OFFSET,
    KEPT_PATTERN,
    SCSI_TIMEOUT,
    IscsiLoop,
)
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(1500)]

RELEASES = "/opt/sgw/releases"
CURRENT = "/opt/sgw/current"
# Download (some 60 MB through QEMU's user network), unpacking and checking every file,
# then the swap: under TCG each takes tens of seconds.
UPDATE_TIMEOUT = 600.0


def status(appliance: Appliance) -> dict[str, Any]:
    """The appliance's row of ``sgw updates status``."""
    doc = appliance.sgw_json("updates", "status", "--gateway", appliance.gateway_id)
    (row,) = [r for r in doc["gateways"] if r["gateway_id"] == appliance.gateway_id]
    return dict(row)


def journal(appliance: Appliance) -> str:
    res = appliance.ssh(
        "sudo journalctl -u sgw-update-agent -u sgw-gateway -n 60 --no-pager", check=False
    )
    return res.stdout[-6000:]


# Asks the agent's socket for its status (one JSON line each way), on the appliance.
_AGENT_STATUS = b"""
import json, socket
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect("/run/sgw/update-agent.sock")
s.sendall(b'{"op": "status"}\\n')
print(s.makefile().readline())
"""


def agent_version(appliance: Appliance) -> str | None:
    """The version the update agent runs (None while it restarts)."""
    script = base64.b64encode(_AGENT_STATUS).decode()
    res = appliance.ssh(f"echo {script} | base64 -d | sudo {CURRENT}/bin/python -", check=False)
    try:
        return str(json.loads(res.stdout)["agent"]["version"])
    except (ValueError, KeyError, TypeError):
        return None


def wait_state(
    appliance: Appliance, states: tuple[str, ...], version: str, after: str | None = None
) -> dict[str, Any]:
    """The appliance's status once its report for ``version`` is one of ``states`` and
    newer than ``after`` (the last report before the update was asked for)."""

    def reached() -> bool:
        row = status(appliance)
        fresh = after is None or (row.get("last_report") or "") > after
        return fresh and row.get("version") == version and row.get("state") in states

    try:
        wait_for(reached, UPDATE_TIMEOUT, what=f"the update to reach {states}")
    except Exception as exc:
        raise AssertionError(f"{exc}: {status(appliance)}\n{journal(appliance)}") from exc
    return status(appliance)


def test_an_update_is_refused_when_tampered_and_applied_under_iscsi_io(
    appliance: Appliance, vol0: str, tmp_path: Path
) -> None:
    qemu_io = shutil.which("qemu-io")
    assert qemu_io is not None
    first = str(json.loads((DIST / "manifest.json").read_text())["version"])
    version = first + (".upd1" if "+" in first else "+upd1")
    assert appliance.ssh("systemctl is-active sgw-update-agent", check=False).stdout.strip() == (
        "active"
    ), journal(appliance)
    running = appliance.ssh(f"{CURRENT}/bin/sgw --version").stdout.strip().split()[-1]

    # Built on the host, published by the operator.
    start = time.monotonic()
    built = appliance.sgw("releases", "build", "--version", version, str(tmp_path), timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    build_seconds = time.monotonic() - start
    bundle = tmp_path / f"sgw-{version}.tar.zst"
    published = appliance.sgw_json("releases", "publish", str(bundle), "--channel", "stable")
    assert published["version"] == version

    # Altered in the store after it was signed: refused on the appliance, nothing installed.
    (stored,) = [
        f
        for f in (appliance.provider.data_dir / "objects").rglob(f"*sgw-{version}.tar.zst")
        if f.is_file()
    ]
    original = stored.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    stored.write_bytes(bytes(tampered))
    appliance.sgw_json("updates", "now", appliance.gateway_id)
    refused = wait_state(appliance, ("refused", "failed"), version)
    assert refused["state"] == "refused" and "tampered" in (refused["reason"] or ""), refused
    leftovers = appliance.ssh(f"ls -a {RELEASES}").stdout.split()
    assert version not in leftovers and not [n for n in leftovers if n.endswith(".partial")]
    assert appliance.ssh(f"{CURRENT}/bin/sgw --version").stdout.strip() == f"sgw {running}"

    # Put back, it is applied at once while the initiator writes and reads.
    stored.write_bytes(original)
    url = appliance.iscsi_url(vol0)
    kept = ["-c", f"write -f -P {KEPT_PATTERN:#x} {KEPT_OFFSET} {KEPT_LENGTH}"]
    verify_kept = ["-c", f"read -P {KEPT_PATTERN:#x} {KEPT_OFFSET} {KEPT_LENGTH}"]
    res = subprocess.run(
        [qemu_io, "-f", "raw", *kept, url], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    before = appliance.service()
    targets = appliance.targets()
    errors = appliance.nbd_io_errors()
    loop = IscsiLoop(qemu_io, url).start()
    try:
        loop.wait_runs(2)
        start = time.monotonic()
        last = status(appliance)["last_report"]
        appliance.sgw_json("updates", "now", appliance.gateway_id)
        done = wait_state(appliance, ("done", "failed", "refused"), version, after=last)
        end = time.monotonic()
        loop.wait_runs(3)
    finally:
        loop.stop()
    assert done["state"] == "done", f"{done}\n{journal(appliance)}"
    assert not loop.errors, loop.errors[:3]
    assert loop.spanning(start, end) >= 1
    slowest = max(loop.latencies)
    assert slowest < SCSI_TIMEOUT, slowest
    res = subprocess.run(
        [qemu_io, "-f", "raw", *verify_kept, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0 and "failed" not in res.stdout, res.stdout
    # The provider shows the swap's pause; the appliance runs the new release.
    assert isinstance(done["pause_s"], float) and done["pause_s"] > 0, done
    assert appliance.ssh(f"readlink {CURRENT}").stdout.strip() == f"{RELEASES}/{version}"
    assert appliance.ssh(f"{CURRENT}/bin/sgw --version").stdout.strip() == f"sgw {version}"
    after = appliance.service()
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"]
    assert (after["ActiveState"], after["SubState"]) == ("active", "running"), after
    assert appliance.targets() == targets
    assert appliance.nbd_io_errors() == errors
    # The agent re-executed itself from the new release.
    wait_for(lambda: agent_version(appliance) == version, 120, what="the agent on the new release")
    print(
        f"appliance update: release {version} built in {build_seconds:.0f} s, applied in "
        f"{end - start:.0f} s (pause {done['pause_s']:.3f} s); {len(loop.latencies)} iSCSI "
        f"commands, slowest {slowest:.2f} s"
    )
