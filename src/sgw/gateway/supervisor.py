"""The gateway service's main process: starts the daemon and outlives its swaps.

``python -m sgw.gateway.supervisor [SERVE ARGS...]`` runs ``sgw gateway serve SERVE
ARGS...`` (the ``sgw`` beside this interpreter) and waits. A blue-green swap replaces the
daemon by the daemon's own child (sgw.gateway.handover); once the old daemon exits, the
new one would be nobody's child but PID 1's. systemd 252 (Debian 12) cannot supervise such
a process as a service's main process: told its pid with ``MAINPID=``, it does not wait
for it to stop (it sends SIGKILL at once after SIGTERM, so LIO is never cleared) and it
cannot learn its exit status. So the unit's main process is this one, a child subreaper
(``PR_SET_CHILD_SUBREAPER``): a successor whose parent exited after the handover becomes
its child, and it knows when and how every daemon ends.

It exits once no daemon is left. The daemon exits on its own only after a handover (and
then its successor serves), so a supervisor that was not told to stop exits non-zero when
the last daemon is gone (a crash): ``Restart=on-failure`` starts the service again, and
the new daemon reattaches the kernel's devices. Told to stop (SIGTERM, SIGINT), it passes
the signal on to its children and exits with the last daemon's status. It imports nothing
heavy: its start is not in the daemon's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from types import FrameType

from sgw.common.logs import setup_logging

LOG = logging.getLogger("sgw.gateway.supervisor")  # (run as __main__)

PR_SET_CHILD_SUBREAPER = 36
# Set for the daemons it starts: a successor then does not claim the service's main pid.
SUPERVISED_ENV = "SGW_SUPERVISED"


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s living children (from /proc; zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def exit_status(code: int) -> int:
    """A child's exit code (negative: killed by that signal) as this process's status."""
    return 128 - code if code < 0 else code


def supervise(command: list[str]) -> int:
    """Runs ``command`` and every successor it hands over to; the exit status (above)."""
    _set_subreaper()
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    env = dict(os.environ, **{SUPERVISED_ENV: "1"})
    first = os.posix_spawn(command[0], command, env)
    LOG.info("supervisor: daemon started", extra={"pid": first, "command": command})
    last = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        last = os.waitstatus_to_exitcode(status)
        left = children(os.getpid())
        LOG.info(
            "supervisor: a daemon exited",
            extra={"pid": pid, "exit_code": last, "still_running": left},
        )
    if stopping:
        return exit_status(last)
    LOG.error("supervisor: no daemon left and none was told to stop: the service restarts")
    return exit_status(last) or 1


def main(argv: list[str] | None = None) -> int:
    setup_logging("info")
    args = sys.argv[1:] if argv is None else argv
    sgw = os.path.join(os.path.dirname(sys.executable), "sgw")
    return supervise([sgw, "gateway", "serve", *args])


if __name__ == "__main__":
    sys.exit(main())
