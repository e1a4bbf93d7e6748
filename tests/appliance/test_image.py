"""The built image as booted: services, kernel modules, accounts, file modes, the
firewall and what listens on the network (testinfra over ssh, as the admin with sudo)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import testinfra

from tests.fixtures.appliance import Appliance

pytestmark = [pytest.mark.appliance, pytest.mark.appliance_full, pytest.mark.timeout(600)]

# TCP ports open in the firewall: ssh, the activation page, iSCSI.
OPEN_TCP = {22, 80, 3260}
# What listens once activated: the activation page closes for good.
LISTEN_TCP = {22, 3260}
# UDP: DHCP client replies only (v4 and v6).
OPEN_UDP = {68, 546}


@pytest.fixture(scope="module")
def host(appliance: Appliance) -> Any:
    return testinfra.get_host("ssh://appliance", ssh_config=str(appliance.ssh_config), sudo=True)


@pytest.mark.parametrize(
    "unit",
    ["ssh", "sgw-gateway", "nftables", "systemd-networkd", "sgw-disks", "sgw-seed"],
)
def test_services_enabled_and_running(host: Any, unit: str) -> None:
    service = host.service(unit)
    assert service.is_enabled and service.is_running


def test_first_boot_units_enabled(host: Any) -> None:
    assert host.service("sgw-ssh-hostkeys").is_enabled
    assert host.run("systemctl is-failed --quiet '*'").rc != 0, host.check_output(
        "systemctl --failed --no-legend"
    )


@pytest.mark.parametrize(
    "unit", ["rtslib-fb-targetctl.service", "targetclid.socket", "nbd-client.service"]
)
def test_stock_lio_restore_masked(host: Any, unit: str) -> None:
    assert host.run(f"systemctl is-enabled {unit}").stdout.strip() == "masked"


@pytest.mark.parametrize(
    "module", ["configfs", "target_core_mod", "iscsi_target_mod", "target_core_iblock", "nbd"]
)
def test_kernel_module_loaded(host: Any, module: str) -> None:
    assert host.file(f"/sys/module/{module}").is_directory


def test_lio_database_root_has_pr(host: Any) -> None:
    dbroot = host.file("/sys/kernel/config/target/dbroot").content_string.strip()
    assert dbroot == "/etc/rtslib-fb-target"
    pr = host.file(f"{dbroot}/pr")
    assert pr.is_directory and pr.mode == 0o700


def test_no_password_logins(host: Any) -> None:
    assert host.check_output("passwd --status root").split()[1] == "L"
    assert host.check_output("passwd --status admin").split()[1] == "L"
    assert host.user("admin").groups.count("sudo") == 1
    sshd = dict(
        line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line
    )
    assert sshd["permitrootlogin"] == "no"
    assert sshd["passwordauthentication"] == "no"
    assert sshd["kbdinteractiveauthentication"] == "no"
    assert sshd["authenticationmethods"] == "publickey"


def test_ssh_host_keys_made_on_first_boot(host: Any) -> None:
    booted = float(host.check_output("date +%s")) - float(
        host.file("/proc/uptime").content_string.split()[0]
    )
    for kind in ("ed25519", "ecdsa"):
        key = host.file(f"/etc/ssh/ssh_host_{kind}_key")
        assert key.exists and key.mode == 0o600 and key.user == "root"
        assert key.mtime.timestamp() >= booted - 5
    assert not host.file("/etc/ssh/ssh_host_rsa_key").exists
    assert not host.file("/root/.ssh/authorized_keys").exists
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)


@pytest.mark.parametrize(
    ("path", "mode"),
    [
        ("/var/lib/sgw", 0o700),
        ("/var/lib/sgw/identity.key", 0o600),
        ("/var/lib/sgw/credentials.json", 0o600),
        ("/etc/sudoers.d/sgw-admin", 0o440),
        ("/usr/local/sbin/sgw-seal", 0o700),
        ("/home/admin/.ssh/authorized_keys", 0o600),
    ],
)
def test_secret_file_modes(host: Any, path: str, mode: int) -> None:
    f = host.file(path)
    assert f.exists and f.mode == mode, f"{path}: {f.mode:o}"


def test_release_slot(host: Any) -> None:
    current = host.file("/opt/sgw/current")
    assert current.is_symlink and current.linked_to.startswith("/opt/sgw/releases/")
    assert host.run("/opt/sgw/current/bin/sgw --help").rc == 0


def test_firewall(host: Any) -> None:
    rules = host.check_output("nft list ruleset")
    assert re.search(r"chain input \{[^}]*policy drop;", rules)
    ports = re.search(r"tcp dport \{ ([0-9, ]+) \} accept", rules)
    assert ports is not None and {int(p) for p in ports.group(1).split(",")} == OPEN_TCP


def listening(host: Any, proto: str) -> set[int]:
    """Ports with a socket listening beyond loopback."""
    ports = set()
    for line in host.check_output(f"ss -H -l -n --{proto}").splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        if addr.startswith("127.") or addr in ("[::1]", "::1"):
            continue
        ports.add(int(port))
    return ports


def test_only_ssh_and_iscsi_listen_once_activated(host: Any) -> None:
    assert listening(host, "tcp") == LISTEN_TCP
    assert listening(host, "udp") <= OPEN_UDP
