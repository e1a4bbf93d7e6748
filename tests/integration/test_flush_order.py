"""The flush path's ordering: the NBD server runs in this process on a unix socket, and every
write-log append, every ``os.fdatasync``/``os.fsync`` (still the real calls) and every reply
the server hands to its transport is recorded in one journal with a total order.

A FLUSH reply, and a FUA write's reply, may leave the server only after an fdatasync of the
write log that began after the append of every write acknowledged before the request, on
any connection (the server offers multi-conn), and ended before the reply. The kill -9 crash
tests cannot see a missing sync: the page cache outlives a killed process, so data that was
never synced still reads back after the restart. Here the order itself is the evidence: a
FLUSH or FUA reply that leaves before its sync fails whatever the page cache holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import struct
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nbd
import pytest
import uvloop

from sgw.gateway.nbd.connection import NbdConnection
from sgw.gateway.nbd.server import NbdServer
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.wal import DATA_START, MIN_DATA_SIZE, WriteLog
from tests.fixtures.nbd_wire import (
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_WRITE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_GO,
    OPT_REPLY_MAGIC,
    REP_ACK,
    REP_INFO,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
)

MIB = 1 << 20
BLOCK = 4096
VOL_SIZE = 64 * MIB
LOG_SIZE = DATA_START + MIN_DATA_SIZE
# A test that hangs (a gate never released, a reply never sent) fails after this long.
WAIT = 30.0

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,  # the gateway daemon's loop
}


# -- the journal ---------------------------------------------------------------------------


@dataclass
class Sync:
    """One fdatasync or fsync: the file, the moment it was called and the one it returned."""

    call: str
    path: str
    start: int
    end: int = 0


@dataclass
class Request:
    """A request as its client saw it: sent at one moment, its reply received at another."""

    conn: int
    cookie: int
    cmd: int
    offset: int = 0
    fua: bool = False
    sent: int = 0
    received: int | None = None
    error: int | None = None

    @property
    def label(self) -> str:
        where = f"connection {self.conn}, cookie {self.cookie}"
        if self.cmd == CMD_FLUSH:
            return f"FLUSH ({where})"
        return f"{'FUA write' if self.fua else 'write'} ({where}, offset {self.offset})"


@dataclass
class Journal:
    """Events of the server, its worker threads and the clients, numbered in one order."""

    log_path: str
    appends: dict[int, list[int]] = field(default_factory=dict)  # volume offset -> moments
    syncs: list[Sync] = field(default_factory=list)
    # (server connection, cookie) -> (moment the reply was handed to the transport, error)
    replies: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _clock: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def tick(self) -> int:
        with self._lock:
            return next(self._clock)

    def log_syncs(self) -> list[Sync]:
        with self._lock:
            return [s for s in self.syncs if s.path == self.log_path and s.end]


class SyncGate:
    """Holds the next fdatasync of the write log (after its start is recorded) until
    released, so that a test can act while a sync is in flight."""

    def __init__(self) -> None:
        self.armed = False
        self.entered: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.release = threading.Event()

    def arm(self) -> asyncio.Event:
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release.clear()
        self.armed = True
        return self.entered

    def hold(self) -> None:
        if not self.armed:
            return
        self.armed = False
        assert self.loop is not None and self.entered is not None
        self.loop.call_soon_threadsafe(self.entered.set)
        if not self.release.wait(WAIT):
            raise TimeoutError("the test never released the held fdatasync")


class RecordingTransport:
    """The server's transport, recording each simple reply the moment before it is handed
    over (the earliest it can leave); every other call goes to the real transport."""

    def __init__(self, inner: Any, journal: Journal, conn: int) -> None:
        self._inner = inner
        self._journal = journal
        self._conn = conn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._note([data])
        self._inner.write(data)

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        parts = list(parts)
        self._note(parts)
        self._inner.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _note(self, parts: list[bytes | bytearray | memoryview]) -> None:
        at = self._journal.tick()
        for part in parts:
            # Writes and flushes are answered with simple replies, one 16-byte part each.
            if len(part) == 16 and struct.unpack_from(">I", part)[0] == SIMPLE_REPLY_MAGIC:
                _magic, error, cookie = struct.unpack(">IIQ", part)
                self._journal.replies[(self._conn, cookie)] = (at, error)


def instrument(monkeypatch: pytest.MonkeyPatch, journal: Journal, gate: SyncGate) -> None:
    """Records appends, syncs and replies into ``journal``; the real functions still run."""
    real_append = WriteLog.append

    def append(self: WriteLog, kind: int, volume: int, offset: int, *args: Any) -> Any:
        rec = real_append(self, kind, volume, offset, *args)
        at = journal.tick()  # after the pwrite returned
        with journal._lock:
            journal.appends.setdefault(offset, []).append(at)
        return rec

    def recording(name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            entry = Sync(name, os.readlink(f"/proc/self/fd/{fd}"), journal.tick())
            if entry.path == journal.log_path:
                gate.hold()
            real(fd)
            entry.end = journal.tick()
            with journal._lock:
                journal.syncs.append(entry)

        return call

    real_made = NbdConnection.connection_made

    def connection_made(self: NbdConnection, transport: Any) -> None:
        conn = journal.connections
        journal.connections += 1
        # Not a subclass: the base class's methods would hide the real transport's.
        real_made(self, cast(asyncio.Transport, RecordingTransport(transport, journal, conn)))

    monkeypatch.setattr(WriteLog, "append", append)
    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", os.fdatasync))
    monkeypatch.setattr(os, "fsync", recording("fsync", os.fsync))
    monkeypatch.setattr(NbdConnection, "connection_made", connection_made)


def assert_flushes_covered(journal: Journal) -> int:
    """Every FLUSH and FUA reply followed a completed fdatasync of the write log that began
    after the append of each write whose reply a client had received before sending the
    request (on any connection), and of the FUA write itself; a request not answered yet is
    passed over. Returns the (request, write) pairs checked."""
    syncs = journal.log_syncs()
    checked = 0
    for req in journal.requests:
        if not (req.cmd == CMD_FLUSH or req.fua):
            continue
        replied = journal.replies.get((req.conn, req.cookie))
        if replied is None:
            assert req.received is None, f"{req.label}: answered, but no reply seen leaving"
            continue
        reply_at, error = replied
        assert error == 0, f"{req.label} failed with error {error}"
        # The latest start of a log sync finished before the reply left: a write is covered
        # if its append came before that start.
        covering = max((s.start for s in syncs if s.end < reply_at), default=0)
        must = [
            w
            for w in journal.requests
            if w.cmd == CMD_WRITE and w.received is not None and w.received < req.sent
        ]
        if req.cmd == CMD_WRITE:
            must.append(req)
        for w in must:
            [appended] = journal.appends[w.offset]
            assert appended < covering, (
                f"{req.label}: its reply was handed to the transport at {reply_at}, but no "
                f"fdatasync of the write log that began after {w.label} was appended (at "
                f"{appended}) had finished by then; log syncs (start, end): "
                f"{[(s.call, s.start, s.end) for s in syncs]}"
            )
        checked += len(must)
    return checked


# -- a raw client ----------------------------------------------------------------------------

_cookies = itertools.count(1)  # unique over every connection of a test run


class Client:
    """One NBD connection in transmission: requests pipelined, replies read as they come."""

    def __init__(
        self, conn: int, journal: Journal, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        self.conn = conn
        self.journal = journal
        self._r, self._w = r, w
        self._waiting: dict[int, tuple[Request, asyncio.Future[int]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def connect(cls, path: str, journal: Journal) -> Client:
        """Connects and negotiates export ``vol0`` (NBD_OPT_GO); checks the server offers
        FLUSH, FUA and multi-conn."""
        conn = journal.connections
        r, w = await asyncio.open_unix_connection(path)
        hello = await r.readexactly(18)
        assert hello[:8] == NBDMAGIC
        w.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = b"vol0"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        tflags = 0
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            assert magic == OPT_REPLY_MAGIC
            payload = await r.readexactly(length)
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, f"option reply {rtype:#x}"
            if struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                _size, tflags = struct.unpack_from(">QH", payload, 2)
        need = TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN
        assert tflags & need == need, f"transmission flags {tflags:#x}"
        # The server numbered its connections in the same order (one handshake at a time).
        assert journal.connections == conn + 1
        return cls(conn, journal, r, w)

    async def _read_replies(self) -> None:
        while self._waiting or not self._w.is_closing():
            try:
                raw = await self._r.readexactly(16)
            except asyncio.IncompleteReadError:
                return
            magic, error, cookie = struct.unpack(">IIQ", raw)
            assert magic == SIMPLE_REPLY_MAGIC
            req, fut = self._waiting.pop(cookie)
            req.received, req.error = self.journal.tick(), error
            fut.set_result(error)

    def _send(
        self, cmd: int, offset: int = 0, data: bytes = b"", fua: bool = False
    ) -> asyncio.Future[int]:
        req = Request(self.conn, next(_cookies), cmd, offset, fua)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[req.cookie] = (req, fut)
        self.journal.requests.append(req)
        flags = CMD_FLAG_FUA if fua else 0
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, req.cookie, offset, len(data))
        req.sent = self.journal.tick()  # before any byte of it leaves
        self._w.write(header + data)
        return fut

    def write(self, offset: int, fua: bool = False) -> asyncio.Future[int]:
        data = random.Random(offset).randbytes(BLOCK)
        return self._send(CMD_WRITE, offset, data, fua)

    def flush(self) -> asyncio.Future[int]:
        return self._send(CMD_FLUSH)

    async def close(self) -> None:
        """Disconnects politely (NBD_CMD_DISC) once every reply arrived."""
        self._w.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self._w.close()
        await self._w.wait_closed()
        await asyncio.wait_for(self._reader, WAIT)

    def abort(self) -> None:
        """Drops the connection (a test that failed half-way)."""
        self._reader.cancel()
        self._w.transport.abort()


# -- the server in this process -----------------------------------------------------------------


@dataclass
class Served:
    """The engine and NBD server of one test, its journal and gate, and its clients."""

    engine: VolumeEngine
    server: NbdServer
    sock: str
    journal: Journal
    gate: SyncGate
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        client = await Client.connect(self.sock, self.journal)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """An engine with one 64 MiB volume, instrumented, served on a unix socket; stopped
    (its clients dropped, a held sync released) however the test ends."""
    log_path = str(tmp_path / "writelog")
    journal, gate = Journal(os.path.realpath(log_path)), SyncGate()
    instrument(monkeypatch, journal, gate)
    spec = VolumeSpec("vol0", VOL_SIZE, str(tmp_path / "vol0.img"))
    engine = await asyncio.to_thread(VolumeEngine.open, str(tmp_path), log_path, LOG_SIZE, [spec])
    server = NbdServer(engine)
    served = Served(engine, server, str(tmp_path / "nbd.sock"), journal, gate)
    try:
        await server.listen_unix(served.sock)
        yield served
    finally:
        gate.release.set()
        for client in served.clients:
            client.abort()
        await server.shutdown(timeout=WAIT)
        engine.close()


async def until_first(event: asyncio.Event, *replies: asyncio.Future[int]) -> None:
    """Waits until ``event`` is set or one of ``replies`` arrived (or WAIT passed)."""
    waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, *replies], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def offsets() -> Iterator[int]:
    """A new 4 KiB block of the volume for every write (a write's append is found by it)."""
    return (i * BLOCK for i in itertools.count())


@pytest.mark.parametrize("loop", list(LOOPS))
def test_flush_and_fua_replies_follow_a_sync_covering_every_acknowledged_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """Four connections write (a quarter of the writes FUA); each round a FLUSH goes out on
    one of them (two at once in some rounds) while the others keep writing; at the end a
    connection that never wrote flushes. Each FLUSH and FUA reply must follow a log sync
    covering every write acknowledged before it on any connection."""
    rng = random.Random(23)
    where = offsets()
    journal = Journal("")

    async def main() -> None:
        nonlocal journal
        async with serving(tmp_path, monkeypatch) as served:
            journal = served.journal
            clients = [await served.connect() for _ in range(4)]
            for round_ in range(12):
                writers = rng.choices(clients, k=6)
                acked = [c.write(next(where), rng.random() < 0.25) for c in writers]
                assert await asyncio.wait_for(asyncio.gather(*acked), WAIT) == [0] * 6
                flushers = rng.sample(clients, 2 if round_ % 3 == 0 else 1)
                pending = [c.write(next(where)) for c in clients if c not in flushers]
                pending += [c.flush() for c in flushers]
                pending += [c.write(next(where), rng.random() < 0.25) for c in clients]
                assert not any(await asyncio.wait_for(asyncio.gather(*pending), WAIT))
            quiet = await served.connect()
            assert await asyncio.wait_for(quiet.flush(), WAIT) == 0
            for c in served.clients:
                await c.close()

    LOOPS[loop](main())
    checked = assert_flushes_covered(journal)
    flushes = [r for r in journal.requests if r.cmd == CMD_FLUSH]
    writes = sum(r.cmd == CMD_WRITE for r in journal.requests)
    # The run had teeth: flushes and FUA writes found acknowledged writes to cover, the
    # last flush (on the connection that never wrote) every write of the run.
    assert len(flushes) >= 16 and sum(r.fua for r in journal.requests) >= 10
    assert checked > len(flushes) * 6, checked
    last = flushes[-1].sent
    before_last = [w for w in journal.requests if w.received is not None and w.received < last]
    assert sum(w.cmd == CMD_WRITE for w in before_last) == writes


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_flush_arriving_during_a_sync_waits_for_a_sync_that_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """Group commit: a sync already running when a write is acknowledged cannot cover it.
    The first FLUSH's fdatasync is held while another connection writes and flushes, and a
    third sends a FUA write; their replies must wait for a sync that began after."""
    where = offsets()
    journal = Journal("")

    async def main() -> None:
        nonlocal journal
        async with serving(tmp_path, monkeypatch) as served:
            journal = served.journal
            a, b, c, d = [await served.connect() for _ in range(4)]
            log = served.engine.log
            real_sync = log.sync
            entered = 0
            all_waiting = asyncio.Event()

            async def sync() -> None:
                nonlocal entered
                entered += 1
                if entered == 3:
                    all_waiting.set()
                await real_sync()  # its target is taken before its first await

            monkeypatch.setattr(log, "sync", sync)
            assert await asyncio.wait_for(a.write(next(where)), WAIT) == 0
            held = served.gate.arm()
            first = b.flush()
            await until_first(held, first)
            if first.done():  # answered without the sync it should be held in: say which
                assert_flushes_covered(journal)
            assert held.is_set(), "the FLUSH started no fdatasync of the write log"
            # While that sync is held: a write acknowledged, then a FLUSH and a FUA write.
            assert await asyncio.wait_for(c.write(next(where)), WAIT) == 0
            second = d.flush()
            fua = c.write(next(where), fua=True)
            await until_first(all_waiting, second, fua)
            if second.done() or fua.done():
                assert_flushes_covered(journal)
            # Positive evidence that the moment under test was reached: both joined the
            # group commit (their targets taken) while the first sync is still held.
            assert all_waiting.is_set() and not first.done(), "the FLUSH and FUA never waited"
            served.gate.release.set()
            replies = await asyncio.wait_for(asyncio.gather(first, second, fua), WAIT)
            assert list(replies) == [0] * 3
            for client in served.clients:
                await client.close()

    LOOPS[loop](main())
    assert assert_flushes_covered(journal) == 1 + 2 + 3
    # The held sync began before the second write's append, so another one covered it.
    held_sync = next(s for s in journal.log_syncs() if s.start > journal.appends[0][0])
    assert held_sync.start < journal.appends[BLOCK][0]


def test_libnbd_multi_conn_flush_covers_writes_of_other_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real client (libnbd): three handles write, then a fourth that never wrote flushes,
    and a fifth writes with FUA; their replies follow a sync covering every earlier write."""
    journal = Journal("")

    def clients(sock: str) -> None:
        handles = []
        try:
            for conn in range(5):
                h = nbd.NBD()
                h.connect_unix(sock)
                assert h.can_multi_conn() and h.can_flush() and h.can_fua()
                assert journal.connections == conn + 1
                handles.append(h)
            for req in [
                *(Request(i // 4, 0, CMD_WRITE, i * BLOCK) for i in range(12)),
                Request(3, 0, CMD_FLUSH),
                Request(4, 0, CMD_WRITE, 12 * BLOCK, fua=True),
            ]:
                journal.requests.append(req)
                h = handles[req.conn]
                req.sent = journal.tick()
                if req.cmd == CMD_FLUSH:
                    h.flush()
                else:
                    data = random.Random(req.offset).randbytes(BLOCK)
                    h.pwrite(data, req.offset, nbd.CMD_FLAG_FUA if req.fua else 0)
                req.received, req.error = journal.tick(), 0
        finally:
            for h in handles:
                h.shutdown()

    async def main() -> None:
        nonlocal journal
        async with serving(tmp_path, monkeypatch) as served:
            journal = served.journal
            await asyncio.to_thread(clients, served.sock)

    uvloop.run(main())
    # The flush and the FUA write were the only requests on their connections: their
    # cookies are libnbd's own, read from the server's record.
    for req in journal.requests[-2:]:
        [req.cookie] = [cookie for conn, cookie in journal.replies if conn == req.conn]
    assert assert_flushes_covered(journal) == 12 + 13
