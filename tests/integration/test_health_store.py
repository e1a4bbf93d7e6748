"""The provider's health store (sgw.provider.health.store) on real databases, SQLite file
and PostgreSQL server: ingest stores each report once (also after its hour was blocked),
the hourly and daily aggregates equal what the raw samples give (counters' rates across
a reset), retention deletes each tier past its window, and the retention pass runs once
however many stores race for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.health import HealthEvent, HealthReport
from sgw.provider.db import schema
from sgw.provider.db.models import (
    Account,
    Gateway,
    HealthBlock,
    HealthEventRow,
    HealthSample,
)
from sgw.provider.health.store import HealthStore, Retention, Step

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


def counter(seq: int) -> float:
    """read_bytes_total at report ``seq``: grows by 1 to 7 KB a minute in bursts; the
    gateway restarts at seq 700 (counts from 0 again)."""
    if seq < 700:
        return float(sum((i % 7 + 1) * 1000 for i in range(seq + 1)))
    return float(sum((i % 7 + 1) * 1000 for i in range(700, seq + 1)))


def day_report(seq: int) -> HealthReport:
    """A report a minute from T0 with a gauge, a counter that resets and a volume."""
    at = T0 + timedelta(minutes=seq)
    return HealthReport(
        seq,
        at,
        "1.0",
        gateway={
            "log_used_percent": round((seq * 37) % 1000 / 10, 1),
            "read_bytes_total": counter(seq),
        },
        volumes={"vol0": {"queued_write_bytes": float(seq % 13) * 1000}},
    )


def expected(
    samples: list[HealthReport], name: str, volume: str | None = None
) -> dict[str, object]:
    """What a bucket of ``samples`` says of a metric, computed from the samples."""
    xs = [r.volumes[volume][name] if volume else r.gateway[name] for r in samples]
    if name.endswith("_total"):
        inc = sum(b - a if b >= a else b for a, b in pairwise(xs))
        span = (samples[-1].at - samples[0].at).total_seconds()
        return {"last": xs[-1], "rate": pytest.approx(inc / span), "samples": len(xs)}
    mean = pytest.approx(sum(xs) / len(xs))
    return {"min": min(xs), "max": max(xs), "mean": mean, "samples": len(xs)}


def test_each_tier_equals_what_the_raw_samples_give(sessions: sessionmaker[Session]) -> None:
    store = HealthStore(sessions, Retention(raw_days=3, hourly_days=3, daily_days=10))
    reports = [day_report(i) for i in range(26 * 60)]  # 11-02 10:00 to 11-03 11:59
    raw_before: dict[str, list[dict[str, object]]] = {}
    for i in range(0, len(reports), 200):
        store.ingest("gw-a", reports[i : i + 200])
    until = T0 + timedelta(days=2)
    for m in ("log_used_percent", "read_bytes_total"):
        raw_before[m] = store.series("gw-a", m, since=T0, until=until)
    now = T0 + timedelta(hours=26, minutes=10)
    result = store.maintain(now)
    assert result is not None and (result.hours, result.days) == (26, 2)
    assert count(sessions, HealthSample) == 0  # all moved into raw blocks

    # Raw: the same points from the blocks, a counter's rate per second across the reset.
    for m in ("log_used_percent", "read_bytes_total"):
        assert store.series("gw-a", m, since=T0, until=until) == raw_before[m]
    rates = [p["rate"] for p in raw_before["read_bytes_total"]]
    assert rates[0] is None
    assert rates[1:] == [(i % 7 + 1) * 1000 / 60 for i in range(1, len(reports))]

    def check(step: Step, buckets: list[list[HealthReport]]) -> None:
        for name, volume in (
            ("log_used_percent", None),
            ("read_bytes_total", None),
            ("queued_write_bytes", "vol0"),
        ):
            points = store.series("gw-a", name, since=T0, until=until, step=step, volume=volume)
            want = [expected(b, name, volume) for b in buckets]
            assert [{k: v for k, v in p.items() if k != "at"} for p in points] == want
            assert [p["at"] for p in points] == [
                b[0].at.replace(minute=0) if step == "hour" else b[0].at.replace(hour=0, minute=0)
                for b in buckets
            ]

    check("hour", [reports[h * 60 : (h + 1) * 60] for h in range(26)])
    check("day", [reports[: 14 * 60], reports[14 * 60 :]])  # 11-02 from 10:00; 11-03 so far

    # The same reports again (their hours are blocked): nothing changes.
    store.ingest("gw-a", reports[100:300])
    again = store.run_retention(now + timedelta(minutes=5))
    assert again.hours == 4
    for m in ("log_used_percent", "read_bytes_total"):
        assert store.series("gw-a", m, since=T0, until=until) == raw_before[m]
    check("hour", [reports[h * 60 : (h + 1) * 60] for h in range(26)])
    check("day", [reports[: 14 * 60], reports[14 * 60 :]])

    # A late report for 11:00 (its raw block kept) changes that hour and its day.
    late = HealthReport(
        5000, T0 + timedelta(hours=1, minutes=59, seconds=30), "1.0",
        gateway={"log_used_percent": 99.7},
    )  # fmt: skip
    store.ingest("gw-a", [late])
    assert store.run_retention(now + timedelta(minutes=10)).hours == 1
    hour = store.series("gw-a", "log_used_percent", since=T0, until=until, step="hour")[1]
    assert hour["samples"] == 61 and hour["max"] == 99.7
    day = store.series("gw-a", "log_used_percent", since=T0, until=until, step="day")[0]
    xs = [r.gateway["log_used_percent"] for r in reports[: 14 * 60]] + [99.7]
    assert day["samples"] == 14 * 60 + 1 and day["mean"] == pytest.approx(sum(xs) / len(xs))


def test_retention_deletes_each_tier_past_its_window(sessions: sessionmaker[Session]) -> None:
    store = HealthStore(sessions, Retention(raw_days=1, hourly_days=2, daily_days=3, events_days=2))
    reports = [report(i) for i in range(150)]  # 11-02 10:00 to 12:29
    store.ingest("gw-a", reports)
    first = store.run_retention(T0 + timedelta(hours=2, minutes=40))
    assert (first.hours, first.days, first.raw) == (2, 1, 0)

    def points(step: Step) -> int:
        until = T0 + timedelta(days=9)
        return len(store.series("gw-a", "uptime_seconds", since=T0, until=until, step=step))

    assert (points("raw"), points("hour"), points("day")) == (150, 2, 1)
    # A day later: raw before the hour a day ago is gone (whole hours: 10:00); 12:00 is
    # aggregated.
    day = store.run_retention(T0 + timedelta(days=1, hours=1, minutes=30))
    assert (day.raw, day.hours) == (1, 1)
    left = store.series("gw-a", "uptime_seconds", since=T0, until=T0 + timedelta(days=2))
    assert [p["value"] for p in left] == [60.0 * i for i in range(60, 150)]
    assert (points("hour"), points("day")) == (3, 1)
    assert count(sessions, HealthEventRow) == 15
    # Hours go two days after their day ended, days three days after, events after two.
    later = store.run_retention(T0 + timedelta(days=2, hours=15))
    assert (later.raw, later.hourly, later.daily, later.events) == (2, 1, 0, 15)
    assert (points("raw"), points("hour"), points("day")) == (0, 0, 1)
    last = store.run_retention(T0 + timedelta(days=3, hours=15))
    assert last.daily == 1 and points("day") == 0
    assert count(sessions, HealthBlock) == 0 and count(sessions, HealthEventRow) == 0


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
    hours = store.series("gw-a", "uptime_seconds", since=T0, until=now, step="hour")
    assert [p["samples"] for p in hours] == [60, 60]
    # Due again once the period passed, for one of them.
    assert store.maintain(now + timedelta(minutes=4)) is None
    assert store.maintain(now + timedelta(minutes=5)) is not None


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(Exception, match="at most the hourly retention"):
        Retention(raw_days=30, hourly_days=7).check()
    with pytest.raises(Exception, match="at least an hour"):
        Retention(raw_days=0).check()
    with pytest.raises(Exception, match="at most the daily retention"):
        Retention(hourly_days=60, daily_days=30).check()
