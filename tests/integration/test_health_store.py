"""The provider's health store (sgw.provider.health.store) on real databases, SQLite file
and PostgreSQL server: ingest stores each report once, the hourly aggregates equal the raw
samples they summarise, retention deletes what is past its window, and the retention pass
runs once however many stores race for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.health import HealthEvent, HealthReport
from sgw.provider.db import schema
from sgw.provider.db.models import (
    Account,
    Gateway,
    HealthEventRow,
    HealthHour,
    HealthSample,
)
from sgw.provider.health.store import HealthStore, Retention

T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)  # on the hour


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = schema.make_engine(db_url)
    factory = schema.session_factory(engine)
    with factory.begin() as s:
        s.add(Account(id="acct", name="acct"))
        s.add(Gateway(id="gw-a", account_id="acct", name="a"))
        s.add(Gateway(id="gw-b", account_id="acct", name="b"))
    yield factory
    engine.dispose()


def report(seq: int, *, minutes: float | None = None, version: str = "1.0") -> HealthReport:
    """Report ``seq`` a minute after the previous, with values that vary by ``seq``."""
    at = T0 + timedelta(minutes=seq if minutes is None else minutes)
    return HealthReport(
        seq,
        at,
        version,
        hypervisor="kvm",
        gateway={"log_used_percent": (seq * 7) % 100 + 0.5, "uptime_seconds": 60.0 * seq},
        volumes={"vol0": {"queued_write_bytes": float(seq % 13) * 1000}},
        events=(HealthEvent("log_nearly_full", at, "error", "vol0", f"#{seq}"),)
        if seq % 10 == 0
        else (),
    )


def count(sessions: sessionmaker[Session], table: type) -> int:
    with sessions() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def test_a_batch_sent_again_changes_nothing(sessions: sessionmaker[Session]) -> None:
    store = HealthStore(sessions)
    batch = [report(i) for i in range(30)]
    assert store.ingest("gw-a", batch) == 29
    rows = (count(sessions, HealthSample), count(sessions, HealthEventRow))
    assert rows == (30, 3)
    assert store.ingest("gw-a", batch) == 29
    assert (count(sessions, HealthSample), count(sessions, HealthEventRow)) == rows
    # Overlapping: only the new ones are added; an older batch later keeps the newest.
    assert store.ingest("gw-a", [report(i) for i in range(25, 41)]) == 40
    assert (count(sessions, HealthSample), count(sessions, HealthEventRow)) == (41, 5)
    assert store.ingest("gw-a", [report(3, version="0.9")]) == 40
    latest = store.latest("gw-a")
    assert latest is not None and latest.seq == 40 and latest.labels["version"] == "1.0"
    assert latest.gateway["uptime_seconds"] == 2400.0
    assert latest.volumes == {"vol0": {"queued_write_bytes": 1000.0}}
    # Another gateway's seq numbers are its own.
    assert store.ingest("gw-b", [report(5)]) == 5
    assert store.latest("gw-b") is not None and count(sessions, HealthSample) == 42
    events = store.events("gw-a", since=T0, limit=10)
    assert [e.seq for e in events] == [40, 30, 20, 10, 0]
    assert events[0].volume == "vol0" and events[0].detail == "#40"


def test_hourly_aggregates_equal_the_raw_samples_and_retention_deletes_the_old(
    sessions: sessionmaker[Session],
) -> None:
    store = HealthStore(sessions, Retention(raw_days=1, hourly_days=3, events_days=2))
    reports = [report(i) for i in range(150)]  # 10:00 to 12:29
    for i in range(0, 150, 50):
        store.ingest("gw-a", reports[i : i + 50])
    now = T0 + timedelta(hours=2, minutes=40)
    result = store.maintain(now)
    assert result is not None and result.hours == 2  # 10:00 and 11:00; 12:00 is not over

    def expected(hour: int, values: list[float]) -> dict[str, float]:
        return {
            "at": T0 + timedelta(hours=hour),  # type: ignore[dict-item]
            "min": min(values),
            "max": max(values),
            "mean": sum(values) / len(values),
            "last": values[-1],
            "samples": 60,
        }

    def values(key: str, hour: int, volume: bool = False) -> list[float]:
        hours = reports[hour * 60 : (hour + 1) * 60]
        if volume:
            return [r.volumes["vol0"][key] for r in hours]
        return [r.gateway[key] for r in hours]

    series = store.series("gw-a", "log_used_percent", since=T0, until=now, step="hour")
    assert series == [expected(h, values("log_used_percent", h)) for h in (0, 1)]
    vseries = store.series(
        "gw-a", "queued_write_bytes", since=T0, until=now, step="hour", volume="vol0"
    )
    assert vseries == [expected(h, values("queued_write_bytes", h, True)) for h in (0, 1)]
    raw = store.series("gw-a", "uptime_seconds", since=T0, until=now)
    assert [p["value"] for p in raw] == [60.0 * i for i in range(150)]
    # A late report for 11:00 (its raw samples all kept) changes that hour's aggregate.
    store.ingest("gw-a", [HealthReport(1000, T0 + timedelta(hours=1, minutes=59, seconds=30),
                                       "1.0", gateway={"log_used_percent": 99.75})])  # fmt: skip
    assert store.maintain(now) is None  # not due yet: another pass ran 5 minutes ago
    again = store.run_retention(now + timedelta(minutes=1))
    assert again.hours == 1 and again.raw == 0
    late = store.series("gw-a", "log_used_percent", since=T0, until=now, step="hour")[1]
    assert late["samples"] == 61 and late["max"] == 99.75 and late["last"] == 99.75
    # A day later: raw before the hour a day ago is gone (whole hours: 10:00), the hours
    # stay, and 12:00, over now, is aggregated.
    day = store.run_retention(T0 + timedelta(days=1, hours=1, minutes=30))
    assert day.raw == 60 and day.hours == 1
    left = store.series("gw-a", "uptime_seconds", since=T0, until=now)
    assert [p["value"] for p in left] == [60.0 * i for i in range(60, 150)]
    assert len(store.series("gw-a", "log_used_percent", since=T0, until=now, step="hour")) == 3
    assert count(sessions, HealthEventRow) == 15
    # Past the events' and the hours' windows, they go too.
    end = store.run_retention(T0 + timedelta(days=3, hours=1))
    assert (end.raw, end.events, end.hourly) == (91, 15, 1)
    assert count(sessions, HealthHour) == 2 and count(sessions, HealthEventRow) == 0


def test_the_retention_pass_runs_once_when_stores_race(
    sessions: sessionmaker[Session], db_url: str
) -> None:
    store = HealthStore(sessions)
    store.ingest("gw-a", [report(i) for i in range(120)])
    engines = [schema.make_engine(db_url) for _ in range(4)]
    stores = [HealthStore(schema.session_factory(e)) for e in engines]
    now = T0 + timedelta(hours=3)
    barrier = threading.Barrier(len(stores))
    results: list[object] = [None] * len(stores)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].maintain(now)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    ran = [r for r in results if r is not None]
    assert len(ran) == 1, results
    assert count(sessions, HealthHour) == 2
    # Due again once the period passed, for one of them.
    assert store.maintain(now + timedelta(minutes=4)) is None
    assert store.maintain(now + timedelta(minutes=5)) is not None


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(Exception, match="at most the hourly retention"):
        Retention(raw_days=30, hourly_days=7).check()
    with pytest.raises(Exception, match="at least an hour"):
        Retention(raw_days=0).check()
