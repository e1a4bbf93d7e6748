"""Crash consistency: random I/O through libnbd, kill -9 at a random moment, restart, verify.

The contract: a write is acknowledged once it is in the log; FLUSH and FUA reply only after
fdatasync. After kill -9 at any moment a restart recovers every write acknowledged before
a completed FLUSH (or written with FUA), discards a torn tail, applies nothing twice.

The model keeps, byte-exact, the volume as of the last durable point (``durable``) and the
writes issued since that may or may not have reached the log (``pending``: acknowledged
but not flushed, or still in flight when the daemon died). Requests in flight never
overlap each other (they may share a 4 KiB block), so the order in which overlapping
writes were applied is always known. After a restart the volume is split at the edges of
the pending writes; each piece must equal its durable bytes or the bytes of one pending
write that covers it. Earlier rounds' data is part of ``durable``, so every round checks
the whole volume.

Set SGW_CRASH_SEED to replay a run; the seed is printed on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nbd
import pytest

from sgw.gateway.volume.wal import WriteLog
from tests.fixtures.daemons import SMALL_LOG, GatewayProcess

KIB = 1 << 10
MIB = 1 << 20
BLOCK = 4096
VOL_SIZE = 64 * MIB
MIN_ROUNDS = 20
MAX_ROUNDS = 30
SOFT_BUDGET = 55.0  # seconds: no round past MIN_ROUNDS starts later than this
MAX_IN_FLIGHT = 12
HOT = 2 * MIB  # a small region that takes a share of the I/O: overwrites, shared blocks

# Destage settings, cycled so that rounds see a busy destager, an idle one, and a full log
# where writers wait for the destager (lazy: it only runs when someone waits for space).
CONFIGS = {
    "eager": {"start_fill": 0.0, "idle_seconds": 0.05, "batch": "1M"},
    "normal": {"start_fill": 0.02, "idle_seconds": 0.3, "batch": "4M"},
    "lazy": {"start_fill": 1.0, "idle_seconds": 3600.0, "batch": "32M"},
}
SCHEDULE = ["eager", "normal", "lazy", "lazy", "lazy", "lazy", "normal", "eager"]


@dataclass
class Op:
    """One request: its range, what it leaves there, and what became of it."""

    seq: int
    kind: str  # write, zero, trim, read, flush
    offset: int = 0
    length: int = 0
    fua: bool = False
    # (offset, bytes) this request sets; trims set only their whole inner blocks
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    buf: nbd.Buffer | None = None
    covers: list[int] = field(default_factory=list)  # flush: writes acknowledged before it
    expect: bytes = b""  # read: what it must return
    done: bool = False
    error: int = 0


class Model:
    """Durable bytes, the current bytes, and the writes that may or may not survive."""

    def __init__(self, size: int) -> None:
        self.durable = bytearray(size)
        self.current = bytearray(size)
        self.pending: dict[int, list[tuple[int, bytes]]] = {}  # seq -> pieces still live
        self.ranges: dict[int, list[tuple[int, int]]] = {}  # seq -> the ranges it set
        self.acked: set[int] = set()

    def issue(self, op: Op) -> None:
        for off, data in op.pieces:
            self.current[off : off + len(data)] = data
        self.pending[op.seq] = list(op.pieces)
        self.ranges[op.seq] = [(off, off + len(data)) for off, data in op.pieces]

    def make_durable(self, seq: int) -> None:
        """``seq`` is on stable storage. Pending writes issued before it were acknowledged
        before it was sent (no overlap in flight), so where it overlaps them they are
        overwritten for good: they lose that range."""
        pieces = self.pending.pop(seq, None)
        if pieces is None:
            return
        self.acked.discard(seq)
        for off, data in pieces:
            self.durable[off : off + len(data)] = data
        full = self.ranges.pop(seq)
        for other in [s for s in self.pending if s < seq]:
            self.pending[other] = _cut(self.pending[other], full)

    def reset(self, actual: bytes | bytearray) -> None:
        self.durable[:] = actual
        self.current[:] = actual
        self.pending.clear()
        self.ranges.clear()
        self.acked.clear()

    def check(self, actual: bytes | bytearray) -> str | None:
        """None if ``actual`` is a state the contract allows, else where it is not."""
        durable = self.durable
        pieces = [(off, data) for ps in self.pending.values() for off, data in ps]
        for chunk in range(0, len(actual), MIB):
            if actual[chunk : chunk + MIB] == durable[chunk : chunk + MIB]:
                continue
            for b in range(chunk, chunk + MIB, BLOCK):
                if actual[b : b + BLOCK] == durable[b : b + BLOCK]:
                    continue
                problem = self._check_block(actual, b, pieces)
                if problem:
                    return problem
        return None

    def _check_block(
        self, actual: bytes | bytearray, b: int, pieces: list[tuple[int, bytes]]
    ) -> str | None:
        end = b + BLOCK
        here = [(off, data) for off, data in pieces if off < end and off + len(data) > b]
        cuts = {b, end}
        for off, data in here:
            cuts.add(max(off, b))
            cuts.add(min(off + len(data), end))
        edges = sorted(cuts)
        for s, e in itertools.pairwise(edges):
            got = actual[s:e]
            if got == self.durable[s:e]:
                continue
            if any(
                off <= s and e <= off + len(data) and got == data[s - off : e - off]
                for off, data in here
            ):
                continue
            covering = sum(1 for off, data in here if off <= s and e <= off + len(data))
            return (
                f"bytes [{s}, {e}) (block {s // BLOCK}) match neither the flushed data nor "
                f"any of the {covering} later write(s) that cover them"
            )
        return None


def _cut(pieces: list[tuple[int, bytes]], ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """``pieces`` without the byte ranges ``ranges``."""
    for rs, re_ in ranges:
        out = []
        for off, data in pieces:
            end = off + len(data)
            if end <= rs or off >= re_:
                out.append((off, data))
                continue
            if off < rs:
                out.append((off, data[: rs - off]))
            if end > re_:
                out.append((re_, data[re_ - off :]))
        pieces = out
    return pieces


class Workload:
    """Issues random requests on one libnbd handle until the daemon dies under it."""

    def __init__(self, rng: random.Random, model: Model, h: nbd.NBD, killing: threading.Event):
        self.rng = rng
        self.model = model
        self.h = h
        self.killing = killing
        self.in_flight: dict[int, Op] = {}
        self.failures: list[str] = []
        self.seq = 0
        self.stats = {"write": 0, "fua": 0, "zero": 0, "trim": 0, "read": 0, "flush": 0}
        self.since_flush = 0
        self.flush_every = rng.randint(2, 8)
        # Quiet phase: no more writes; once they are all answered, one FLUSH, then reads
        # only, so that the newest records in the log are durable when the kill comes.
        self.quiet = False
        self.quiet_flush: Op | None = None

    # -- choosing requests --------------------------------------------------------------

    def _range(self, lo: int, hi: int) -> tuple[int, int]:
        rng = self.rng
        length = int(2 ** rng.uniform(lo, hi))
        align = rng.random()
        if align < 0.35:
            length = max(BLOCK, length & ~(BLOCK - 1))
        elif align < 0.6:
            length = max(512, length & ~511)
        area_start, area = (0, HOT) if rng.random() < 0.35 else (0, VOL_SIZE)
        length = min(length, area)
        offset = area_start + rng.randrange(0, area - length + 1)
        where = rng.random()
        if where < 0.4:
            offset &= ~(BLOCK - 1)
        elif where < 0.7:
            offset &= ~511
        return offset, length

    def _free(self, offset: int, length: int) -> bool:
        end = offset + length
        return all(
            op.kind == "flush" or end <= op.offset or offset >= op.offset + op.length
            for op in self.in_flight.values()
        )

    def _next_op(self) -> Op | None:
        rng = self.rng
        self.seq += 1
        if self.quiet:
            if self.quiet_flush is None:
                if self.in_flight:
                    return None
                self.quiet_flush = Op(self.seq, "flush", covers=sorted(self.model.acked))
                return self.quiet_flush
            if not self.quiet_flush.done:
                return None
        elif self.since_flush >= self.flush_every:
            self.since_flush = 0
            self.flush_every = rng.randint(2, 8)
            return Op(self.seq, "flush", covers=sorted(self.model.acked))
        r = 1.0 if self.quiet else rng.random()
        if r < 0.72:
            kind, lo, hi = "write", 9, 18  # 512 B .. 256 KiB
        elif r < 0.80:
            kind, lo, hi = "zero", 9, rng.choice([16, 22])  # up to 4 MiB: big intervals
        elif r < 0.88:
            kind, lo, hi = "trim", 9, rng.choice([16, 22])
        else:
            kind, lo, hi = "read", 9, 18
        for _ in range(20):
            offset, length = self._range(lo, hi)
            if self._free(offset, length):
                break
        else:
            return None
        op = Op(self.seq, kind, offset, length, fua=kind != "read" and rng.random() < 0.15)
        if kind == "write":
            op.pieces = [(offset, rng.randbytes(length))]
        elif kind == "zero":
            op.pieces = [(offset, bytes(length))]
        elif kind == "trim":
            start = (offset + BLOCK - 1) & ~(BLOCK - 1)
            end = (offset + length) & ~(BLOCK - 1)
            if start < end:
                op.pieces = [(start, bytes(end - start))]
        else:
            op.expect = bytes(self.model.current[offset : offset + length])
        if kind != "read":
            self.since_flush += 1
        return op

    # -- issuing and completing ------------------------------------------------------------

    def issue(self) -> bool:
        """Issues one request; False if the handle is dead."""
        op = self._next_op()
        if op is None:
            return True
        cb = partial(self._done, op)
        flags = nbd.CMD_FLAG_FUA if op.fua else 0
        h = self.h
        try:
            if op.kind == "write":
                op.buf = nbd.Buffer.from_bytearray(op.pieces[0][1])
                h.aio_pwrite(op.buf, op.offset, completion=cb, flags=flags)
            elif op.kind == "zero":
                if self.rng.random() < 0.5:
                    flags |= nbd.CMD_FLAG_NO_HOLE
                h.aio_zero(op.length, op.offset, completion=cb, flags=flags)
            elif op.kind == "trim":
                h.aio_trim(op.length, op.offset, completion=cb, flags=flags)
            elif op.kind == "read":
                op.buf = nbd.Buffer(op.length)
                h.aio_pread(op.buf, op.offset, completion=cb)
            else:
                h.aio_flush(completion=cb)
        except nbd.Error:
            if not self.killing.is_set():
                raise
            self._unknown(op)
            return False
        self.stats[op.kind] += 1
        self.stats["fua"] += op.fua
        if op.kind in ("write", "zero", "trim"):
            self.model.issue(op)
        self.in_flight[op.seq] = op
        return True

    def _unknown(self, op: Op) -> None:
        """Never reached the server (or we cannot know): it may or may not be applied."""
        if op.kind in ("write", "zero", "trim"):
            self.model.issue(op)

    def _done(self, op: Op, err: object) -> int:
        error = int(getattr(err, "value", err))  # type: ignore[call-overload]
        op.done, op.error = True, error
        self.in_flight.pop(op.seq, None)
        if error:
            if not self.killing.is_set():
                self.failures.append(f"{op.kind} at {op.offset}+{op.length} failed: {error}")
            return 1
        model = self.model
        if op.kind == "read":
            assert op.buf is not None
            got = bytes(op.buf.to_bytearray())
            if got != op.expect:
                bad = next(i for i in range(op.length) if got[i] != op.expect[i])
                self.failures.append(
                    f"read at {op.offset}+{op.length} returned wrong data at byte "
                    f"{op.offset + bad} (while the gateway was running)"
                )
        elif op.kind == "flush":
            for seq in op.covers:  # in issue order
                model.make_durable(seq)
        elif op.fua:
            model.make_durable(op.seq)
        else:
            model.acked.add(op.seq)
        op.buf = None
        return 1

    def run(self, deadline: float, quiet_at: float) -> None:
        h = self.h
        while True:
            self.quiet = time.monotonic() >= quiet_at
            while len(self.in_flight) < MAX_IN_FLIGHT:
                n = len(self.in_flight)
                if not self.issue() or len(self.in_flight) == n:
                    break
            if h.aio_is_dead() or h.aio_is_closed():
                break
            try:
                h.poll(50)
            except nbd.Error:
                if not self.killing.is_set():
                    raise
                break
            if h.aio_is_dead() or h.aio_is_closed():
                break
            if time.monotonic() > deadline:
                pytest.fail("the daemon was not killed in time (or I/O kept going after)")
        # Whatever did not complete stays pending in the model.
        self.in_flight.clear()


def _config(path: Path, name: str) -> None:
    c = CONFIGS[name]
    path.write_text(
        'log_level = "debug"\n'  # to count destaged batches and writers that waited
        "[destage]\n"
        f"start_fill = {c['start_fill']}\n"
        f"idle_seconds = {c['idle_seconds']}\n"
        f'batch = "{c["batch"]}"\n'
    )


def _read_all(h: nbd.NBD) -> bytes:
    chunk = 4 * MIB
    return b"".join(bytes(h.pread(chunk, off)) for off in range(0, VOL_SIZE, chunk))


def _errors_in_log(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Error" in line:
                out.append(line)
            continue
        if doc.get("level") in ("error", "critical"):
            out.append(line)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_random_io_loses_no_flushed_write(
    gateway_factory: type[GatewayProcess], tmp_path: Path
) -> None:
    seed = int(os.environ.get("SGW_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"crash test seed: {seed} (SGW_CRASH_SEED={seed} to replay)")
    rng = random.Random(seed)
    cfg = tmp_path / "sgw.toml"
    _config(cfg, SCHEDULE[0])
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG, extra_args=["--config", str(cfg)]
    )
    model = Model(VOL_SIZE)
    started = time.monotonic()
    totals: dict[str, int] = {}
    kill_delays = []

    def fail(msg: str) -> None:
        pytest.fail(f"seed {seed}: {msg}\n--- daemon log ---\n{gw.log_text()}")

    rounds = MAX_ROUNDS
    for rnd in range(MAX_ROUNDS + 1):
        gw.start()
        h = nbd.NBD()
        h.connect_uri(gw.uri())
        actual = _read_all(h)
        problem = model.check(actual)
        if problem:
            fail(f"after the crash of round {rnd - 1}: {problem}")
        model.reset(actual)
        h.flush()  # what was recovered is now durable by the contract too
        if rnd == rounds:
            h.shutdown()
            del h
            break

        killing = threading.Event()

        def kill(ev: threading.Event = killing) -> None:
            ev.set()
            gw.kill()

        if SCHEDULE[rnd % len(SCHEDULE)] == "lazy":  # long enough to fill the log
            delay = rng.uniform(0.4, 1.5)
        else:
            delay = rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.1, 1.2)])
        kill_delays.append(delay)
        work = Workload(rng, model, h, killing)
        quiet = rng.random() < 0.3  # then the kill comes after a quiet FLUSH
        if quiet:
            delay += 0.15
        timer = threading.Timer(delay, kill)
        now = time.monotonic()
        timer.start()
        try:
            work.run(deadline=now + delay + 15, quiet_at=now + delay - 0.1 if quiet else 1e18)
        finally:
            timer.join()
        del h
        if work.failures:
            fail(f"round {rnd}: {work.failures[0]}")
        for k, v in work.stats.items():
            totals[k] = totals.get(k, 0) + v
        _config(cfg, SCHEDULE[(rnd + 1) % len(SCHEDULE)])
        if rnd + 1 >= MIN_ROUNDS and time.monotonic() - started > SOFT_BUDGET:
            rounds = rnd + 1  # verify this crash, then stop

    # A clean stop, a restart, and the data is still there.
    final = bytes(model.durable)
    assert gw.stop() == 0
    gw.start()
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    if _read_all(h) != final:
        fail("data changed across a clean restart")
    h.shutdown()
    del h
    gw.stop()

    assert gw.stderr_path is not None
    daemon_log = gw.stderr_path.read_text(errors="replace")
    errors = _errors_in_log(daemon_log)
    if errors:
        fail(f"the daemon logged errors: {errors[:3]}")
    batches = daemon_log.count('"destaged batch"')
    stalls = daemon_log.count('"write stalled: log full"')
    # The test did what it claims: enough writes, and the log wrapped around.
    log, _ = WriteLog.open(str(gw.data_dir / "writelog"))
    head, tail, data_size = log.head, log.tail, log.data_size
    log.close()
    print(
        f"seed {seed}: {rounds} rounds, {totals}, {batches} batches destaged, {stalls} stalls, "
        f"log head {head}, lap {data_size}, kills at {[round(d, 3) for d in kill_delays]}"
    )
    assert rounds >= MIN_ROUNDS
    assert totals["write"] > 1000 and totals["flush"] > 100 and totals["fua"] > 50, totals
    assert totals["zero"] > 50 and totals["trim"] > 50 and totals["read"] > 50, totals
    assert head > data_size, f"seed {seed}: the log never wrapped around (head {head})"
    assert tail > 0
    assert batches > 50, f"seed {seed}: the destager hardly ran ({batches} batches)"
    assert stalls > 0, f"seed {seed}: no writer ever waited for log space"


def test_kill_9_while_the_log_is_created_does_not_brick_the_gateway(
    gateway_factory: type[GatewayProcess], tmp_path: Path
) -> None:
    """The first start formats the write log (preallocate, wipe, superblock). A kill -9 in
    the middle of it must not leave a file that every later start refuses."""
    for i in range(3):
        gw = gateway_factory(tmp_path / f"gw{i}", [f"vol0:{VOL_SIZE}"])
        log_path = gw.data_dir / "writelog"
        proc = subprocess.Popen(gw.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not log_path.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "the daemon never created its log"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        gw.start()  # raises if the daemon exits, with its error message
        h = nbd.NBD()
        h.connect_uri(gw.uri())
        h.pwrite(b"x" * 4096, 0)
        h.flush()
        assert h.pread(4096, 0) == b"x" * 4096
        h.shutdown()
        assert gw.stop() == 0
