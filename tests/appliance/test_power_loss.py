"""Power loss through the whole stack: what an initiator wrote and then flushed with
SYNCHRONIZE CACHE survives the appliance losing power.

The appliance's disk is opened by QEMU with ``cache=none`` (O_DIRECT), so the only
volatile cache left is the guest's own page cache, and killing QEMU with SIGKILL is a
power cut for the guest: whatever the gateway had not fdatasync'ed is gone, exactly as on
a real machine. That is what this test catches and ``kill -9`` of the daemon cannot: a
killed process leaves its writes in the kernel's page cache, which survives it, so a
gateway that acknowledged a flush without syncing its write log passes every crash test
on the host and fails here (shown by removing the sync from the flush path: see
docs/testing.md).

Each round: the initiator on the host (qemu-io over iSCSI with CHAP, one command after
another) writes 64 KiB blocks, each with its own pattern at its own offset, and flushes
every few writes; QEMU is killed at a random moment; the appliance boots again, and every
write that was followed by a completed flush reads back exactly. Writes not flushed may or
may not be there: they are not checked.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.appliance import Appliance, image_path, start_provider
from tests.fixtures.initiator import QemuIo
from tests.fixtures.waiting import wait_for

ROUNDS = 3
BLOCK = 64 * 1024
REGION = 64 * 1024 * 1024  # each round writes its own part of the volume
WRITES = 400


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """An appliance of its own (this test cuts its power), with ``cache=none``."""
    image = image_path()
    if image is None:
        pytest.fail("no appliance image in dist/: run `make image`")
    workdir = tmp_path_factory.mktemp("power")
    provider = start_provider(workdir / "provider")
    appliance = Appliance(workdir, image, provider, disk_cache="none")
    try:
        appliance.prepare()
        appliance.boot()
        appliance.activate()
        appliance.create_volume("pl0")
        appliance.chap_set("pl0")
        yield appliance
    finally:
        if appliance.proc is not None and appliance.proc.poll() is None:
            appliance.kill()
        for client in provider.clients:
            client.close()
        provider.kill()


def plan(round_: int, rng: random.Random) -> list[tuple[str, int, int]]:
    """The round's commands: ("write", offset, pattern) and ("flush", 0, 0)."""
    out: list[tuple[str, int, int]] = []
    until_flush = rng.randint(2, 12)
    for i in range(WRITES):
        out.append(("write", round_ * REGION + i * BLOCK, (round_ * 97 + i) % 255 + 1))
        until_flush -= 1
        if until_flush == 0:
            out.append(("flush", 0, 0))
            until_flush = rng.randint(2, 12)
    return out


def durable(commands: list[tuple[str, int, int]], writes_done: int) -> list[tuple[int, int]]:
    """The writes acknowledged before a flush that completed: qemu-io runs its commands
    one after another, so a flush completed if a write after it completed."""
    done: list[tuple[int, int]] = []
    pending: list[tuple[int, int]] = []
    seen = 0
    for kind, offset, pattern in commands:
        if kind == "write":
            if seen == writes_done:
                break
            seen += 1
            pending.append((offset, pattern))
        elif seen < writes_done:  # a write after this flush completed: the flush did
            done += pending
            pending = []
    return done


def _writes(io: QemuIo, n: int) -> Callable[[], bool]:
    return lambda: io.completed("wrote") >= n or not io.running


@pytest.mark.timeout(1800)
def test_flushed_writes_survive_power_loss(box: Appliance, tmp_path: Path) -> None:
    rng = random.Random(20261207)
    url = box.iscsi_url("pl0")
    total_checked = 0
    for round_ in range(ROUNDS):
        commands = plan(round_, rng)
        io = QemuIo(
            url,
            [
                f"write -P {pattern} {offset} {BLOCK}" if kind == "write" else "flush"
                for kind, offset, pattern in commands
            ],
        )
        # Power off at a random moment once writes and flushes are under way.
        wait_for(_writes(io, rng.randint(40, 300)), 300, what="writes to be under way")
        time.sleep(rng.random() * 0.5)
        assert not io.failures(), io.failures()[:10]  # (after the cut, qemu-io complains)
        box.kill()  # SIGKILL to QEMU: the guest loses power
        io.kill()
        writes_done = io.completed("wrote")
        check = durable(commands, writes_done)
        assert check, f"round {round_}: nothing flushed before the power cut ({writes_done})"

        box.boot(activated=True)
        wait_for(lambda: "pl0" in box.targets(), 300, what="pl0 exported after the reboot")
        verify = ["qemu-io", "-f", "raw"]
        for offset, pattern in check:
            verify += ["-c", f"read -P {pattern} {offset} {BLOCK}"]
        res = subprocess.run(
            [*verify, url], capture_output=True, text=True, timeout=600, check=False
        )
        bad = [ln for ln in res.stdout.splitlines() if "failed" in ln or "Pattern" in ln]
        assert res.returncode == 0 and not bad, (
            f"round {round_}: {len(bad)} of {len(check)} flushed writes lost "
            f"(power cut after {writes_done} writes): {bad[:5]} {res.stderr[-500:]}"
        )
        assert res.stdout.count("read 65536/65536") == len(check)
        total_checked += len(check)
    print(f"power loss: {ROUNDS} rounds, {total_checked} flushed writes read back exactly")
