"""PowerCutError safety of the lazy restore: power cuts simulated in-process, and kill -9.

The property, checked at every crash point: every chunk that no mark on its path from the
root covers reads its final content (the snapshot, overlaid with the user writes made
since), so restoring what is marked and replaying the log completes the volume; and after
the restart completes, the volume is exactly that content.

A power cut (``VolatileStore``) keeps writes in memory until a sync and then persists any
subset of the unsynced ones, torn at 512-byte sectors: the case that needs the syncs.
kill -9 keeps the page cache, but it stops the restorer at arbitrary moments between
steps, with user writes and reads racing the background walk.

Set SGW_RESTORE_SEED to replay a kill -9 run; the seed is printed on failure.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sgw.gateway.volume.base import FileBaseStore
from sgw.gateway.volume.restore_tree import MARK_SECTOR, TreeRestore, tree_path
from tests.fixtures.restore_child import BLOCK, snapshot_chunk, user_block

KIB = 1 << 10
ROOT = Path(__file__).resolve().parents[2]


class PowerCutError(Exception):
    """The simulated power cut: the store refuses every operation from then on."""


class VolatileStore(FileBaseStore):
    """Writes and zeroes stay in memory (the page cache) until ``sync`` puts them in the
    file (the disk). Operation number ``crash_at`` (writes, zeroes and syncs, from 1)
    raises PowerCutError instead of running, and so does everything after it."""

    def __init__(self, path: str, size: int, crash_at: int | None) -> None:
        super().__init__(path, size, create=False)
        self.cache: list[tuple[int, bytes]] = []
        self.ops = 0
        self.crash_at = crash_at
        self.crashed = False
        self._lock = threading.Lock()

    def _operation(self) -> None:
        with self._lock:
            if self.crashed:
                raise PowerCutError("after the power cut")
            self.ops += 1
            if self.ops == self.crash_at:
                self.crashed = True
                raise PowerCutError(f"power cut at operation {self.ops}")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._operation()
        with self._lock:
            self.cache.append((offset, bytes(data)))

    def zero(self, offset: int, length: int, punch: bool) -> None:
        self._operation()
        with self._lock:
            self.cache.append((offset, bytes(length)))

    def sync(self) -> None:
        self._operation()
        with self._lock:
            for offset, data in self.cache:
                FileBaseStore.write(self, offset, data)
            self.cache.clear()

    def read(self, offset: int, length: int) -> bytes:
        if self.crashed:
            raise PowerCutError("after the power cut")
        with self._lock:  # not in the middle of a sync that moves the cache to the file
            buf = bytearray(FileBaseStore.read(self, offset, length))
            for start, data in self.cache:
                lo, hi = max(start, offset), min(start + len(data), offset + length)
                if lo < hi:
                    buf[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(buf)

    def readinto(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.read(offset, len(buf))

    def power_cut(self, rng: random.Random) -> None:
        """Persists a random subset of the unsynced writes, in order, torn at sectors."""
        for offset, data in self.cache:
            if rng.random() < 0.5:
                continue
            for pos in range(0, len(data), 512):
                if rng.random() < 0.7:
                    FileBaseStore.write(self, offset + pos, data[pos : pos + 512])
        self.cache.clear()


@dataclass
class Model:
    """What the volume must hold: the snapshot, overlaid with the user blocks written.

    ``certain`` maps a block offset to the data last written there for sure; ``maybe`` to
    data whose write may or may not have happened (in flight at a crash); ``pending``
    (power-cut tests) to data still in the write log, replayed after a restart.
    """

    size: int
    chunk_size: int
    snap_seed: int
    token: bytes
    certain: dict[int, bytes] = field(default_factory=dict)
    maybe: dict[int, set[bytes]] = field(default_factory=dict)
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    _snapshot: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return -(-self.size // self.chunk_size)

    def length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def snapshot(self, index: int) -> bytes:
        if index not in self._snapshot:
            data = snapshot_chunk(self.snap_seed, index, self.length(index))
            self._snapshot[index] = bytes(self.length(index)) if data is None else data
        return self._snapshot[index]

    async def fetch(self, index: int) -> bytes | None:
        return snapshot_chunk(self.snap_seed, index, self.length(index))

    def expected(self, offset: int) -> set[bytes]:
        """The contents block ``offset`` may have."""
        index = offset // self.chunk_size
        pos = offset - index * self.chunk_size
        base = self.certain.get(offset, self.snapshot(index)[pos : pos + BLOCK])
        return {base} | self.maybe.get(offset, set())

    def check(self, path: str, *, complete: bool) -> None:
        """Every chunk no mark covers holds what it must; with ``complete`` all of them."""
        with open(path, "rb") as f:
            disk = f.read()
        store = FileBaseStore(path, self.size, create=False)
        try:
            probe = TreeRestore(store, self.size, self.chunk_size, self.token, self.fetch)
            cs = self.chunk_size
            marked = {
                i for i in range(self.n) if probe.is_marked(disk[i * cs : i * cs + MARK_SECTOR], i)
            }
        finally:
            store.close()
        logged = {offset for offset, _ in self.pending}  # the log replay rewrites these
        for i in range(self.n):
            covered = [node.chunk for node in tree_path(self.n, i) if node.chunk in marked]
            if complete:
                assert not covered, f"chunk {i} is still covered by marks {covered}"
            elif covered:
                continue
            for offset in range(i * cs, i * cs + self.length(i), BLOCK):
                if offset in logged:
                    continue
                assert disk[offset : offset + BLOCK] in self.expected(offset), (
                    f"chunk {i} is not covered by a mark but its block at {offset} is wrong "
                    f"(marked: {sorted(marked)})"
                )


def new_volume(tmp_path: Path, size: int, seed: int) -> str:
    """A volume file full of garbage, so that an unrestored chunk never reads right."""
    path = tmp_path / f"volume-{seed}"
    path.write_bytes(random.Random(seed).randbytes(size))
    return str(path)


# -- power cuts, simulated in-process ----------------------------------------------------


async def boot(
    model: Model,
    store: VolatileStore,
    rng: random.Random,
    *,
    begin: bool,
    concurrency: int,
    on_begun: list[bool],
) -> None:
    """One life of the gateway: (begin,) replay the log, a few reads and user writes, then
    the background restore. Sequential with ``concurrency`` 1, so crash points repeat."""
    tr = TreeRestore(store, model.size, model.chunk_size, model.token, model.fetch)
    if begin:
        await tr.begin()
        on_begun.append(True)

    async def destage(offset: int, data: bytes) -> None:
        await tr.ensure(offset, BLOCK)
        await asyncio.to_thread(store.write, offset, data)
        await asyncio.to_thread(store.sync)
        model.pending.remove((offset, data))
        model.certain[offset] = data

    for offset, data in list(model.pending):
        await destage(offset, data)

    async def actions() -> None:
        for _ in range(6):
            if rng.random() < 0.5:
                offset = rng.randrange(model.size)
                length = rng.randrange(1, 2 * model.chunk_size)
                await tr.ensure(offset, length)
                first, end = offset // BLOCK * BLOCK, min(model.size, offset + length)
                logged = {o for o, _ in model.pending}
                for block in range(first, end, BLOCK):
                    if block not in logged:
                        assert store.read(block, BLOCK) in model.expected(block), (
                            f"block {block} of chunk {block // model.chunk_size} is wrong after "
                            f"ensure({offset}, {length})"
                        )
            else:
                chunk = rng.randrange(model.n)
                blocks = model.length(chunk) // BLOCK
                offset = chunk * model.chunk_size + rng.choice([0, rng.randrange(blocks)]) * BLOCK
                data = rng.randbytes(BLOCK)
                model.pending.append((offset, data))  # in the log: acknowledged
                await destage(offset, data)

    if concurrency == 1:
        await actions()
        await tr.run_background(concurrency=1)
    else:
        await asyncio.gather(actions(), tr.run_background(concurrency=concurrency))
    assert tr.done


def power_cut_scenario(
    tmp_path: Path, seed: int, crash_points: list[int], concurrency: int
) -> list[int]:
    """Boots until one finishes, cutting the power at the given operation of each boot.

    Returns the operations each boot performed."""
    rng = random.Random(seed)
    chunk_size = 8 * KIB
    size = 12 * chunk_size + 4 * KIB  # 13 chunks, the last one short
    model = Model(size, chunk_size, snap_seed=seed % 5, token=rng.randbytes(16))
    path = new_volume(tmp_path, size, seed)
    begun: list[bool] = []
    ops: list[int] = []
    for crash_at in [*crash_points, None]:
        store = VolatileStore(path, size, crash_at)
        try:
            asyncio.run(
                boot(
                    model,
                    store,
                    random.Random(rng.random()),
                    begin=not begun,
                    concurrency=concurrency,
                    on_begun=begun,
                )
            )
        except PowerCutError:
            assert store.crashed
            store.power_cut(rng)
            ops.append(store.ops)
            store.close()
            if begun:
                model.check(path, complete=False)
            continue
        ops.append(store.ops)
        store.power_cut(rng)  # a finished restore is durable: losing the cache changes nothing
        store.close()
        break
    assert not model.pending
    model.check(path, complete=True)
    return ops


def test_power_cut_at_every_operation(tmp_path: Path) -> None:
    """Sequential boots: every crash point of the first boot, each followed by a second
    power cut somewhere in the restart, with random losses and torn sectors."""
    total = power_cut_scenario(tmp_path, 0, [], concurrency=1)[0]
    assert total > 50
    rng = random.Random(1)
    for crash_at in range(1, total + 1):
        for attempt in range(2):
            seed = crash_at * 10 + attempt
            second = [rng.randrange(1, total)] if attempt else []
            power_cut_scenario(tmp_path, seed, [crash_at, *second], concurrency=1)
        for stale in tmp_path.iterdir():
            stale.unlink()


def test_power_cut_with_concurrent_restores(tmp_path: Path) -> None:
    """Reads, user writes and four background workers at once, cut at random points."""
    rng = random.Random(2)
    for seed in range(60):
        cuts = [rng.randrange(1, 80) for _ in range(rng.randrange(1, 4))]
        power_cut_scenario(tmp_path, 1000 + seed, cuts, concurrency=4)
        for stale in tmp_path.iterdir():
            stale.unlink()


# -- kill -9 of a restorer in a subprocess -----------------------------------------------

KILL_ROUNDS = 20  # at least this many kills
MAX_KILL_ROUNDS = 40
SOFT_BUDGET = 12.0  # seconds: no round past KILL_ROUNDS starts later than this


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the restorer did not report in time"
    return proc.stdout.readline().decode()


def apply_reports(model: Model, lines: list[str]) -> None:
    for line in lines:
        kind, *rest = line.split()
        if kind == "I":
            offset, key = int(rest[0]), rest[1]
            model.maybe[offset] = {user_block(key)}
        elif kind == "D":
            offset, key = int(rest[0]), rest[1]
            model.certain[offset] = user_block(key)
            model.maybe.pop(offset, None)


@pytest.mark.slow
def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    seed = int(os.environ.get("SGW_RESTORE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    chunk_size = 64 * KIB
    size = 191 * chunk_size + 16 * KIB  # 192 chunks, the last one short
    started = time.monotonic()
    kills = finished = 0
    model: Model | None = None
    path = ""
    begun = False
    try:
        while kills < MAX_KILL_ROUNDS and (
            kills < KILL_ROUNDS or time.monotonic() - started < SOFT_BUDGET
        ):
            if model is None:  # a new volume from a new snapshot
                model = Model(
                    size, chunk_size, snap_seed=rng.randrange(1000), token=rng.randbytes(16)
                )
                if path:
                    os.unlink(path)
                path = new_volume(tmp_path, size, rng.randrange(1000))
                begun = False
            args = [path, str(size), str(chunk_size), model.token.hex(), str(model.snap_seed)]
            args += ["0" if begun else "1", str(rng.randrange(1 << 30))]
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fixtures.restore_child", *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            lines = [read_line(proc, 30)]
            assert lines[0].strip() == "ready", (lines, proc.communicate()[1].decode())
            begun = True
            time.sleep(rng.uniform(0, 0.3))
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            lines += out.decode().splitlines()
            apply_reports(model, lines)
            if killed:
                kills += 1
                model.check(path, complete=False)
            else:
                assert proc.returncode == 0, err.decode()[-3000:]
                assert lines[-1].strip() == "finished"
                model.check(path, complete=True)
                finished += 1
                model = None
        # The last volume: run the restorer to its end.
        if model is not None:
            args = [path, str(size), str(chunk_size), model.token.hex(), str(model.snap_seed)]
            args += ["0", str(rng.randrange(1 << 30))]
            done = subprocess.run(
                [sys.executable, "-m", "tests.fixtures.restore_child", *args],
                cwd=ROOT,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr.decode()[-3000:]
            apply_reports(model, done.stdout.decode().splitlines())
            model.check(path, complete=True)
            finished += 1
    except BaseException:
        print(f"SGW_RESTORE_SEED={seed} ({kills} kills)")
        raise
    assert kills >= KILL_ROUNDS
    assert finished >= 1
