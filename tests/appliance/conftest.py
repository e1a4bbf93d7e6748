"""The booted appliance: the image from ``make image`` under QEMU (TCG), one boot for
the whole session, activated and given its volumes through the management plane.

A provider runs on the host as a user would run one: ``sgw provider init`` (its CA's
certificate names 10.0.2.100, the address the guest reaches it by) and ``sgw provider
serve`` over HTTPS on 127.0.0.1. The guest is on QEMU user networking with
``restrict=on``: the host reaches it only through forwards bound to 127.0.0.1 (ssh,
iSCSI, the activation page) and the guest reaches only the provider (``guestfwd``
10.0.2.100:8480). A seed disk (ext4 labelled sgw-seed, made without mounting) brings the
admin's ssh key, the gateway's configuration (no volumes; the provider; LIO on) and the
provider's CA. The session then activates the appliance with the key its activation
page hands out (``sgw activate``); volumes are made with ``sgw volumes create --gateway``
through the control channel.

The image is found through ``dist/manifest.json``; without it the tests are skipped,
unless ``SGW_APPLIANCE_REQUIRED=1`` (``make test`` sets it) makes that a failure.
Tests marked ``appliance_full`` run in ``make test-appliance`` only; ``make test`` runs
the others (``-m "not appliance_full"``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.daemons import SGW, free_port
from tests.fixtures.management import SecureProvider
from tests.fixtures.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
# Under TCG on a busy 2-core machine: boot to ssh takes 25-60 s, the gateway's first
# start (identity key, activation page) a few more.
BOOT_TIMEOUT = 300.0
READY_TIMEOUT = 180.0
# A command through the control channel (the gateway under TCG answers in seconds).
COMMAND_TIMEOUT = 180
# The guest's view of the provider on the host (guestfwd).
PROVIDER_GUEST_HOST = "10.0.2.100"
PROVIDER_GUEST_ADDR = f"{PROVIDER_GUEST_HOST}:8480"

IQN_BASE = "iqn.2024-01.test.sgw:e2e"
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
poll_interval = 1.0

[remote]
url = "https://{PROVIDER_GUEST_ADDR}"
ca = "/etc/sgw/provider-ca.pem"

[lio]
enabled = true
iqn_base = "{IQN_BASE}"
portal = "0.0.0.0:3260"
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "appliance_full: in make test-appliance only (make test runs the others)"
    )


def image_path() -> Path | None:
    """The qcow2 that ``make image`` wrote, per dist/manifest.json."""
    manifest = DIST / "manifest.json"
    if not manifest.exists():
        return None
    doc = json.loads(manifest.read_text())
    path = DIST / doc["qcow2"]
    return path if path.exists() else None


def start_provider(data_dir: Path) -> SecureProvider:
    """``sgw provider init`` (TLS names: the guest's address for it) and ``serve``."""
    res = subprocess.run(
        [
            *(SGW, "provider", "init", "--data-dir", str(data_dir), "--output", "json"),
            *("--tls-name", PROVIDER_GUEST_HOST),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    provider = SecureProvider(
        data_dir, token=doc["token"], account_id=doc["account_id"], ca=doc["ca_certificate"]
    )
    return provider.start(timeout=60)


@dataclass
class Appliance:
    """A booted appliance and how to reach it."""

    workdir: Path
    image: Path
    provider: SecureProvider
    ssh_port: int = field(default_factory=free_port)
    iscsi_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    boot_seconds: float = 0.0
    ready_seconds: float = 0.0
    activated_seconds: float = 0.0
    activation_redirect: str = ""
    gateway_id: str = ""
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def targets(self) -> dict[str, dict[str, Any]]:
        """The live iSCSI targets by volume."""
        return {t["volume"]: t for t in self.lio_status()["targets"]}

    def sgw(
        self, *args: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT + 60
    ) -> subprocess.CompletedProcess[str]:
        """The admin CLI on the host, against the provider (its token, its CA)."""
        return subprocess.run(
            [SGW, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.provider.cli_env(),
            check=False,
        )

    def sgw_json(self, *args: str, stdin: str | None = None) -> Any:
        res = self.sgw(*args, "--output", "json", stdin=stdin)
        assert res.returncode == 0, f"sgw {' '.join(args)}: exit {res.returncode}: {res.stderr}"
        return json.loads(res.stdout)

    def online(self) -> bool:
        conn = self.provider.admin().get(f"/v1/gateways/{self.gateway_id}/connection")
        return conn.status_code == 200 and bool(conn.json()["online"])

    # Start and stop

    def prepare(self) -> None:
        """The ssh key, the ssh config, the seed disk and a copy-on-write disk."""
        key = self.workdir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sgw-test", "-f", str(key)],
            check=True,
        )
        seed = self.workdir / "seed"
        seed.mkdir()
        shutil.copy(f"{key}.pub", seed / "authorized_keys")
        (seed / "gateway.toml").write_text(GATEWAY_TOML)
        shutil.copy(self.provider.ca, seed / "provider-ca.pem")
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

    def write_ssh_config(self) -> None:
        key = self.workdir / "id_ed25519"
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
            "  ConnectTimeout 10\n"
            "  ServerAliveInterval 10\n"
            "  ControlMaster auto\n"
            f"  ControlPath {self.workdir}/cm-%p\n"
            "  ControlPersist 120\n"
        )

    def boot(self) -> None:
        """Starts QEMU and waits for ssh, then for the activation page. A forward's port
        taken by another process meanwhile (QEMU exits at once) means new ports."""
        for _attempt in range(3):
            self.write_ssh_config()
            self._start_qemu()
            assert self.proc is not None
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                break
            qemu_log = (self.workdir / "qemu.log").read_text(errors="replace")
            if "host forwarding rule" not in qemu_log:
                raise AssertionError(f"QEMU exited {self.proc.returncode}: {qemu_log}")
            self.ssh_port, self.iscsi_port, self.http_port = free_port(), free_port(), free_port()
        start = self.started
        self._wait("ssh", BOOT_TIMEOUT, lambda: self.ssh("true", check=False, timeout=30))
        self.boot_seconds = time.monotonic() - start

        def page() -> bool:
            try:
                r = httpx.get(self.activation_page_url(), timeout=10)
            except httpx.HTTPError:
                return False
            if r.status_code != 302:
                return False
            self.activation_redirect = r.headers["location"]
            return True

        self._wait("the activation page", READY_TIMEOUT, page)
        self.ready_seconds = time.monotonic() - start

    def _start_qemu(self) -> None:
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
        self.started = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def activation_page_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/?activationRegion=test"

    def activate(self) -> None:
        """Activates the appliance with the key its page handed out; waits until its
        control channel is connected."""
        start = time.monotonic()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.activation_redirect).query)
        key = query["activationKey"][0]
        doc = self.sgw_json("activate", key, "--name", "appliance", "--timezone", "UTC")
        self.gateway_id = str(doc["id"])
        wait_for(self.online, READY_TIMEOUT, "the appliance's control channel", every=0.5)
        self.activated_seconds = time.monotonic() - start

    def create_volume(self, name: str, size: int = VOLUME_SIZE) -> dict[str, Any]:
        """``sgw volumes create NAME SIZE --gateway ID`` (returns once the gateway
        confirmed), then waits for its iSCSI target."""
        vol: dict[str, Any] = self.sgw_json(
            *("volumes", "create", name, f"{size >> 20}M", "--gateway", self.gateway_id),
            *("--mode", "stored", "--timeout", str(COMMAND_TIMEOUT)),
        )
        self.volumes[name] = vol
        wait_for(lambda: name in self.targets(), 60, f"the iSCSI target of {name}", every=1.0)
        return vol

    def _wait(self, what: str, timeout: float, probe: Callable[[], Any]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited {self.proc.returncode}: {self.console_tail()}")
            try:
                result = probe()
                if result is True or getattr(result, "returncode", None) == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.console_tail()}")

    def poweroff(self, timeout: float) -> float:
        """Asks the appliance to power off; returns the seconds until QEMU exited."""
        assert self.proc is not None
        start = time.monotonic()
        self.ssh("sudo systemctl poweroff", check=False, timeout=30)
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
    """The appliance, booted and activated once; powered off (or killed) at the end."""
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
    provider = start_provider(workdir / "provider")
    box = Appliance(workdir, image, provider)
    try:
        box.prepare()
        box.boot()
        box.activate()
        yield box
    finally:
        running = box.proc is not None and box.proc.poll() is None
        if running and box.poweroff(60.0) == float("inf"):
            box.kill()
        for client in provider.clients:
            client.close()
        provider.kill()


@pytest.fixture(scope="session")
def vol0(appliance: Appliance) -> str:
    """A 256 MiB volume made through the control channel, open to any initiator."""
    if "vol0" not in appliance.volumes:
        appliance.create_volume("vol0")
    return "vol0"


@pytest.fixture(scope="session")
def vol1(appliance: Appliance) -> str:
    """A second one (iscsi-test-cu writes it; the delete test removes it)."""
    if "vol1" not in appliance.volumes:
        appliance.create_volume("vol1")
    return "vol1"
