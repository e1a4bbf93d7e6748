"""The blue-green swap (``sgw gateway upgrade``) with real clients: fio with verify and
libnbd writers over unix and TCP keep writing, flushing and reading back across 20 swaps
in a row, with hundreds of MiB of undestaged writes in the log; then every fault case of
the protocol (sgw.gateway.handover.swap), each ending with exactly one daemon serving, no
client error and every flushed write in place.

The release swapped to is this virtualenv (the same code): what is proved is the
mechanism, not a version change (the appliance test swaps between two builds).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.fixtures.daemons import (
    SGW,
    GatewayProcess,
    ProviderProcess,
    buffered_health_events,
    free_port,
    need,
    serving,
)
from tests.fixtures.waiting import wait_for

MIB = 1 << 20
RELEASE = str(Path(sys.executable).parent.parent)  # a directory with bin/sgw
BLOCK = 64 * 1024
# A destager that leaves the log alone: what the log holds stays to be handed over.
CONFIG = """\
[destage]
start_fill = 0.95
idle_seconds = 3600
"""


def upgrade(gw: GatewayProcess, *, check: bool = True, to: str = RELEASE) -> dict[str, Any]:
    """``sgw gateway upgrade`` against the gateway's admin socket; its JSON answer."""
    res = subprocess.run(
        [
            *(SGW, "gateway", "upgrade", "--to", to),
            *("--data-dir", str(gw.data_dir), "--output", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert res.returncode == 0, f"upgrade failed: {res.stderr}\n{gw.log_text()}"
        return dict(json.loads(res.stdout))
    return {"returncode": res.returncode, "stderr": res.stderr}


def admin_status(gw: GatewayProcess) -> dict[str, object]:
    res = subprocess.run(
        [SGW, "gateway", "status", "--data-dir", str(gw.data_dir), "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(res.stdout))


def stop_all(gw: GatewayProcess) -> None:
    """SIGTERM to whichever process serves now (a successor is not the test's child)."""
    for pid in serving(gw.data_dir):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not serving(gw.data_dir), 60, what="the gateway to stop")
    if gw.proc is not None:
        gw.proc.wait(10)
        gw.proc = None


@dataclass
class Writers:
    """libnbd clients writing random 64 KiB blocks, flushing now and then and reading
    back what they wrote, each into its own part of the export; every write that
    returned before a completed flush is in ``flushed``."""

    uris: list[str]
    export_blocks: int
    errors: list[str] = field(default_factory=list)
    flushed: dict[int, bytes] = field(default_factory=dict)
    writes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Writers:
        n = len(self.uris)
        for i, uri in enumerate(self.uris):
            blocks = range(i * self.export_blocks // n, (i + 1) * self.export_blocks // n)
            t = threading.Thread(target=self._run, args=(uri, blocks, i), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, uri: str, blocks: range, seed: int) -> None:
        rng = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            unflushed: dict[int, bytes] = {}
            mine: dict[int, bytes] = {}
            while not self._stop.is_set():
                block = rng.choice(blocks)
                data = rng.randbytes(BLOCK)
                h.pwrite(data, block * BLOCK)
                unflushed[block] = mine[block] = data
                with self._lock:
                    self.writes += 1
                if rng.random() < 0.1:
                    h.flush()
                    with self._lock:
                        self.flushed.update(unflushed)
                    unflushed.clear()
                check = rng.choice(list(mine))
                if h.pread(BLOCK, check * BLOCK) != mine[check]:
                    self.errors.append(f"{uri}: block {check} read back wrong")
            h.flush()
            with self._lock:
                self.flushed.update(unflushed)
            h.shutdown()
        except Exception as exc:  # every client error fails the test
            self.errors.append(f"{uri}: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads), "a writer hung"


def _wait_for_writes(writers: Writers, n: int = 20) -> None:
    """Positive evidence that the clients are served: ``n`` more writes completed."""
    after = writers.writes + n
    wait_for(lambda: writers.writes > after, 60, what="writes to go on")


def verify(uri: str, flushed: dict[int, bytes]) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = [b for b, data in sorted(flushed.items()) if h.pread(BLOCK, b * BLOCK) != data]
    h.shutdown()
    assert not bad, f"{len(bad)} flushed blocks lost, e.g. {bad[:5]}"


def make_gateway(tmp_path: Path, *, faults: str = "", log_size: str = "1G") -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    gw = GatewayProcess(
        tmp_path / "gw",
        ["vol0:512M", "vol1:256M"],
        log_size=log_size,
        tcp_port=free_port(),
        extra_args=["--config", str(config)],
    )
    gw.data_dir.mkdir()
    os.environ.pop("SGW_SWAP_FAULTS", None)
    if faults:
        os.environ["SGW_SWAP_FAULTS"] = faults
    try:
        gw.start()
    finally:
        os.environ.pop("SGW_SWAP_FAULTS", None)
    return gw


@pytest.fixture
def fio() -> str:
    return need("fio")


@dataclass
class FioLoop:
    """fio writing vol1 over NBD with checksums it verifies as it goes, in runs of a few
    seconds one after another until stopped; every run must exit 0 (no I/O error, no bad
    data) and write something."""

    uri: str
    runs: list[dict[str, object]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> FioLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            res = subprocess.run(
                [
                    *("fio", "--name=swap", "--ioengine=nbd", f"--uri={self.uri}"),
                    *("--rw=randwrite", "--bs=16k", "--iodepth=8", "--size=128M"),
                    *("--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1"),
                    *("--fsync=32", "--time_based", "--runtime=5", "--output-format=json"),
                    "--verify_state_save=0",  # no local-*-verify.state in the working dir
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if res.returncode != 0:
                self.failures.append(f"fio exited {res.returncode}: {res.stderr[-1000:]}")
                return
            job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
            self.runs.append(job)
            if job["error"] != 0 or job["write"]["io_bytes"] == 0:
                self.failures.append(f"fio run: error {job['error']}, {job['write']['io_bytes']} B")

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(180)
        assert not self._thread.is_alive(), "fio hung"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_twenty_swaps_under_load_fail_no_io(tmp_path: Path, fio: str) -> None:
    gw = make_gateway(tmp_path)
    try:
        # 300 MiB in the log, not destaged: green indexes it, then catches up the rest.
        h = nbd.NBD()
        h.connect_uri(gw.uri("vol0"))
        fill = random.Random(1).randbytes(4 * MIB)
        for i in range(75):
            h.pwrite(fill, (i * 4 * MIB) % (300 * MIB))
        h.flush()
        h.shutdown()
        used = admin_status(gw)["write_log"]["used"]  # type: ignore[index]
        assert used >= 256 * MIB, f"the log holds only {used} bytes"

        blocks = 512 * MIB // BLOCK
        writers = Writers(
            [gw.uri("vol0"), gw.uri("vol0"), gw.tcp_uri("vol0")], blocks // 2, []
        ).start()
        # The writers' blocks are in the lower half; the fill went to the first 300 MiB.
        fio_loop = FioLoop(gw.uri("vol1")).start()
        pauses = []
        descriptors = []
        try:
            wait_for(lambda: writers.writes > 50, 60, what="the writers to get going")
            [before] = serving(gw.data_dir)
            for _ in range(20):
                answer = upgrade(gw)
                pauses.append(float(answer["pause_s"]))
                print(f"swap {len(pauses)}: pause {pauses[-1]:.4f} s, writes {writers.writes}")
                [pid] = serving(gw.data_dir)  # exactly one daemon serves after a swap
                # The serving daemon says whom it took over from and the pause.
                daemon: Any = admin_status(gw)["daemon"]
                assert daemon["pid"] == pid == answer["pid"], (daemon, pid, answer)
                assert daemon["took_over"]["from_pid"] == before
                assert daemon["took_over"]["pause_s"] == pytest.approx(pauses[-1], abs=1e-5)
                before = pid
                descriptors.append(len(os.listdir(f"/proc/{pid}/fd")))
                _wait_for_writes(writers)
        finally:
            fio_loop.stop()
            writers.stop()
        assert not fio_loop.failures, fio_loop.failures
        assert len(fio_loop.runs) >= 2, "fio ran across too few swaps"
        assert not writers.errors, writers.errors[:5]
        assert len(pauses) == 20
        # Nothing piles up from one daemon to the next (a socket kept open by a stray
        # descriptor never closes for its client).
        assert descriptors[-1] <= descriptors[0] + 2, descriptors
        # Everything flushed is there, also after the last green is killed outright.
        verify(gw.uri("vol0"), writers.flushed)
        for pid in serving(gw.data_dir):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not serving(gw.data_dir), 30, what="the killed gateway to go")
        assert gw.proc is not None
        gw.proc.wait(30)  # the first daemon, gone since the first swap
        gw.proc = None
        gw.start()
        verify(gw.uri("vol0"), writers.flushed)
        print(f"swap pauses (s): max {max(pauses):.4f}, all {sorted(pauses)}")
    finally:
        stop_all(gw)


@dataclass
class Faulted:
    gw: GatewayProcess
    writers: Writers


@pytest.fixture
def faulted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Faulted]:
    """A gateway started with the fault named by the test's parameter, one libnbd writer
    on each listener."""
    gw = make_gateway(tmp_path, faults=request.param, log_size="256M")
    writers = Writers([gw.uri("vol0"), gw.tcp_uri("vol0")], 256 * MIB // BLOCK).start()
    try:
        wait_for(lambda: writers.writes > 20, 60, what="the writers to get going")
        yield Faulted(gw, writers)
    finally:
        writers.stop()
        stop_all(gw)


def _after_fault(f: Faulted, *, blue_serves: bool) -> None:
    """Exactly one daemon serves, the writers go on without an error, flushed data is
    all there."""
    pids = serving(f.gw.data_dir)
    assert len(pids) == 1, f"daemons serving: {pids}\n{f.gw.log_text()}"
    assert f.gw.proc is not None
    assert (pids[0] == f.gw.proc.pid) == blue_serves, f.gw.log_text()
    _wait_for_writes(f.writers)
    f.writers.stop()
    assert not f.writers.errors, f.writers.errors[:5]
    verify(f.gw.uri("vol0"), f.writers.flushed)


@pytest.mark.parametrize(
    "faulted",
    [
        "green-before-indexed=exit",
        "green-before-ready=exit",
        "green-after-handover=exit",
        "green-before-prepared=exit",
        "blue-corrupt-record",
        "blue-record-version",
    ],
    indirect=True,
)
def test_a_swap_called_off_leaves_blue_serving(faulted: Faulted) -> None:
    answer = upgrade(faulted.gw, check=False)
    assert answer["returncode"] != 0, "the swap should have been called off"
    assert "swap" in str(answer["stderr"]) or "daemon" in str(answer["stderr"]), answer
    _after_fault(faulted, blue_serves=True)
    wait_for(
        lambda: "swap_failed" in buffered_health_events(faulted.gw.data_dir),
        what="swap_failed reported",
    )
    assert "restart_after_crash" not in buffered_health_events(faulted.gw.data_dir)


@pytest.mark.parametrize("faulted", ["blue-after-handover=exit"], indirect=True)
def test_blue_killed_after_the_fence_green_serves(faulted: Faulted) -> None:
    answer = upgrade(faulted.gw, check=False)
    assert answer["returncode"] != 0  # blue died before it could answer
    assert faulted.gw.proc is not None
    faulted.gw.proc.wait(30)
    _after_fault(faulted, blue_serves=False)


@pytest.mark.parametrize("faulted", ["blue-after-go=exit"], indirect=True)
def test_blue_killed_after_go_green_serves(faulted: Faulted) -> None:
    upgrade(faulted.gw, check=False)
    assert faulted.gw.proc is not None
    faulted.gw.proc.wait(30)
    _after_fault(faulted, blue_serves=False)


def test_a_swap_to_a_release_slot_makes_it_current(tmp_path: Path) -> None:
    """Release slots as on the appliance (``ROOT/releases/VERSION``, ``ROOT/current``;
    both slots this virtualenv): once green serves, ``current`` names its slot and the
    previous slot stays; a release that is not a slot leaves ``current`` alone."""
    root = tmp_path / "opt"
    (root / "releases").mkdir(parents=True)
    for version in ("1", "2"):
        os.symlink(RELEASE, root / "releases" / version)
    os.symlink(root / "releases" / "1", root / "current")
    gw = make_gateway(tmp_path, log_size="129M")
    writers = Writers([gw.uri("vol0")], 64 * MIB // BLOCK).start()
    try:
        wait_for(lambda: writers.writes > 20, 60, what="the writer to get going")
        answer = upgrade(gw, to=str(root / "releases" / "2"))
        assert answer["current"] == {
            "switched": True,
            "link": str(root / "current"),
            "release": str(root / "releases" / "2"),
            "previous": str(root / "releases" / "1"),
            "reason": "",
        }
        assert os.readlink(root / "current") == str(root / "releases" / "2")
        # Green reports the swap at once (no provider here: the report waits on disk).
        wait_for(
            lambda: "swap_done" in buffered_health_events(gw.data_dir), what="swap_done reported"
        )
        [pid] = serving(gw.data_dir)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert str(root / "releases" / "2" / "bin" / "sgw").encode() in f.read().split(b"\0")
        # Not a slot: swapped all the same, current unchanged.
        answer = upgrade(gw)
        assert answer["current"]["switched"] is False
        assert "is not a release slot" in answer["current"]["reason"]
        assert os.readlink(root / "current") == str(root / "releases" / "2")
        assert os.path.islink(root / "releases" / "1")
        _wait_for_writes(writers)
        writers.stop()
        assert not writers.errors, writers.errors[:5]
        verify(gw.uri("vol0"), writers.flushed)
    finally:
        writers.stop()
        stop_all(gw)


def remote_version(gw: GatewayProcess) -> int:
    """The map version the gateway last recorded committing vol0 at (volumes.json)."""
    registry = json.loads((gw.data_dir / "volumes.json").read_text())
    return int(registry["vol0"].get("remote_version") or 0)


@pytest.mark.timeout(300)
def test_blue_commits_while_green_indexes_and_green_uploads_on_top(
    tmp_path: Path, provider_factory: type[ProviderProcess]
) -> None:
    """Blue's destager commits to the provider after green read the volume registry (green
    dawdles before it reports the log indexed): green must upload on top of blue's last
    commit, not refuse the provider's map as a foreign writer's."""
    provider = provider_factory(tmp_path / "provider").start()
    config = tmp_path / "gateway.toml"
    config.write_text('[destage]\nstart_fill = 0.01\nidle_seconds = 0.2\nbatch = "1M"\n')
    gw = GatewayProcess(
        tmp_path / "gw",
        ["vol0:64M"],
        log_size="129M",
        extra_args=["--config", str(config), "--provider", provider.url],
    )
    gw.data_dir.mkdir()
    os.environ["SGW_SWAP_FAULTS"] = "green-before-indexed=sleep:10"
    try:
        gw.start()
    finally:
        os.environ.pop("SGW_SWAP_FAULTS", None)
    writers = Writers([gw.uri("vol0")], 64 * MIB // BLOCK).start()
    swap: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: remote_version(gw) > 0, 60, what="the first commit")
        swap = subprocess.Popen(
            [
                *(SGW, "gateway", "upgrade", "--to", RELEASE),
                *("--data-dir", str(gw.data_dir), "--output", "json"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Green has read the registry once it sleeps at its fault point; blue commits on.
        wait_for(
            lambda: "swap fault point reached" in gw.log_messages(), 60, what="green to dawdle"
        )
        read_by_green = remote_version(gw)
        wait_for(
            lambda: remote_version(gw) > read_by_green,
            8,
            what="blue to commit while green dawdles",
        )
        out, _ = swap.communicate(timeout=120)
        assert swap.returncode == 0, gw.log_text()
        assert json.loads(out)["version"]
        [pid] = serving(gw.data_dir)
        assert gw.proc is not None and pid != gw.proc.pid
        committed = remote_version(gw)
        wait_for(lambda: remote_version(gw) > committed, 60, what="green to commit on top of blue")
        writers.stop()
        assert not writers.errors, writers.errors[:5]

        def destaged() -> bool:
            volumes: Any = admin_status(gw)["volumes"]
            return bool(volumes[0]["dirty_bytes"] == 0)

        wait_for(destaged, 60, what="green to destage everything")
        destager: Any = admin_status(gw)["destager"]
        assert destager["failures"] == 0 and destager["last_error"] is None, destager
        verify(gw.uri("vol0"), writers.flushed)
    finally:
        if swap is not None and swap.poll() is None:
            swap.kill()
        writers.stop()
        stop_all(gw)


def test_a_second_daemon_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, log_size="129M")
    try:
        second = subprocess.run(
            [
                *(SGW, "gateway", "serve", "--data-dir", str(gw.data_dir)),
                *("--log-size", "129M", "--volume", "vol0:512M"),
                *("--nbd", f"unix:{tmp_path / 'other.sock'}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "another gateway daemon serves" in second.stderr
        assert len(serving(gw.data_dir)) == 1
    finally:
        stop_all(gw)
