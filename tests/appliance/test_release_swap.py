"""The blue-green swap on the booted appliance: a second release of the same code (built
with ``image/build-release`` under a local version, copied in with scp and unpacked into
/opt/sgw/releases/) takes over from the image's with ``sudo /opt/sgw/current/bin/sgw
gateway upgrade --to SLOT`` while an initiator on the host writes (FUA) and reads back
through iSCSI with CHAP; then the image's release takes over again the same way.

Each swap must leave: no failed or mismatched command and none slower than a Linux
initiator's 15 s timeout (libiscsi has none of its own, so each command's time is
measured: qemu-io reports it), the data written before it intact, one daemon, running the
new slot, a child of the service's main process, the supervisor (no restart), ``current``
naming the new slot, LIO's targets as they were, and no I/O error on the guest's nbd
devices. Runs before test_shutdown.py (which ends the session's appliance); in `make
test-appliance` only (marked appliance_full)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fixtures.appliance import DIST, ROOT, Appliance
from tests.fixtures.iscsi_loop import (
    KEPT_LENGTH,
    KEPT_OFFSET,
    KEPT_PATTERN,
    SCSI_TIMEOUT,
    IscsiLoop,
)
from tests.fixtures.waiting import wait_for

# In make test-appliance only: make test's subset proves the swap on the appliance through
# the update agent (test_release_updates.py: the same checks under iSCSI I/O); this one
# adds the manual `sgw gateway upgrade` and the swap back.
pytestmark = [pytest.mark.appliance, pytest.mark.appliance_full, pytest.mark.timeout(900)]

RELEASES = "/opt/sgw/releases"
CURRENT = "/opt/sgw/current"
# The swap under TCG: green's start (imports, the log's index) takes tens of seconds.
SWAP_TIMEOUT = 300.0


@dataclass(frozen=True)
class Releases:
    first: str  # the image's release
    second: str  # the same code under a local version, unpacked on the appliance
    install_seconds: float


@pytest.fixture(scope="module")
def releases(appliance: Appliance) -> Releases:
    """The second release slot: built on the host, copied in with scp, unpacked."""
    first = str(json.loads((DIST / "manifest.json").read_text())["version"])
    second = first + (".swap1" if "+" in first else "+swap1")
    start = time.monotonic()
    packed = appliance.workdir / f"sgw-{second}.tar.zst"
    res = subprocess.run(
        [str(ROOT / "image" / "build-release"), "--version", second, str(packed)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, f"image/build-release: {res.stderr[-2000:]}"
    res = subprocess.run(
        ["scp", "-q", "-F", str(appliance.ssh_config), str(packed), "appliance:release.tar.zst"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, f"scp: {res.stderr}"
    appliance.ssh(
        "sudo tar --zstd -xf release.tar.zst -C / && rm release.tar.zst && "
        f"test -x {RELEASES}/{second}/bin/sgw",
        timeout=600,
    )
    return Releases(first, second, time.monotonic() - start)


def daemons(appliance: Appliance) -> list[int]:
    """The pids of every ``sgw gateway serve`` process on the appliance."""
    # [s]: the pattern does not match the shell that runs pgrep.
    out = appliance.ssh("pgrep -f 'bin/sgw gateway [s]erve' || true").stdout
    return sorted(int(pid) for pid in out.split())


def swap_to(appliance: Appliance, loop: IscsiLoop, version: str) -> dict[str, Any]:
    """``sgw gateway upgrade --to`` the slot of ``version`` while ``loop`` runs; checks
    everything a swap must leave; returns the answer."""
    slot = f"{RELEASES}/{version}"
    before = appliance.service()
    targets = appliance.targets()
    errors = appliance.nbd_io_errors()
    loop.wait_runs(2)
    start = time.monotonic()
    res = appliance.ssh(
        f"sudo {CURRENT}/bin/sgw gateway upgrade --to {slot} --output json",
        check=False,
        timeout=SWAP_TIMEOUT,
    )
    end = time.monotonic()
    if res.returncode != 0:
        journal = appliance.ssh("sudo journalctl -u sgw-gateway -n 80 --no-pager", check=False)
        raise AssertionError(f"upgrade: {res.stderr}\n{journal.stdout}")
    answer: dict[str, Any] = json.loads(res.stdout)
    loop.wait_runs(3)
    # The initiator was at work across the swap, and not one command failed or stalled.
    assert loop.spanning(start, end) >= 1
    assert not loop.errors, loop.errors[:3]
    # The new daemon serves from the slot and is the service's main process.
    assert answer["version"] == version
    pid = int(answer["pid"])
    wait_for(lambda: daemons(appliance) == [pid], 30, what="the previous daemon to exit")
    argv = appliance.ssh(f"sudo cat /proc/{pid}/cmdline").stdout.split("\0")
    assert argv[:2] == [f"{slot}/bin/python", f"{slot}/bin/sgw"], argv
    # The service's main process is still the supervisor, now the new daemon's parent.
    after = appliance.service()
    assert after["MainPID"] == before["MainPID"], (before, after)
    ppid = appliance.ssh(f"ps -o ppid= -p {pid}").stdout.strip()
    assert ppid == after["MainPID"], (ppid, after)
    assert (after["ActiveState"], after["SubState"]) == ("active", "running"), after
    assert after["NRestarts"] == before["NRestarts"], (before, after)
    # current names the new slot; the previous one stays.
    assert answer["current"]["switched"] is True, answer
    assert appliance.ssh(f"readlink {CURRENT}").stdout.strip() == slot
    assert appliance.ssh(f"{CURRENT}/bin/sgw --version").stdout.strip() == f"sgw {version}"
    previous = answer["current"]["previous"]
    assert appliance.ssh(f"test -x {previous}/bin/sgw", check=False).returncode == 0
    # LIO's targets untouched; no I/O error on the nbd devices.
    assert appliance.targets() == targets
    assert appliance.nbd_io_errors() == errors
    return answer


def test_swap_to_another_release_and_back_under_iscsi_io(
    appliance: Appliance, vol0: str, releases: Releases
) -> None:
    qemu_io = shutil.which("qemu-io")
    assert qemu_io is not None
    url = appliance.iscsi_url(vol0)
    assert appliance.ssh(f"readlink {CURRENT}").stdout.strip() == f"{RELEASES}/{releases.first}"
    assert appliance.nbd_io_errors() == [], "I/O errors on nbd before the swaps"
    kept = ["-c", f"write -f -P {KEPT_PATTERN:#x} {KEPT_OFFSET} {KEPT_LENGTH}"]
    verify_kept = ["-c", f"read -P {KEPT_PATTERN:#x} {KEPT_OFFSET} {KEPT_LENGTH}"]
    res = subprocess.run(
        [qemu_io, "-f", "raw", *kept, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr

    loop = IscsiLoop(qemu_io, url).start()
    answers = []
    try:
        for version in (releases.second, releases.first):
            answers.append(swap_to(appliance, loop, version))
            res = subprocess.run(
                [qemu_io, "-f", "raw", *verify_kept, url],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert res.returncode == 0 and "failed" not in res.stdout, res.stdout
    finally:
        loop.stop()
    assert not loop.errors, loop.errors[:3]
    slowest = max(loop.latencies)
    pauses = [a["pause_s"] for a in answers]
    print(
        f"appliance swap: release {releases.second} installed in "
        f"{releases.install_seconds:.1f} s; pauses {pauses} s; {len(loop.latencies)} "
        f"iSCSI commands, slowest {slowest:.2f} s"
    )
    assert slowest < SCSI_TIMEOUT
    assert all(isinstance(p, float) and p > 0 for p in pauses), pauses
