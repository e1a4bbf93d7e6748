"""The gateway daemon killed with -9 in the booted appliance while an initiator on the host
writes and verifies through iSCSI: systemd restarts it, it reattaches the kernel's NBD
device (netlink RECONFIGURE) and the initiator sees a pause, not an error.

The initiator is qemu-io (tests/fixtures/initiator.py); a Linux initiator aborts a
command after about 15 s: that is the budget."""

from __future__ import annotations

import time

from tests.fixtures.appliance import Appliance
from tests.fixtures.initiator import QemuIo
from tests.fixtures.waiting import wait_for

# A Linux initiator's command timeout (seconds): no command may take longer.
COMMAND_BUDGET_S = 15.0


def main_pid(appliance: Appliance) -> int:
    out = appliance.ssh("systemctl show -p MainPID --value sgw-gateway").stdout.strip()
    return int(out or 0)


def test_a_killed_daemon_is_restarted_and_reattached_without_an_io_error(
    appliance: Appliance, vol0: str
) -> None:
    appliance.ssh("sudo dmesg --clear")
    before = main_pid(appliance)
    assert before > 0
    targets = appliance.lio_status()
    commands = []
    for i in range(1500):
        offset, pattern = (i % 512) * 65536, (i * 7 + 1) % 256
        commands += [f"write -P {pattern} {offset} 64k", f"read -P {pattern} {offset} 64k"]
        if i % 8 == 7:
            commands.append("flush")
    io = QemuIo(appliance.iscsi_url(vol0), commands)
    wait_for(lambda: io.completed("wrote") >= 50, 120, what="the initiator to get going")
    # The daemon dies (the supervisor, the unit's main process, sees it and exits non-zero).
    appliance.ssh("sudo pkill -KILL -f 'bin/sgw gateway [s]erve'")
    killed_at = time.monotonic()
    wait_for(lambda: main_pid(appliance) not in (0, before), 120, what="systemd's restart")
    restarted_s = time.monotonic() - killed_at
    assert io.running, "the workload ended before the daemon was back: it proves nothing"
    written = io.completed("wrote")
    wait_for(lambda: io.completed("wrote") > written + 50, 120, what="writes after the restart")
    assert io.finish(timeout=900) == 0, io.lines[-20:]
    assert not io.failures(), io.failures()[:10]
    assert io.completed("wrote") == 1500 and io.completed("read") == 1500  # all verified
    slowest = io.longest_wait()
    assert slowest < COMMAND_BUDGET_S, f"an iSCSI command waited {slowest:.1f} s"
    # The kernel lost the daemon and was given a new connection; it failed nothing.
    dmesg = appliance.ssh("sudo dmesg").stdout
    assert "reconnected socket" in dmesg, dmesg[-2000:]
    io_errors = [line for line in dmesg.splitlines() if "I/O error" in line]
    assert not io_errors, io_errors[:5]
    # LIO kept exporting the same device: nothing was rebuilt.
    assert appliance.lio_status() == targets
    print(
        f"crash reattach (TCG guest): systemd restarted the daemon after {restarted_s:.1f} s; "
        f"the longest wait of a command was {slowest:.2f} s"
    )
