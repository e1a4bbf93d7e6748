"""End to end: the appliance activated with its key (``sgw activate``), its volumes made
and deleted with the admin CLI through the control channel; the host's iSCSI
initiators (libiscsi, QEMU) log in to LIO in the booted appliance with CHAP (access is
closed by default) and talk, through /dev/nbdN, to the gateway daemon, which uploads to
the provider on the host. Runs first (the modules run in name order; test_shutdown.py
last)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.appliance import CHAP_SECRET, INITIATOR, VOLUME_SIZE, Appliance
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(900)]

HERE = Path(__file__).parent
# The iscsi-test-cu subset (SCSI suites; `iscsi-test-cu --list` names them, and each
# must run); see iscsi-test-cu.known-failures. Under TCG the guest is slow: CU_TESTS
# (make test) take about a minute, CU_MORE (make test-appliance only) three more.
CU_TESTS = [
    *("Inquiry", "ReadCapacity10", "ReadCapacity16", "TestUnitReady"),
    *("Read10", "Write10", "Unmap", "ProutRegister", "Reserve6"),
]
CU_MORE = [
    *("Read16", "Write16", "WriteSame10", "WriteSame16"),
    *("Verify10", "CompareAndWrite"),
]
MIB = 1 << 20
PATTERN = 0xA5
# What fails for LIO over a plain nbdkit export through /dev/nbd0 on these machines (all
# of iscsi-test-cu): a copy of the lab's baseline (shared/baselines).
BASELINE = HERE / "iscsi-test-cu-ALL-lio-over-nbdkit.failures"
# test_chap_and_acls: an initiator with mutual CHAP.
MUTUAL_INITIATOR = "iqn.2024-01.test.host:e2e"
MUTUAL_SECRET = "initiator-sec1"
TARGET_SECRET = "target-secret-22"
# Initiators that have no CHAP credentials.
PLAIN = "iqn.2024-01.test.host:plain"
STRANGER = "iqn.2024-01.test.host:stranger"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make setup` (scripts/install-host-deps)")
    return path


def run(argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def inq(initiator: str, url: str) -> subprocess.CompletedProcess[str]:
    """iscsi-inq as ``initiator`` (a login and an INQUIRY)."""
    return run([tool("iscsi-inq"), "-i", initiator, url], timeout=120)


def refused(res: subprocess.CompletedProcess[str], why: str) -> bool:
    """True if the login failed with LIO's ``why``: "Authorization failure" (no ACL for
    the initiator) or "Authentication failure" (its ACL needs CHAP, or another secret)."""
    return res.returncode != 0 and why in res.stdout + res.stderr


def test_activated_with_its_key(appliance: Appliance) -> None:
    """The page handed out a one-time key; `sgw activate` took it; the appliance fetched
    its credentials (0600), connected its control channel and closed the page."""
    print(
        f"appliance: ssh after {appliance.boot_seconds:.1f} s, activation page after "
        f"{appliance.ready_seconds:.1f} s, activated and online "
        f"{appliance.activated_seconds:.1f} s later"
    )
    assert "activationKey=" in appliance.activation_redirect
    gw = appliance.sgw_json("gateways", "describe", appliance.gateway_id)
    assert gw["name"] == "appliance"
    mode = appliance.ssh("sudo stat -c %a /var/lib/sgw/credentials.json").stdout.strip()
    assert mode == "600"
    with pytest.raises(httpx.TransportError):
        httpx.get(appliance.activation_page_url(), timeout=10)
    assert "request refused" not in appliance.provider.log_text()


def test_the_provider_shows_the_appliances_health(appliance: Appliance) -> None:
    """The appliance's health reporter uploads over its own signed connection once
    activated: the provider shows its newest report (its version and kernel) and its start;
    the firewall's /metrics sets exist and stay empty while [metrics] is off."""
    docs: list[dict[str, Any]] = []

    def reported() -> bool:
        docs.append(appliance.sgw_json("health", appliance.gateway_id))
        return docs[-1]["latest"] is not None

    wait_for(reported, 180, "a health report at the provider", every=2.0)
    latest = docs[-1]["latest"]
    assert latest["kernel"] == appliance.ssh("uname -r").stdout.strip()
    assert latest["version"] and "log_used_percent" in latest["gateway"], latest
    assert "started" in [e["kind"] for e in docs[-1]["events"]], docs[-1]["events"]
    for name in ("metrics_port", "metrics_v4", "metrics_v6"):
        res = appliance.ssh(f"sudo nft list set inet filter {name}", check=False)
        assert res.returncode == 0 and "elements" not in res.stdout, (name, res)
    log = appliance.ssh("sudo journalctl -u sgw-gateway -o cat --no-pager").stdout
    assert "metrics firewall" not in log, log[-2000:]


def test_volumes_created_through_the_control_channel(
    appliance: Appliance, vol0: str, vol1: str
) -> None:
    for name in (vol0, vol1):
        vol = appliance.volumes[name]
        assert (vol["name"], vol["gateway_id"], vol["mode"]) == (
            name, appliance.gateway_id, "stored"
        )  # fmt: skip
        assert vol["status"] == "AVAILABLE"
    targets = appliance.targets()
    assert sorted(targets) == ["vol0", "vol1"]
    t0 = targets["vol0"]
    assert t0["iqn"] == appliance.iqn("vol0") and t0["device"].startswith("/dev/nbd")
    # Its one rule: INITIATOR with CHAP; nobody else, no generated ACLs.
    assert t0["access"] == "chap 1" and t0["open"] is False
    assert t0["initiators"] == [{"initiator": INITIATOR, "chap": True, "mutual": False}]
    assert t0["tpg_attributes"]["generate_node_acls"] == "0"
    assert t0["tpg_attributes"]["authentication"] == "1"
    assert int(t0["parameters"]["MaxRecvDataSegmentLength"]) >= 262144
    # Requests of up to 1 MiB reach the gateway in one piece.
    dev = t0["device"].rsplit("/", 1)[1]
    kb = appliance.ssh(f"cat /sys/block/{dev}/queue/max_sectors_kb").stdout
    assert int(kb) >= 512
    state = appliance.sgw_json("gateways", "local-state", appliance.gateway_id)
    assert {v["name"]: v["iscsi_access"] for v in state["volumes"]} == {
        "vol0": "chap 1",
        "vol1": "chap 1",
    }


def test_inquiry_and_capacity(appliance: Appliance, vol0: str) -> None:
    url = appliance.iscsi_url(vol0)
    found = inq(INITIATOR, url)
    assert found.returncode == 0, found.stderr
    assert "DIRECT_ACCESS" in found.stdout
    cap = run([tool("iscsi-readcapacity16"), "-i", INITIATOR, url])
    assert cap.returncode == 0, cap.stderr
    assert f"Total size:{VOLUME_SIZE}" in cap.stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap.stdout
    assert "LBPME:1" in cap.stdout  # thin provisioning: UNMAP reaches the gateway


def test_no_login_without_a_rule(appliance: Appliance, vol0: str) -> None:
    """Access is closed by default: an initiator without credentials cannot log in to a
    new volume (it has no rule: no ACL at all), nor to one with CHAP, nor to one whose last
    rule was removed; the CHAP initiator gets in while its rule lasts."""
    vol = appliance.create_volume("closed0", 16 * MIB)
    t = appliance.targets()["closed0"]
    assert (t["access"], t["open"], t["initiators"]) == ("closed", False, [])
    assert t["tpg_attributes"]["generate_node_acls"] == "0"
    assert t["tpg_attributes"]["authentication"] == "1"
    anonymous = appliance.iscsi_url("closed0", chap=False)
    with_chap = appliance.iscsi_url("closed0")
    for initiator, url in ((INITIATOR, anonymous), (STRANGER, anonymous), (INITIATOR, with_chap)):
        res = inq(initiator, url)
        assert refused(res, "Authorization failure"), (initiator, url, res.stdout, res.stderr)
    listed = {v["name"]: v for v in appliance.sgw_json("volumes", "list")}
    assert listed["closed0"]["access"] == "closed" and listed[vol0]["access"] == "chap 1"

    # A volume with a CHAP rule: without the credentials, refused.
    res = inq(INITIATOR, appliance.iscsi_url(vol0, chap=False))
    assert refused(res, "Authentication failure"), (res.stdout, res.stderr)
    assert refused(inq(STRANGER, appliance.iscsi_url(vol0, chap=False)), "Authorization failure")

    # One rule: its initiator gets in. The last rule removed: closed again, for everyone.
    appliance.chap_set("closed0")
    ok = inq(INITIATOR, with_chap)
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, ok.stderr
    res = appliance.sgw("volumes", "chap-delete", vol["id"], INITIATOR, "--timeout", "180")
    assert res.returncode == 0, res.stderr
    wait_for(
        lambda: appliance.targets()["closed0"]["initiators"] == [],
        60,
        "the last ACL of closed0 removed",
        every=1.0,
    )
    t = appliance.targets()["closed0"]
    assert t["access"] == "closed" and t["tpg_attributes"]["generate_node_acls"] == "0"
    assert t["tpg_attributes"]["authentication"] == "1"
    for url in (anonymous, with_chap):
        res = inq(INITIATOR, url)
        assert refused(res, "Authorization failure"), (url, res.stdout, res.stderr)
    listed = {v["name"]: v for v in appliance.sgw_json("volumes", "list")}
    assert listed["closed0"]["access"] == "closed"


def qemu_io(
    box: Appliance, volume: str, *commands: str, **opts: str
) -> subprocess.CompletedProcess[str]:
    """qemu-io on a volume through QEMU's iSCSI driver, as INITIATOR with CHAP (``opts``:
    another login)."""
    image = {
        "driver": "iscsi",
        "transport": "tcp",
        "portal": f"127.0.0.1:{box.iscsi_port}",
        "target": box.iqn(volume),
        "lun": "0",
        "initiator-name": INITIATOR,
        "user": INITIATOR,
        "password": CHAP_SECRET,
        **opts,
    }
    argv = [tool("qemu-io"), "--image-opts", ",".join(f"{k}={v}" for k, v in image.items())]
    for command in commands:
        argv += ["-c", command]
    return run(argv, timeout=300)


def test_64mib_write_and_read_verify_through_iscsi(appliance: Appliance, vol0: str) -> None:
    start = time.monotonic()
    res = qemu_io(appliance, vol0, f"write -P {PATTERN:#x} 0 64M", f"read -P {PATTERN:#x} 0 64M")
    seconds = time.monotonic() - start
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, (
        res.stdout[-2000:] + res.stderr[-2000:]
    )
    assert res.stdout.count("wrote 67108864/67108864") == 1
    assert res.stdout.count("read 67108864/67108864") == 1
    print(f"qemu-io: 64 MiB written and read back over iSCSI in {seconds:.1f} s")
    # The same bytes are what the gateway serves on the appliance's /dev/nbdN.
    device = appliance.targets()[vol0]["device"]
    guest = appliance.ssh(f"sudo dd if={device} iflag=direct bs=1M count=64 status=none | md5sum")
    assert guest.stdout.split()[0] == hashlib.md5(bytes([PATTERN]) * (64 * MIB)).hexdigest()


def test_chap_and_acls(appliance: Appliance) -> None:
    """CHAP and mutual CHAP set with `sgw volumes chap-set` reach the appliance's LIO and
    are enforced: the right secret logs in; a wrong secret, an unknown initiator, an
    anonymous login and a forged mutual CHAP answer are refused (in `make test`)."""
    vol = appliance.create_volume("vol2", 16 * MIB)
    res = appliance.sgw(
        *("volumes", "chap-set", vol["id"], "--initiator", MUTUAL_INITIATOR, "--mutual"),
        stdin=f"{MUTUAL_SECRET}\n{TARGET_SECRET}\n",
    )
    assert res.returncode == 0, res.stderr
    mode = appliance.ssh("sudo stat -c %a /var/lib/sgw/chap.json").stdout.strip()
    assert mode == "600"

    def acl() -> bool:
        return bool(appliance.targets()["vol2"]["initiators"])

    wait_for(acl, 60, "the CHAP credentials in LIO", every=1.0)
    t = appliance.targets()["vol2"]
    assert t["tpg_attributes"]["generate_node_acls"] == "0"
    assert t["tpg_attributes"]["authentication"] == "1"
    assert t["initiators"] == [{"initiator": MUTUAL_INITIATOR, "chap": True, "mutual": True}]

    iscsi_inq = tool("iscsi-inq")
    target = appliance.iqn("vol2")
    base = f"iscsi://{MUTUAL_INITIATOR}%{{}}@127.0.0.1:{appliance.iscsi_port}/{target}/0"
    ok = run([iscsi_inq, "-i", MUTUAL_INITIATOR, base.format(MUTUAL_SECRET)])
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, ok.stderr
    bad = run([iscsi_inq, "-i", MUTUAL_INITIATOR, base.format("wrong-secret-99")])
    assert bad.returncode != 0 and "Authentication failure" in bad.stdout + bad.stderr
    url = base.format(MUTUAL_SECRET).replace(MUTUAL_INITIATOR, STRANGER)
    other = run([iscsi_inq, "-i", STRANGER, url])
    assert other.returncode != 0 and "Authorization failure" in other.stdout + other.stderr
    anonymous = run([iscsi_inq, "-i", MUTUAL_INITIATOR, appliance.iscsi_url("vol2", chap=False)])
    assert anonymous.returncode != 0
    mutual = base.format(MUTUAL_SECRET) + f"?target_user={target}&target_password={TARGET_SECRET}"
    assert run([iscsi_inq, "-i", MUTUAL_INITIATOR, mutual]).returncode == 0
    forged = base.format(MUTUAL_SECRET) + f"?target_user={target}&target_password=not-the-target1"
    res = run([iscsi_inq, "-i", MUTUAL_INITIATOR, forged])
    assert res.returncode != 0 and "CHAP_R" in res.stdout + res.stderr
    chap = {"initiator-name": MUTUAL_INITIATOR, "user": MUTUAL_INITIATOR, "password": MUTUAL_SECRET}
    io = qemu_io(appliance, "vol2", "write -P 0x3c 0 1M", "read -P 0x3c 0 1M", **chap)
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout


def wait_access(box: Appliance, volume: str, access: str) -> dict[str, Any]:
    """Waits until the volume's target in LIO has this access label; returns it."""
    wait_for(
        lambda: box.targets().get(volume, {}).get("access") == access,
        60,
        f"{volume} {access} in LIO",
        every=1.0,
    )
    return box.targets()[volume]


@pytest.mark.appliance_full
def test_initiators_without_chap_and_the_open_flag(appliance: Appliance) -> None:
    """`sgw volumes acl-add`: that initiator logs in without CHAP, others are refused;
    with CHAP and without on one volume each is held to its own rule (per-ACL
    authentication, Linux 6.0+); `set-open --open` lets anyone in, `--closed` restores the
    rules."""
    vid = appliance.create_volume("acl0", 16 * MIB)["id"]
    anonymous = appliance.iscsi_url("acl0", chap=False)
    res = appliance.sgw("volumes", "acl-add", vid, "--initiator", PLAIN, "--timeout", "180")
    assert res.returncode == 0, res.stderr
    t = wait_access(appliance, "acl0", "acl 1")
    assert t["initiators"] == [{"initiator": PLAIN, "chap": False, "mutual": False}]
    assert t["tpg_attributes"]["generate_node_acls"] == "0"
    assert t["tpg_attributes"]["authentication"] == "0"
    ok = inq(PLAIN, anonymous)
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, ok.stderr
    assert refused(inq(STRANGER, anonymous), "Authorization failure")

    appliance.chap_set("acl0")
    t = wait_access(appliance, "acl0", "chap 1, acl 1")
    assert inq(PLAIN, anonymous).returncode == 0
    res = inq(INITIATOR, anonymous)  # its ACL needs CHAP though the TPG does not
    assert refused(res, "Authentication failure"), (res.stdout, res.stderr)
    assert inq(INITIATOR, appliance.iscsi_url("acl0")).returncode == 0
    assert refused(inq(STRANGER, anonymous), "Authorization failure")

    since = appliance.ssh("date +%s.%N").stdout.strip()
    opened = appliance.sgw("volumes", "set-open", vid, "--open", "--timeout", "180")
    assert opened.returncode == 0 and "is OPEN" in opened.stderr, opened.stderr
    t = wait_access(appliance, "acl0", "OPEN")
    assert t["open"] is True and t["initiators"] == []
    assert t["tpg_attributes"]["generate_node_acls"] == "1"
    assert inq(STRANGER, anonymous).returncode == 0
    log = appliance.ssh(f"sudo journalctl -u sgw-gateway -o cat --no-pager --since @{since}")
    assert "iSCSI target OPEN" in log.stdout and "open flag" in log.stdout

    closed = appliance.sgw("volumes", "set-open", vid, "--closed", "--timeout", "180")
    assert closed.returncode == 0, closed.stderr
    wait_access(appliance, "acl0", "chap 1, acl 1")
    assert refused(inq(STRANGER, anonymous), "Authorization failure")
    assert inq(PLAIN, anonymous).returncode == 0


@pytest.mark.appliance_full
def test_a_volume_open_before_an_update_stays_open_until_its_access_is_set(
    appliance: Appliance,
) -> None:
    """An update from a version that exported volumes without rules to anyone, replayed:
    the volume's registry entry as that version wrote it (no iscsi_legacy_open), the
    gateway restarted: the volume is exported open, flagged legacy in the gateway's state
    and then in the provider's listing; `set-open --closed` closes it, for good."""
    vid = appliance.create_volume("legacy0", 16 * MIB)["id"]
    edit = (
        "import json; p = '/var/lib/sgw/volumes.json'; d = json.load(open(p)); "
        "d['legacy0'].pop('iscsi_legacy_open'); json.dump(d, open(p, 'w'))"
    )
    appliance.ssh("sudo systemctl stop sgw-gateway", timeout=180)
    appliance.ssh(f'sudo /opt/sgw/current/bin/python -c "{edit}"')
    appliance.ssh("sudo systemctl start sgw-gateway", timeout=180)
    t = wait_access(appliance, "legacy0", "OPEN")
    assert t["tpg_attributes"]["generate_node_acls"] == "1"
    assert inq(STRANGER, appliance.iscsi_url("legacy0", chap=False)).returncode == 0
    wait_for(appliance.online, 120, "the control channel back", every=1.0)
    state = appliance.sgw_json("gateways", "local-state", appliance.gateway_id)
    access = {v["name"]: v["iscsi_access"] for v in state["volumes"]}
    assert access["legacy0"] == "OPEN (legacy)" and access["vol0"] == "chap 1"

    def listed() -> str:
        rows = {v["name"]: v for v in appliance.sgw_json("volumes", "list")}
        return str(rows["legacy0"]["access"])

    wait_for(lambda: listed() == "OPEN (legacy)", 60, "the report in the listing", every=1.0)
    res = appliance.sgw("volumes", "set-open", vid, "--closed", "--timeout", "180")
    assert res.returncode == 0, res.stderr
    wait_access(appliance, "legacy0", "closed")
    assert listed() == "closed"
    assert refused(inq(STRANGER, appliance.iscsi_url("legacy0", chap=False)), "Authorization")
    flag = appliance.ssh(
        'sudo /opt/sgw/current/bin/python -c "import json; '
        "print(json.load(open('/var/lib/sgw/volumes.json'))['legacy0']['iscsi_legacy_open'])\""
    )
    assert flag.stdout.strip() == "False"


@pytest.mark.appliance_full
def test_restart_tears_down_in_order_and_keeps_data(appliance: Appliance, vol0: str) -> None:
    """Stopping the daemon removes the LIO targets, then detaches /dev/nbdN, then stops;
    the next start exports the volumes again with the data written before, and the
    control channel reconnects."""
    before = sorted(appliance.targets())
    since = appliance.ssh("date +%s.%N").stdout.strip()
    appliance.ssh("sudo systemctl restart sgw-gateway", timeout=180)
    wait_for(
        lambda: sorted(appliance.targets()) == before,
        120,
        "the targets back after a restart",
        every=1.0,
    )
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
    n = len(before)
    assert stop == [
        "gateway stopping",
        *["iSCSI target removed"] * n,
        *["device detached"] * n,
        "gateway stopped",
    ], log[-3000:]
    res = qemu_io(appliance, vol0, f"read -P {PATTERN:#x} 0 64M")
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    wait_for(appliance.online, 120, "the control channel back", every=1.0)


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
    lines = BASELINE.read_text().splitlines()
    baseline = {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}
    assert known_failures() <= baseline


def iscsi_test_cu(box: Appliance, volume: str, tests: list[str]) -> None:
    """Runs the tests (-d: writes allowed); only known failures may fail."""
    names = ",".join(f"SCSI.{t}" for t in tests)
    start = time.monotonic()
    # Both of its initiators are INITIATOR (with different session ids): the URL's CHAP
    # user is the same for both logins, and LIO's CHAP user is the initiator's name.
    argv = [tool("iscsi-test-cu"), "-d", "-i", INITIATOR, "-I", INITIATOR, f"--test={names}"]
    res = run([*argv, box.iscsi_url(volume)], 900)
    seconds = time.monotonic() - start
    passed, failed = cu_results(res.stdout)
    print(f"iscsi-test-cu: {len(passed)} passed, {len(failed)} failed in {seconds:.0f} s")
    assert passed, res.stdout[-3000:] + res.stderr[-3000:]
    suites = {name.split(".")[0] for name in passed | failed}
    assert suites == set(tests), f"suites that did not run: {set(tests) - suites}"
    unexpected = failed - known_failures()
    assert not unexpected, f"new failures: {sorted(unexpected)}\n{res.stdout[-4000:]}"
    assert res.returncode in (0, 1)


def test_iscsi_test_cu_subset(appliance: Appliance, vol1: str) -> None:
    iscsi_test_cu(appliance, vol1, CU_TESTS)


@pytest.mark.appliance_full
def test_iscsi_test_cu_more(appliance: Appliance, vol1: str) -> None:
    iscsi_test_cu(appliance, vol1, CU_MORE)


def test_data_reaches_the_provider(appliance: Appliance, vol0: str) -> None:
    """The destager uploads what was written (through guestfwd, signed) to the provider."""

    def uploaded() -> bool:
        vols = appliance.sgw_json("volumes", "list", "--gateway", appliance.gateway_id)
        return any(v["name"] == vol0 and v["map_version"] >= 1 for v in vols)

    wait_for(uploaded, 240, "an upload of vol0 at the provider", every=2)
    objects = appliance.provider.data_dir / "objects"
    assert any(p.is_file() for p in objects.rglob("*")), appliance.provider.log_text()


def test_volume_deleted_through_the_control_channel(appliance: Appliance, vol1: str) -> None:
    """`sgw volumes delete --drain`: the gateway removes the volume's iSCSI target
    (ending the sessions), detaches its device, uploads what its write log holds and
    deletes it; then the provider's record goes."""
    vid = appliance.volumes[vol1]["id"]
    iqn = appliance.iqn(vol1)
    assert iqn in json.dumps(appliance.lio_status())
    # An initiator logged in while the volume goes (qemu-io: as INITIATOR, QEMU's name).
    reader = subprocess.Popen(
        [tool("qemu-io"), "-f", "raw", "-r", "-c", "read 0 256M", appliance.iscsi_url(vol1)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        done = appliance.sgw_json("volumes", "delete", vid, "--drain", "--timeout", "180")
    finally:
        reader.kill()
        reader.wait(10)
    assert done["ok"], done
    assert vol1 not in {v["name"] for v in appliance.sgw_json("volumes", "list")}
    status = appliance.lio_status()
    assert vol1 not in {t["volume"] for t in status["targets"]}
    assert iqn not in json.dumps(status)
    gone = inq(INITIATOR, appliance.iscsi_url(vol1))
    assert gone.returncode != 0
    state = appliance.sgw_json("gateways", "local-state", appliance.gateway_id)
    assert vol1 not in {v["name"] for v in state["volumes"]}
    assert (
        appliance.ssh(f"sudo test ! -e /var/lib/sgw/volumes/{vol1}.img", check=False).returncode
        == 0
    )
    # The other volume is still exported.
    assert "vol0" in appliance.targets()
