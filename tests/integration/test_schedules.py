"""Snapshot schedules run by the control servers (sgw.provider.control.schedules).

In process, on a real database (SQLite, PostgreSQL): two schedulers (two servers' worth)
fire a due slot once, in the gateway's time zone; a finished scheduled command marks its
snapshot and retention deletes the oldest scheduled snapshots, never one taken by hand,
also when the follow-up was lost; a slot refused for good is not retried; a failing pass
does not stop the loop.

End to end: `sgw provider serve` processes sharing the database and an activated
`sgw gateway serve`: a schedule set through the admin API, made due by moving its
``updated`` back, snapshots the volume on the gateway once, however many servers fire it,
and its retention keeps the manual snapshot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
import zoneinfo
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.schedules import SnapshotScheduler, schedule_key
from sgw.provider.control.store import ControlStore, MessageInfo, NewMessage
from sgw.provider.db import schema
from sgw.provider.db.models import (
    Account,
    ControlMessage,
    Gateway,
    Snapshot,
    SnapshotSchedule,
    utcnow,
)
from sgw.provider.management.volume_settings import SecretBox, VolumeSettings
from tests.fixtures.daemons import GatewayProcess
from tests.fixtures.management import SecureProvider, activated_gateway, cli_json
from tests.fixtures.waiting import wait_for

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
LOGGER = "sgw.provider.control.schedules"
MIB = 1 << 20
ACCOUNT = "acct"
GATEWAY = "gw"


# -- in process ---------------------------------------------------------------------------


@dataclass
class Server:
    """One control server's hub and scheduler (not serving HTTP: nothing to ring)."""

    store: ControlStore
    hub: ControlHub
    scheduler: SnapshotScheduler


@dataclass
class World:
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    maps: ChunkMaps
    settings: VolumeSettings
    servers: list[Server]

    def server(self, name: str, tick_s: float = 30.0) -> Server:
        store = ControlStore(self.url)
        hub = ControlHub(store, server_id=name, url=f"http://{name}.invalid", secret=b"s" * 32)
        scheduler = SnapshotScheduler(self.sessions, self.maps, hub, tick_s=tick_s)
        hub.on_finished = scheduler.follow_up
        server = Server(store, hub, scheduler)
        self.servers.append(server)
        return server

    def volume(self, name: str, gateway: str | None = GATEWAY) -> str:
        return self.maps.create_volume(ACCOUNT, name, 16 * MIB, gateway_id=gateway).id

    def schedule(self, volume_id: str, *, start: int, every: int, retain: int | None) -> None:
        """Sets the schedule, then dates it back two days (its slots since then are due)."""
        self.settings.set_schedule(
            ACCOUNT,
            volume_id,
            start_hour=start,
            recurrence_hours=every,
            description="nightly",
            retain=retain,
        )
        with self.sessions.begin() as s:
            row = s.get(SnapshotSchedule, volume_id)
            assert row is not None
            row.updated = utcnow() - timedelta(days=2)

    def messages(self, volume_id: str) -> list[ControlMessage]:
        with self.sessions() as s:
            query = select(ControlMessage).where(
                ControlMessage.idempotency_key.startswith(f"schedule:{volume_id}:")
            )
            return list(s.scalars(query.order_by(ControlMessage.created)))

    def snapshots(self, volume_id: str) -> dict[str, datetime | None]:
        """The volume's snapshots: id -> the slot it was taken for (None: by hand)."""
        with self.sessions() as s:
            query = select(Snapshot.id, Snapshot.scheduled_for).where(
                Snapshot.volume_id == volume_id
            )
            return {i: slot for i, slot in s.execute(query)}

    def take(self, info: MessageInfo) -> str:
        """What the gateway does for a ``snapshot`` command: the provider's snapshot of
        the volume, under an id the gateway chose; returns that id."""
        sid = str(uuid.uuid4())
        self.maps.create_snapshot(info.args["volume_id"], info.args["description"], snapshot_id=sid)
        return sid


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    """A migrated database (SQLite, PostgreSQL) with an account and its gateway in Berlin."""
    engine = schema.make_engine(db_url)
    sessions = schema.session_factory(engine)
    with sessions.begin() as s:
        s.add(Account(id=ACCOUNT, name="acme"))
        s.flush()
        s.add(Gateway(id=GATEWAY, account_id=ACCOUNT, name="edge", timezone="Europe/Berlin"))
    settings = VolumeSettings(sessions, SecretBox(b"k" * 32))
    w = World(db_url, engine, sessions, ChunkMaps(sessions), settings, [])
    yield w
    for server in w.servers:
        server.store.close()
    engine.dispose()


def run(world: World, body: Coroutine[Any, Any, None]) -> None:
    """Runs a test's body on an event loop, then stops the servers it started."""

    async def main() -> None:
        try:
            await body
        finally:
            for server in world.servers:
                await server.scheduler.stop()
                await server.hub.stop()

    asyncio.run(main())


async def reply(server: Server, info: MessageInfo, ok: bool, result: dict[str, Any]) -> None:
    """The gateway's reply, recorded by ``server`` (which runs the follow-up)."""
    accepted, _refused = await server.hub.reply(
        GATEWAY, [(info.id, ok, result, None if ok else "it failed")]
    )
    assert accepted == [info.id]


def completed(sid: str) -> dict[str, Any]:
    return {"snapshot_id": sid, "state": "COMPLETED", "volume": "v", "error": None}


def test_two_servers_fire_a_due_slot_once_in_the_gateways_time_zone(world: World) -> None:
    vid = world.volume("data")
    loose = world.volume("loose", gateway=None)
    world.schedule(vid, start=3, every=24, retain=None)
    world.schedule(loose, start=3, every=24, retain=None)
    a, b = world.server("a"), world.server("b")

    async def body() -> None:
        first = await asyncio.gather(a.scheduler.run_once(), b.scheduler.run_once())
        again = await asyncio.gather(a.scheduler.run_once(), b.scheduler.run_once())
        rows = world.messages(vid)
        assert len(rows) == 1, [r.idempotency_key for r in rows]
        assert [m.id for m in first[0]] == [m.id for m in first[1]] == [rows[0].id]
        assert again == [[], []]  # type: ignore[comparison-overlap]  # gather gives a list
        # A server that starts afresh finds the same command.
        c = world.server("c")
        assert [m.id for m in await c.scheduler.run_once()] == [rows[0].id]

    run(world, body())
    (row,) = world.messages(vid)
    slot = datetime.fromisoformat(row.idempotency_key.split(":", 2)[2])
    assert row.idempotency_key == schedule_key(vid, slot)
    assert slot.astimezone(BERLIN).hour == 3 and (slot.minute, slot.second) == (0, 0)
    assert timedelta(0) < utcnow() - slot <= timedelta(hours=24)
    assert (row.type, row.gateway_id, row.status) == ("snapshot", GATEWAY, "queued")
    assert json.loads(row.args) == {
        "volume_id": vid,
        "description": "nightly",
        "wait": True,
        "volume": "data",
    }
    # Queued for an offline gateway, for at most 4 hours.
    assert row.expires - row.created == timedelta(hours=4)
    assert world.messages(loose) == []  # on no gateway: skipped


def test_retention_deletes_the_oldest_scheduled_snapshots_only(world: World) -> None:
    vid = world.volume("data")
    by_hand = world.maps.create_snapshot(vid, "by hand")
    world.schedule(vid, start=0, every=1, retain=2)
    a, b = world.server("a"), world.server("b")
    now = utcnow().replace(minute=30, second=0, microsecond=0)
    taken: list[str] = []

    async def body() -> None:
        for hours_ago in (3, 2, 1):  # three slots, an hour apart
            (info,) = await a.scheduler.run_once(now - timedelta(hours=hours_ago))
            sid = world.take(info)
            taken.append(sid)
            await reply(b, info, True, completed(sid))  # recorded by b: b's follow-up
        snaps = world.snapshots(vid)
        assert set(snaps) == {by_hand, taken[1], taken[2]}
        slots = [now.replace(minute=0) - timedelta(hours=h) for h in (2, 1)]
        assert [snaps[by_hand], snaps[taken[1]], snaps[taken[2]]] == [None, *slots]

        # A failed scheduled snapshot counts for nothing and deletes nothing.
        (failed,) = await a.scheduler.run_once(now)
        await reply(a, failed, True, {"snapshot_id": str(uuid.uuid4()), "state": "FAILED"})
        assert set(world.snapshots(vid)) == {by_hand, taken[1], taken[2]}

        # Fewer kept from now on; the follow-up of the newest runs on two servers at once
        # (a reply recorded twice): each snapshot is deleted once, neither fails.
        world.settings.set_schedule(
            ACCOUNT, vid, start_hour=0, recurrence_hours=1, description=None, retain=1
        )
        newest = next(m for m in world.messages(vid) if taken[2] in (m.result or ""))
        info = a.store.get(ACCOUNT, GATEWAY, newest.id)
        await asyncio.gather(a.scheduler.follow_up(info), b.scheduler.follow_up(info))
        assert world.snapshots(vid) == {by_hand: None, taken[2]: slots[1]}

    run(world, body())


def test_a_lost_follow_up_is_made_good_when_the_schedule_fires_again(world: World) -> None:
    vid = world.volume("data")
    by_hand = world.maps.create_snapshot(vid, "by hand")
    world.schedule(vid, start=0, every=1, retain=1)
    a, b = world.server("a"), world.server("b")
    now = utcnow().replace(minute=30, second=0, microsecond=0)
    hour = now.replace(minute=0)

    async def body() -> None:
        (first,) = await a.scheduler.run_once(now - timedelta(hours=2))
        s1 = world.take(first)
        await reply(a, first, True, completed(s1))
        (second,) = await a.scheduler.run_once(now - timedelta(hours=1))
        s2 = world.take(second)
        # The reply recorded by a server that died before its follow-up ran.
        a.hub.on_finished = None
        await reply(a, second, True, completed(s2))
        assert world.snapshots(vid) == {by_hand: None, s1: hour - timedelta(hours=2), s2: None}
        # The next slot fires (on any server): the earlier command's snapshot is marked
        # and retention applied, before the new one is even taken.
        (third,) = await b.scheduler.run_once(now)
        assert third.id not in (first.id, second.id)
        assert world.snapshots(vid) == {by_hand: None, s2: hour - timedelta(hours=1)}

    run(world, body())


def test_a_slot_refused_for_good_is_not_tried_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Its key holds another command for the gateway (the volume was renamed since):
    logged once, not posted again at every pass."""
    vid = world.volume("data")
    world.schedule(vid, start=0, every=1, retain=None)
    now = utcnow().replace(minute=30, second=0, microsecond=0)
    key = schedule_key(vid, now.replace(minute=0))
    args = {"volume_id": vid, "description": "nightly", "wait": True, "volume": "old-name"}
    a = world.server("a")
    a.store.post(NewMessage(ACCOUNT, GATEWAY, "snapshot", args, key, 60.0, "z"), utcnow())
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def body() -> None:
        assert await a.scheduler.run_once(now) == []
        assert await a.scheduler.run_once(now + timedelta(minutes=1)) == []

    run(world, body())
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "refused" in warnings[0], warnings
    assert [m.idempotency_key for m in world.messages(vid)] == [key]


def test_a_failing_pass_is_logged_and_the_loop_goes_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    vid = world.volume("data")
    world.schedule(vid, start=0, every=1, retain=None)
    a = world.server("a", tick_s=0.05)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == LOGGER]

    async def body() -> None:
        with world.engine.begin() as c:
            c.execute(text("ALTER TABLE snapshot_schedules RENAME TO hidden"))
        a.scheduler.start()
        for _ in range(100):
            if len(failures()) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(failures()) >= 2 and "the pass failed" in failures()[0], failures()
        assert world.messages(vid) == []
        with world.engine.begin() as c:
            c.execute(text("ALTER TABLE hidden RENAME TO snapshot_schedules"))
        for _ in range(100):
            if world.messages(vid):
                break
            await asyncio.sleep(0.05)
        assert len(world.messages(vid)) == 1

    run(world, body())


# -- end to end ---------------------------------------------------------------------------


def second_server(
    tmp_path: Path, first: SecureProvider, factory: type[SecureProvider]
) -> SecureProvider:
    """Another `sgw provider serve` on the first one's database (SQLite), with its master
    key, control secret and TLS files, as an operator would set it up."""
    data = tmp_path / "provider-b"
    data.mkdir(mode=0o700)
    for name in ("master.key", "control.secret"):
        shutil.copy2(first.data_dir / name, data / name)
    shutil.copytree(first.data_dir / "tls", data / "tls")
    db = f"sqlite:///{first.data_dir / 'provider.db'}"
    server = factory(data, db_url=db, token=first.token, account_id=first.account_id)
    server.ca = str(data / "tls" / "ca.pem")
    return server


@pytest.fixture
def provider_db(secure_provider: SecureProvider) -> Iterator[sessionmaker[Session]]:
    engine = schema.make_engine(f"sqlite:///{secure_provider.data_dir / 'provider.db'}")
    yield schema.session_factory(engine)
    engine.dispose()


def date_back(sessions: sessionmaker[Session], volume_id: str) -> None:
    with sessions.begin() as s:
        row = s.get(SnapshotSchedule, volume_id)
        assert row is not None
        row.updated = utcnow() - timedelta(days=2)


def logged(server: SecureProvider, msg: str, volume_id: str) -> list[dict[str, Any]]:
    """The server's log lines with this message about the volume."""
    assert server.stderr_path is not None
    out = []
    for line in server.stderr_path.read_text(errors="replace").splitlines():
        if msg in line and volume_id in line:
            doc = json.loads(line)
            if doc["msg"] == msg and doc.get("volume") == volume_id:
                out.append(doc)
    return out


def requests_logged(server: SecureProvider, volume_id: str) -> list[dict[str, Any]]:
    return logged(server, "scheduled snapshot requested", volume_id)


def test_schedules_snapshot_a_gateways_volume_once_and_keep_the_newest(
    tmp_path: Path,
    secure_provider: SecureProvider,
    secure_provider_factory: type[SecureProvider],
    gateway_factory: type[GatewayProcess],
    provider_db: sessionmaker[Session],
) -> None:
    p = secure_provider
    admin = p.admin()
    gw, gid = activated_gateway(tmp_path, p, gateway_factory, ["local0:16M"])
    r = admin.patch(f"/v1/gateways/{gid}", json={"timezone": "Europe/Berlin"})
    assert r.status_code == 200, r.text
    vid = cli_json(p, "volumes", "create", "vol1", "16M", "--gateway", gid, "--mode", "stored")[
        "id"
    ]
    by_hand = cli_json(p, "snapshots", "create", vid, "--description", "by hand")["id"]

    def snapshots() -> dict[str, str]:
        r = admin.get("/v1/snapshots", params={"volume_id": vid})
        assert r.status_code == 200, r.text
        return {s["id"]: s["description"] for s in r.json()}

    def scheduled_commands() -> list[dict[str, Any]]:
        r = admin.get(f"/v1/gateways/{gid}/commands", params={"limit": 500})
        return [c for c in r.json() if c["idempotency_key"].startswith(f"schedule:{vid}:")]

    # Daily at two hours ago (Berlin time), keeping one; due since dated back.
    hour = datetime.now(BERLIN).hour
    body = {"start_hour": (hour - 2) % 24, "recurrence_hours": 24, "description": "nightly"}
    r = admin.put(f"/v1/volumes/{vid}/snapshot-schedule", json={**body, "retain": 1})
    assert r.status_code == 200, r.text
    date_back(provider_db, vid)

    # A second server starts: its first pass fires the slot; the gateway (held by the
    # first server) takes the snapshot.
    b = second_server(tmp_path, p, secure_provider_factory).start()
    wait_for(
        lambda: [c["status"] for c in scheduled_commands()] == ["succeeded"],
        what="the scheduled snapshot",
    )
    (command,) = scheduled_commands()
    assert command["args"]["volume"] == "vol1" and command["result"]["state"] == "COMPLETED"
    nightly = command["result"]["snapshot_id"]
    assert snapshots() == {by_hand: "by hand", nightly: "nightly"}
    slot = datetime.fromisoformat(command["idempotency_key"].split(":", 2)[2])
    assert slot.astimezone(BERLIN).hour == body["start_hour"] and slot.tzinfo == UTC
    assert datetime.now(UTC) - slot < timedelta(hours=3)

    # Started again, it fires the same slot again: the same command, nothing new.
    assert b.stop() == 0
    b.start()
    wait_for(lambda: len(requests_logged(b, vid)) == 2, what="the second server's pass")
    assert requests_logged(b, vid)[-1]["new"] is False
    lines = requests_logged(p, vid) + requests_logged(b, vid)
    assert [line["new"] for line in lines].count(True) == 1, lines
    assert [c["id"] for c in scheduled_commands()] == [command["id"]]
    assert snapshots() == {by_hand: "by hand", nightly: "nightly"}

    # Hourly from now on: the next slot's snapshot replaces the nightly one (retain 1);
    # the one taken by hand stays.
    body = {"start_hour": 0, "recurrence_hours": 1, "description": "hourly", "retain": 1}
    r = admin.put(f"/v1/volumes/{vid}/snapshot-schedule", json=body)
    assert r.status_code == 200, r.text
    date_back(provider_db, vid)
    assert b.stop() == 0
    b.start()
    wait_for(lambda: nightly not in snapshots(), what="retention")
    left = snapshots()
    assert sorted(left.values()) == ["by hand", "hourly"], left
    assert len(scheduled_commands()) == 2
    # The follow-up of each command ran once, on the server that got the gateway's reply
    # (the hourly one's deleted the nightly snapshot).
    hourly = next(i for i, d in left.items() if d == "hourly")
    listed = admin.get("/v1/snapshots", params={"volume_id": vid}).json()
    marks = {s["id"]: s["scheduled_for"] for s in listed}
    assert marks[by_hand] is None and marks[hourly] is not None  # shown by the API
    assert datetime.fromisoformat(marks[hourly]).minute == 0
    taken = logged(p, "scheduled snapshot taken", vid) + logged(b, "scheduled snapshot taken", vid)
    assert [t["snapshot"] for t in taken] == [nightly, hourly], taken

    # The provider's keys are its own.
    r = admin.post(
        f"/v1/gateways/{gid}/commands",
        json={"type": "describe", "idempotency_key": f"schedule:{vid}:x"},
    )
    assert r.status_code == 400 and "snapshot schedules" in r.json()["message"]
    assert gw.stop() == 0
