"""The booted appliance: the image from ``make image`` under QEMU (TCG), one boot for
the whole session.

The guest is on QEMU user networking with ``restrict=on``; the host reaches it only
through forwards bound to 127.0.0.1 (ssh, iSCSI, the activation page) and the guest
reaches only the provider running on the host (``guestfwd`` 10.0.2.100:8480). A seed disk
(ext4 labelled sgw-seed, made without mounting) brings the admin's ssh key, the gateway's
configuration (two volumes, LIO on, the provider) and the CHAP credentials of vol0.

The image is found through ``dist/manifest.json``; without it the tests are skipped,
unless ``SGW_APPLIANCE_REQUIRED=1`` (``make test`` sets it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProviderProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
# Under TCG on a busy 2-core machine: boot to ssh takes 25-40 s, the gateway's first
# start (identity key, LIO) a few more.
BOOT_TIMEOUT = 240.0
READY_TIMEOUT = 120.0
# The guest's view of the provider on the host (guestfwd).
PROVIDER_GUEST_ADDR = "10.0.2.100:8480"

IQN_BASE = "iqn.2024-01.test.sgw:e2e"
INITIATOR = "iqn.2024-01.test.host:e2e"
CHAP_SECRET = "initiator-secret1"
TARGET_SECRET = "target-secret-22"
# vol0: CHAP and mutual CHAP for INITIATOR only. vol1: open (any initiator, no CHAP).
VOLUME_SIZE = 256 << 20

GATEWAY_TOML = f"""\
data_dir = "/var/lib/sgw"

[write_log]
size = "129M"

[destage]
batch = "4M"

[nbd]
listen = ["unix:/run/sgw/nbd.sock"]

[activation]
listen = "0.0.0.0:80"

[remote]
url = "http://{PROVIDER_GUEST_ADDR}"
insecure_http = true

[lio]
enabled = true
iqn_base = "{IQN_BASE}"
portal = "0.0.0.0:3260"

[[volumes]]
name = "vol0"
size = "{VOLUME_SIZE >> 20}M"

[[volumes]]
name = "vol1"
size = "{VOLUME_SIZE >> 20}M"
"""


def image_path() -> Path | None:
    """The qcow2 that ``make image`` wrote, per dist/manifest.json."""
    manifest = DIST / "manifest.json"
    if not manifest.exists():
        return None
    doc = json.loads(manifest.read_text())
    path = DIST / doc["qcow2"]
    return path if path.exists() else None


@dataclass
class Appliance:
    """A booted appliance and how to reach it."""

    workdir: Path
    image: Path
    provider: ProviderProcess
    ssh_port: int = field(default_factory=free_port)
    iscsi_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    boot_seconds: float = 0.0
    ready_seconds: float = 0.0

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def iqn(self, volume: str) -> str:
        return f"{IQN_BASE}:{volume}"

    def iscsi_url(self, volume: str, lun: int = 0) -> str:
        return f"iscsi://127.0.0.1:{self.iscsi_port}/{self.iqn(volume)}/{lun}"

    def console_tail(self, chars: int = 3000) -> str:
        return self.console.read_text(errors="replace")[-chars:] if self.console.exists() else ""

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs a shell command on the appliance as the admin (sudo available)."""
        result = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "appliance", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"on the appliance: {command!r} exited {result.returncode}: "
                f"{result.stderr.strip()} {result.stdout.strip()}"
            )
        return result

    def lio_status(self) -> dict[str, Any]:
        out = self.ssh("sudo /opt/sgw/current/bin/python -m sgw.gateway.lio status").stdout
        return dict(json.loads(out))

    # Start and stop

    def prepare(self) -> None:
        """The ssh key, the ssh config, the seed disk and a copy-on-write disk."""
        key = self.workdir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sgw-test", "-f", str(key)],
            check=True,
        )
        self.ssh_config.write_text(
            "Host appliance\n"
            "  HostName 127.0.0.1\n"
            f"  Port {self.ssh_port}\n"
            "  User admin\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            "  BatchMode yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  ConnectTimeout 5\n"
            "  ControlMaster auto\n"
            f"  ControlPath {self.workdir}/cm-%p\n"
            "  ControlPersist 120\n"
        )
        seed = self.workdir / "seed"
        seed.mkdir()
        shutil.copy(f"{key}.pub", seed / "authorized_keys")
        (seed / "gateway.toml").write_text(GATEWAY_TOML)
        chap = {
            "volumes": {
                "vol0": [
                    {"initiator": INITIATOR, "secret": CHAP_SECRET, "target_secret": TARGET_SECRET}
                ]
            }
        }
        (seed / "chap.json").write_text(json.dumps(chap))
        subprocess.run(
            [
                *("mke2fs", "-q", "-t", "ext4", "-L", "sgw-seed", "-d", str(seed)),
                *(str(self.workdir / "seed.img"), "16M"),
            ],
            check=True,
        )
        subprocess.run(
            [
                *("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2"),
                *("-b", str(self.image), str(self.workdir / "disk.qcow2")),
            ],
            check=True,
        )

    def boot(self) -> None:
        """Starts QEMU and waits for ssh, then for the gateway's iSCSI targets."""
        port = self.provider.port
        netdev = ",".join(
            [
                "user,id=n0,restrict=on",
                f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                f"hostfwd=tcp:127.0.0.1:{self.iscsi_port}-:3260",
                f"hostfwd=tcp:127.0.0.1:{self.http_port}-:80",
                f"guestfwd=tcp:{PROVIDER_GUEST_ADDR}-cmd:socat STDIO TCP:127.0.0.1:{port}",
            ]
        )
        argv = [
            *("qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max"),
            *("-smp", "2", "-m", "2048", "-display", "none", "-no-reboot"),
            *("-serial", f"file:{self.console}"),
            *("-drive", f"file={self.workdir / 'disk.qcow2'},if=virtio,format=qcow2,discard=unmap"),
            *("-drive", f"file={self.workdir / 'seed.img'},if=virtio,format=raw,readonly=on"),
            *("-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"),
        ]
        start = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait("ssh", BOOT_TIMEOUT, lambda: self.ssh("true", check=False, timeout=15))
        self.boot_seconds = time.monotonic() - start

        def ready() -> subprocess.CompletedProcess[str]:
            return self.ssh(
                "test -f /run/sgw/lio-exports.json && "
                "sudo /opt/sgw/current/bin/python -m sgw.gateway.lio status | grep -c '\"iqn\"' "
                "| grep -qx 2",
                check=False,
            )

        self._wait("the gateway's iSCSI targets", READY_TIMEOUT, ready)
        self.ready_seconds = time.monotonic() - start

    def _wait(self, what: str, timeout: float, probe: Any) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited {self.proc.returncode}: {self.console_tail()}")
            try:
                if probe().returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.console_tail()}")

    def poweroff(self, timeout: float) -> float:
        """Asks the appliance to power off; returns the seconds until QEMU exited."""
        assert self.proc is not None
        start = time.monotonic()
        self.ssh("sudo systemctl poweroff", check=False, timeout=15)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return float("inf")
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """The appliance, booted once; powered off (or killed) at the end of the session."""
    image = image_path()
    if image is None:
        message = "no appliance image in dist/: run `make image`"
        if os.environ.get("SGW_APPLIANCE_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    for tool in ("qemu-system-x86_64", "qemu-img", "mke2fs", "socat", "ssh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run `make setup` (scripts/install-host-deps)")
    workdir = tmp_path_factory.mktemp("appliance")
    provider = ProviderProcess(workdir / "provider").start()
    box = Appliance(workdir, image, provider)
    try:
        box.prepare()
        box.boot()
        yield box
    finally:
        running = box.proc is not None and box.proc.poll() is None
        if running and box.poweroff(30.0) == float("inf"):
            box.kill()
        provider.kill()
