"""The gateway daemon killed with -9 in the booted appliance while an initiator on the host
writes and verifies through iSCSI: systemd restarts it, it reattaches the kernel's NBD
device (netlink RECONFIGURE) and the initiator sees a pause, not an error.

The initiator is qemu-io, one iSCSI session running its commands one after another; each
command's latency is bounded by the time between the completion lines it prints (read
with line buffering as they come: qemu-io's own timing is not the wall-clock wait), since
libiscsi has no timeout of its own. A Linux initiator aborts a command after about 15 s:
that is the budget."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time

from tests.fixtures.appliance import Appliance
from tests.fixtures.waiting import wait_for

# A Linux initiator's command timeout (seconds): no command may take longer.
COMMAND_BUDGET_S = 15.0


class Initiator:
    """qemu-io writing a pattern and reading it back (a check) over and over, a flush now
    and then; the completion time of every line it prints is recorded."""

    def __init__(self, url: str, rounds: int, size: int = 64 * 1024) -> None:
        commands = []
        for i in range(rounds):
            offset, pattern = (i % 512) * size, (i * 7 + 1) % 256
            commands += ["-c", f"write -P {pattern} {offset} {size}"]
            commands += ["-c", f"read -P {pattern} {offset} {size}"]
            if i % 8 == 7:
                commands += ["-c", "flush"]
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", *commands, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc

    def completed(self, what: str) -> int:
        return sum(1 for _, line in self.lines if line.startswith(what))

    def longest_wait(self) -> float:
        """The longest time between two consecutive completions (seconds)."""
        times = [t for t, _ in self.lines]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def failures(self) -> list[str]:
        return [line for _, line in self.lines if "fail" in line or "rror" in line]


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
    io = Initiator(appliance.iscsi_url(vol0), rounds=1500)
    wait_for(lambda: io.completed("wrote") >= 50, 120, what="the initiator to get going")
    appliance.ssh("sudo systemctl kill -s KILL sgw-gateway")
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
