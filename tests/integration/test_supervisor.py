"""The gateway service's supervisor (``python -m sgw.gateway.supervisor``), the appliance
unit's main process, with the real daemon: a swap's successor becomes the supervisor's
child; a stop reaches the daemon that serves and it drains (exit 0); a daemon that dies
makes the supervisor exit non-zero (so systemd restarts the service); and a supervised
daemon never claims the service's main pid (``MAINPID=``) in its notifications."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest

from sgw.gateway.supervisor import children
from tests.fixtures.daemons import SGW
from tests.fixtures.waiting import wait_for

RELEASE = str(Path(sys.executable).parent.parent)  # this virtualenv: a dir with bin/sgw


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    sock: Path
    notify: socket.socket
    log: Path

    def notifications(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return out

    def daemons(self) -> list[int]:
        return children(self.proc.pid)

    def upgrade(self) -> None:
        res = subprocess.run(
            [SGW, "gateway", "upgrade", "--to", RELEASE, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stderr + self.log.read_text()[-3000:]


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    sock = tmp_path / "nbd.sock"
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    log = tmp_path / "supervisor.log"
    args = [
        *(sys.executable, "-m", "sgw.gateway.supervisor", "--data-dir", str(data_dir)),
        *("--volume", "vol0:64M", "--nbd", f"unix:{sock}", "--log-size", "256M"),
    ]
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    with log.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    box = Supervised(proc, data_dir, sock, notify, log)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 60, what="the daemon")
        assert proc.poll() is None, log.read_text()
        yield box
    finally:
        for pid in [*box.daemons(), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        notify.close()


def test_a_swap_successor_is_the_supervisors_child_and_a_stop_drains_it(
    supervised: Supervised,
) -> None:
    [blue] = supervised.daemons()
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///vol0?socket={supervised.sock}")
    h.pwrite(b"\x5a" * 65536, 0)
    h.flush()
    supervised.upgrade()
    wait_for(lambda: blue not in supervised.daemons(), 30, what="blue to exit")
    [green] = supervised.daemons()  # the successor, reparented to the supervisor
    assert green != blue
    # The client's connection went over with it.
    assert h.pread(65536, 0) == b"\x5a" * 65536
    h.shutdown()
    said = supervised.notifications()
    assert any("READY=1" in n for n in said), said
    assert not any("MAINPID=" in n for n in said), said
    assert supervised.proc.poll() is None

    supervised.proc.send_signal(signal.SIGTERM)
    assert supervised.proc.wait(60) == 0
    log = supervised.log.read_text()
    assert '"msg": "gateway stopped"' in log, log[-3000:]
    assert not children(supervised.proc.pid)


def test_a_daemon_that_dies_makes_the_supervisor_fail(supervised: Supervised) -> None:
    supervised.upgrade()
    wait_for(lambda: len(supervised.daemons()) == 1, 30, what="one daemon")
    [green] = supervised.daemons()
    os.kill(green, signal.SIGKILL)
    code = supervised.proc.wait(30)
    assert code == 128 + signal.SIGKILL, code
    assert "none was told to stop" in supervised.log.read_text()
