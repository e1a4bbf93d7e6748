"""The event loop's own database writes (sgw.provider.db.raw.transaction_now): they run
only when they can begin at once and write nothing otherwise; a group that cannot goes
to the writer thread and gets the same results; no commit checkpoints the write-ahead
log, the hub's checkpoint does. Real SQLite files; a second process holds SQLite's lock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sgw.provider.auth.nonces import NonceLedger
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.store import ControlStore, MessageInfo, NewMessage
from sgw.provider.db import schema
from sgw.provider.db.batching import GroupRunner
from sgw.provider.db.models import utcnow
from sgw.provider.db.raw import ThreadConnections, WouldBlock
from tests.fixtures.control_db import control_db, with_hub


@pytest.fixture
def db(tmp_path: Path) -> str:
    return control_db(tmp_path, "acct", ["gw"])


def _count(url: str) -> int:
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM control_messages").fetchone()[0])


def _message(n: int) -> NewMessage:
    return NewMessage("acct", "gw", "describe", {"n": n}, None, 60.0, "server")


def test_a_write_that_would_wait_writes_nothing_and_says_so(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The raw connections the store's writes run on (the real ones, recorded).
    used: list[sqlite3.Connection] = []
    real_raw = ThreadConnections._raw

    def raw(self: ThreadConnections) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_raw(self)
        used.append(conn)
        return conn

    monkeypatch.setattr(ThreadConnections, "_raw", raw)
    store = ControlStore(db)
    lock = schema.write_lock(db)
    try:
        # The process's write lock taken by this very thread: a call that waited for it
        # would never return.
        with lock, pytest.raises(WouldBlock):
            store.post_many([_message(1)], utcnow(), nowait=True)
        assert _count(db) == 0
        # SQLite's write lock taken by another process.
        path = db.removeprefix("sqlite:///")
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time\n"
                f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
                "c.execute('BEGIN IMMEDIATE')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.readline()\n"
                "c.execute('ROLLBACK')\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(WouldBlock):
                store.post_many([_message(2)], utcnow(), nowait=True)
            # It gave up while the other process still held the lock (released only below),
            # on a connection that SQLite never lets wait for a lock: a busy timeout of 0
            # returns SQLITE_BUSY at once instead of sleeping and retrying.
            assert used, "the write never reached SQLite"
            assert used[-1].execute("PRAGMA busy_timeout").fetchone()[0] == 0
            assert holder.poll() is None
        finally:
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(10)
            holder.stdin.close()
            if holder.stdout is not None:
                holder.stdout.close()
        assert _count(db) == 0
        # Free: written at once.
        [(info, created)] = store.post_many([_message(3)], utcnow(), nowait=True)  # type: ignore[misc]
        assert created and store.get("acct", "gw", info.id).args == {"n": 3}
    finally:
        store.close()


def test_a_group_that_would_wait_goes_to_the_thread_with_the_same_results(db: str) -> None:
    store = ControlStore(db)
    lock = schema.write_lock(db)
    writer = concurrent.futures.ThreadPoolExecutor(1)
    tried_now: list[int] = []

    def run_now(items: list[NewMessage]) -> list[tuple[MessageInfo, bool] | BaseException]:
        tried_now.append(len(items))
        return list(store.post_many(items, utcnow(), nowait=True))

    runner: GroupRunner[NewMessage, tuple[MessageInfo, bool]] = GroupRunner(
        lambda items: list(store.post_many(items, utcnow())), writer, run_now=run_now
    )

    async def run() -> tuple[list[tuple[MessageInfo, bool]], list[tuple[MessageInfo, bool]]]:
        quick = await asyncio.gather(*(runner.submit(_message(i)) for i in range(5)))
        # Another writer holds the lock until the group gave up trying on the loop (a
        # few tries): the thread writes it once the lock is free.
        acquired = threading.Event()

        def hold() -> None:
            with lock:
                acquired.set()
                deadline = time.monotonic() + 10
                while runner.deferred == 0 and time.monotonic() < deadline:
                    time.sleep(0.001)

        holder = threading.Thread(target=hold)
        holder.start()
        await asyncio.to_thread(acquired.wait, 10)
        slow = await asyncio.gather(*(runner.submit(_message(i)) for i in range(5, 10)))
        holder.join()
        return quick, slow

    try:
        quick, slow = asyncio.run(run())
        assert runner.deferred == 1 and len(tried_now) > 2
        for i, (info, created) in enumerate(quick + slow):
            assert created and info.args == {"n": i}
        assert _count(db) == 10
    finally:
        writer.shutdown()
        store.close()


def test_nonces_written_on_the_loop_refuse_replays_across_processes(db: str) -> None:
    one, two = NonceLedger(db), NonceLedger(db)
    expires = datetime.now(UTC) + timedelta(seconds=300)
    nonces = [uuid.uuid4().hex for _ in range(50)]

    async def run() -> tuple[list[bool], list[bool]]:
        first = await asyncio.gather(*(one.first_use_async("gw:a", n, expires) for n in nonces))
        again = await asyncio.gather(*(two.first_use_async("gw:a", n, expires) for n in nonces))
        return first, again

    try:
        first, again = asyncio.run(run())
        assert all(first) and not any(again)
    finally:
        one.close()
        two.close()


def _in_database_file(path: str) -> int:
    """Messages in the database file itself, the write-ahead log not read."""
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as c:
        return int(c.execute("SELECT count(*) FROM control_messages").fetchone()[0])


def test_commits_leave_the_log_to_the_hubs_checkpoint(db: str) -> None:
    store = ControlStore(db)
    path = db.removeprefix("sqlite:///")
    try:
        # Far more pages than SQLite's default autocheckpoint (1,000) would let pile up.
        for i in range(1500):
            store.post_many([_message(i)], utcnow())
        assert Path(path + "-wal").stat().st_size > 2 * 1000 * 4096
        assert _in_database_file(path) == 0  # no commit copied the log back

        async def sweep(hub: ControlHub) -> None:
            await hub._sweep()

        with_hub(store, sweep)  # the hub's periodic sweep checkpoints
        assert _in_database_file(path) == 1500
    finally:
        store.close()


def test_thread_connections_roll_back_a_failed_transaction_now(db: str) -> None:
    engine = schema.make_engine(db)
    conns = ThreadConnections(engine)
    lock = threading.Lock()
    try:
        with pytest.raises(RuntimeError), conns.transaction_now(lock) as cur:
            cur.execute(
                "INSERT INTO accounts (id, name, created, operator) VALUES ('x', 'x', "
                "'2026-01-01 00:00:00.000000', 0)"
            )
            raise RuntimeError("boom")
        assert not lock.locked()
        with conns.transaction_now(lock) as cur:
            cur.execute("SELECT count(*) FROM accounts WHERE id = 'x'")
            assert cur.fetchone()[0] == 0
    finally:
        conns.close()
        engine.dispose()
