"""The appliance powers off cleanly and quickly with volumes exported and initiators
logged in: the gateway clears LIO, detaches /dev/nbdN and then drains (in the other
order the shutdown hangs for minutes). Runs last: it ends the session's appliance."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.fixtures.appliance import Appliance

pytestmark = [pytest.mark.appliance, pytest.mark.timeout(600)]

SHUTDOWN_LIMIT = 20.0


def test_clean_shutdown_within_20_s(appliance: Appliance, vol0: str) -> None:
    qemu_io = shutil.which("qemu-io")
    assert qemu_io is not None
    assert vol0 in appliance.targets()
    # An initiator logged in during the shutdown: a long read that the power-off cuts
    # (qemu-io logs in as QEMU's initiator name, INITIATOR, with the URL's CHAP secret).
    reader = subprocess.Popen(
        [qemu_io, "-f", "raw", "-r", "-c", "read 0 256M", appliance.iscsi_url(vol0)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seconds = appliance.poweroff(timeout=120.0)
    finally:
        reader.kill()
        reader.wait(10)
    print(f"appliance: powered off in {seconds:.1f} s")
    assert appliance.proc is not None and appliance.proc.returncode == 0
    console = appliance.console_tail(20000)
    assert "A stop job is running" not in console
    assert seconds <= SHUTDOWN_LIMIT, console[-3000:]
