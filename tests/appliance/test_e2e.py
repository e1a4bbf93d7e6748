"""End to end: the host's iSCSI initiators (libiscsi, QEMU) talk to LIO in the booted
appliance, through /dev/nbdN, to the gateway daemon, which uploads to the provider on
the host. Runs first (the modules run in name order; test_shutdown.py last)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.appliance.conftest import (
    CHAP_SECRET,
    INITIATOR,
    TARGET_SECRET,
    VOLUME_SIZE,
    Appliance,
)

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(900)]

HERE = Path(__file__).parent
# The iscsi-test-cu subset (SCSI suite); see iscsi-test-cu.known-failures.
CU_TESTS = [
    *("Inquiry", "ReadCapacity10", "ReadCapacity16", "TestUnitReady"),
    *("Read10", "Read16", "Write10", "Write16", "WriteSame10", "WriteSame16"),
    *("Unmap", "SynchronizeCache10", "SynchronizeCache16", "ProutRegister"),
    *("Verify10", "CompareAndWrite", "Reserve6"),
]
MIB = 1 << 20
PATTERN = 0xA5
# The baseline: LIO over a plain nbdkit export on these machines (shared/baselines).
BASELINE = HERE.parents[2] / "shared/baselines/iscsi-test-cu-ALL-lio-over-nbdkit.failures"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make setup` (scripts/install-host-deps)")
    return path


def run(argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def chap_url(box: Appliance, volume: str, secret: str = CHAP_SECRET, **query: str) -> str:
    url = f"iscsi://{INITIATOR}%{secret}@127.0.0.1:{box.iscsi_port}/{box.iqn(volume)}/0"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def test_boots_and_exports_its_volumes(appliance: Appliance) -> None:
    print(
        f"appliance: ssh after {appliance.boot_seconds:.1f} s, "
        f"iSCSI targets after {appliance.ready_seconds:.1f} s"
    )
    targets = {t["volume"]: t for t in appliance.lio_status()["targets"]}
    assert sorted(targets) == ["vol0", "vol1"]
    vol0, vol1 = targets["vol0"], targets["vol1"]
    assert vol0["iqn"] == appliance.iqn("vol0") and vol0["device"].startswith("/dev/nbd")
    assert vol0["tpg_attributes"]["generate_node_acls"] == "0"
    assert vol0["tpg_attributes"]["authentication"] == "1"
    assert vol0["initiators"] == [{"initiator": INITIATOR, "chap": True, "mutual": True}]
    assert vol1["tpg_attributes"]["generate_node_acls"] == "1"
    assert int(vol0["parameters"]["MaxRecvDataSegmentLength"]) >= 262144
    # Requests of up to 1 MiB reach the gateway in one piece.
    dev = vol0["device"].rsplit("/", 1)[1]
    kb = appliance.ssh(f"cat /sys/block/{dev}/queue/max_sectors_kb").stdout
    assert int(kb) >= 512


def test_inquiry_and_capacity(appliance: Appliance) -> None:
    url = appliance.iscsi_url("vol1")
    inq = run([tool("iscsi-inq"), url])
    assert inq.returncode == 0, inq.stderr
    assert "DIRECT_ACCESS" in inq.stdout
    cap = run([tool("iscsi-readcapacity16"), url])
    assert cap.returncode == 0, cap.stderr
    assert f"Total size:{VOLUME_SIZE}" in cap.stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap.stdout
    assert "LBPME:1" in cap.stdout  # thin provisioning: UNMAP reaches the gateway


def test_chap_and_acls(appliance: Appliance) -> None:
    inq = tool("iscsi-inq")
    target = appliance.iqn("vol0")
    ok = run([inq, "-i", INITIATOR, chap_url(appliance, "vol0")])
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, ok.stderr
    bad = run([inq, "-i", INITIATOR, chap_url(appliance, "vol0", secret="wrong-secret-99")])
    assert bad.returncode != 0 and "Authentication failure" in bad.stdout + bad.stderr
    stranger = "iqn.2024-01.test.host:stranger"
    other = run([inq, "-i", stranger, chap_url(appliance, "vol0").replace(INITIATOR, stranger)])
    assert other.returncode != 0 and "Authorization failure" in other.stdout + other.stderr
    open_url = appliance.iscsi_url("vol0")
    anonymous = run([inq, "-i", INITIATOR, open_url])
    assert anonymous.returncode != 0
    good = chap_url(appliance, "vol0", target_user=target, target_password=TARGET_SECRET)
    mutual = run([inq, "-i", INITIATOR, good])
    assert mutual.returncode == 0, mutual.stderr
    fake = chap_url(appliance, "vol0", target_user=target, target_password="not-the-target1")
    forged = run([inq, "-i", INITIATOR, fake])
    assert forged.returncode != 0 and "CHAP_R" in forged.stdout + forged.stderr


def qemu_io(box: Appliance, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io on vol0 through QEMU's iSCSI driver, logged in with CHAP."""
    opts = ",".join(
        [
            "driver=iscsi",
            "transport=tcp",
            f"portal=127.0.0.1:{box.iscsi_port}",
            f"target={box.iqn('vol0')}",
            "lun=0",
            f"user={INITIATOR}",
            f"password={CHAP_SECRET}",
            f"initiator-name={INITIATOR}",
        ]
    )
    argv = [tool("qemu-io"), "--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    return run(argv, timeout=300)


def test_64mib_write_and_read_verify_through_iscsi(appliance: Appliance) -> None:
    start = time.monotonic()
    res = qemu_io(appliance, f"write -P {PATTERN:#x} 0 64M", f"read -P {PATTERN:#x} 0 64M")
    seconds = time.monotonic() - start
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, (
        res.stdout[-2000:] + res.stderr[-2000:]
    )
    assert res.stdout.count("wrote 67108864/67108864") == 1
    assert res.stdout.count("read 67108864/67108864") == 1
    print(f"qemu-io: 64 MiB written and read back over iSCSI in {seconds:.1f} s")
    # The same bytes are what the gateway serves on the appliance's /dev/nbdN.
    device = {t["volume"]: t for t in appliance.lio_status()["targets"]}["vol0"]["device"]
    guest = appliance.ssh(f"sudo dd if={device} iflag=direct bs=1M count=64 status=none | md5sum")
    assert guest.stdout.split()[0] == hashlib.md5(bytes([PATTERN]) * (64 * MIB)).hexdigest()


def test_data_reaches_the_provider(appliance: Appliance) -> None:
    """The destager uploads what was written (through guestfwd) to the provider."""
    objects = appliance.provider.data_dir / "objects"
    deadline = time.monotonic() + 180
    count = 0
    while time.monotonic() < deadline:
        count = sum(1 for p in objects.rglob("*") if p.is_file()) if objects.exists() else 0
        if count:
            break
        time.sleep(2)
    assert count > 0, f"no chunk at the provider: {appliance.provider.log_text()}"


def test_restart_tears_down_in_order_and_keeps_data(appliance: Appliance) -> None:
    """Stopping the daemon removes the LIO targets, then detaches /dev/nbdN, then stops;
    the next start exports the volumes again with the data written before."""
    since = appliance.ssh("date +%s.%N").stdout.strip()
    appliance.ssh("sudo systemctl restart sgw-gateway", timeout=120)
    deadline = time.monotonic() + 60
    while len(appliance.lio_status()["targets"]) != 2:
        assert time.monotonic() < deadline, "targets not back after a restart"
        time.sleep(1)
    log = appliance.ssh(f"sudo journalctl -u sgw-gateway -o cat --no-pager --since @{since}").stdout
    order = [
        m.group(0)
        for m in re.finditer(
            r"gateway stopping|iSCSI target removed|device detached|"
            r"gateway stopped|iSCSI target created",
            log,
        )
    ]
    first_stop = order.index("gateway stopping")
    stop = order[first_stop : order.index("gateway stopped") + 1]
    assert stop == [
        "gateway stopping",
        "iSCSI target removed",
        "iSCSI target removed",
        "device detached",
        "device detached",
        "gateway stopped",
    ], log[-3000:]
    res = qemu_io(appliance, f"read -P {PATTERN:#x} 0 64M")
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout


def test_activation_page(appliance: Appliance) -> None:
    """Port 80 answers with a one-time activation key while the gateway is not activated."""
    resp = httpx.get(f"http://127.0.0.1:{appliance.http_port}/?activationRegion=test", timeout=30)
    assert resp.status_code == 302
    assert "activationKey=" in resp.headers["location"]


def cu_results(output: str) -> tuple[set[str], set[str]]:
    """Passed and failed tests (``Suite.Test``) from iscsi-test-cu's output, where a
    test's verdict may follow lines of notes (``[SKIPPED] ...``, ``[FAILED] ...``)."""
    passed: set[str] = set()
    failed: set[str] = set()
    parts = re.split(r"^(Suite: \S+|  Test: \S+ \.\.\.|Run Summary:)", output, flags=re.M)
    suite = ""
    for head, body in zip(parts[1::2], parts[2::2], strict=True):
        if head.startswith("Suite: "):
            suite = head.split()[1]
        elif head.startswith("  Test: "):
            name = f"{suite}.{head.split()[1]}"
            # The verdict is the first bare word; "[FAILED] ..." lines are notes, and
            # notes of the next suite's set-up may follow a verdict.
            verdict = re.search(r"(?<!\[)\b(passed|FAILED)\b(?!\])", body)
            if verdict is not None:
                (passed if verdict.group(1) == "passed" else failed).add(name)
    return passed, failed


def known_failures() -> set[str]:
    lines = (HERE / "iscsi-test-cu.known-failures").read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def test_known_failures_are_baseline_failures() -> None:
    """Only what also fails for LIO over a plain nbdkit export may be a known failure."""
    if not BASELINE.exists():
        pytest.skip(f"no baseline at {BASELINE}")
    baseline = set(BASELINE.read_text().split())
    assert known_failures() <= baseline


def test_iscsi_test_cu_subset(appliance: Appliance) -> None:
    tests = ",".join(f"SCSI.{t}" for t in CU_TESTS)
    start = time.monotonic()
    res = run([tool("iscsi-test-cu"), "-d", f"--test={tests}", appliance.iscsi_url("vol1")], 600)
    seconds = time.monotonic() - start
    passed, failed = cu_results(res.stdout)
    print(f"iscsi-test-cu: {len(passed)} passed, {len(failed)} failed in {seconds:.0f} s")
    assert passed, res.stdout[-3000:] + res.stderr[-3000:]
    unexpected = failed - known_failures()
    assert not unexpected, f"new failures: {sorted(unexpected)}\n{res.stdout[-4000:]}"
    assert res.returncode in (0, 1)
