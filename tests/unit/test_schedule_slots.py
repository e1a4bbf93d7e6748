"""When snapshot schedules fire (sgw.provider.control.schedules.latest_slot): slots in the
gateway's local time, across DST changes, never before the schedule was set; checked
against an independent enumeration of UTC instants."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.provider.control.schedules import (
    instant,
    latest_slot,
    parse_key,
    schedule_key,
    taken_snapshot,
    zone_of,
)

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def utc(*args: int) -> datetime:
    # mypy cannot tell that args stop short of datetime's tzinfo parameter.
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc, arg-type]


def test_daily_and_hourly_slots_in_utc() -> None:
    assert latest_slot(3, 24, UTC, LONG_AGO, utc(2024, 5, 1, 10, 0)) == utc(2024, 5, 1, 3)
    assert latest_slot(3, 24, UTC, LONG_AGO, utc(2024, 5, 1, 2, 59)) == utc(2024, 4, 30, 3)
    assert latest_slot(3, 24, UTC, LONG_AGO, utc(2024, 5, 1, 3, 0)) == utc(2024, 5, 1, 3)
    assert latest_slot(0, 1, UTC, LONG_AGO, utc(2024, 5, 1, 10, 59, 59)) == utc(2024, 5, 1, 10)
    # Every 8 hours from 5: 05:00, 13:00, 21:00; 21:00 the day before is the latest at 04:00.
    assert latest_slot(5, 8, UTC, LONG_AGO, utc(2024, 5, 1, 4)) == utc(2024, 4, 30, 21)
    # Every 4 from 5 includes 01:00 (the same gap across midnight).
    assert latest_slot(5, 4, UTC, LONG_AGO, utc(2024, 5, 1, 2)) == utc(2024, 5, 1, 1)


def test_a_schedule_fires_first_at_its_next_slot() -> None:
    set_at = utc(2024, 5, 1, 10, 30)
    assert latest_slot(0, 1, UTC, set_at, utc(2024, 5, 1, 10, 59)) is None
    assert latest_slot(0, 1, UTC, set_at, utc(2024, 5, 1, 11, 0)) == utc(2024, 5, 1, 11)
    # Set after the latest slot (or exactly at it): not due.
    assert latest_slot(3, 24, UTC, utc(2024, 5, 1, 3, 30), utc(2024, 5, 1, 10)) is None
    assert latest_slot(3, 24, UTC, utc(2024, 5, 1, 3), utc(2024, 5, 1, 10)) is None
    # After an outage only the latest slot is due, not the missed ones.
    assert latest_slot(0, 1, UTC, utc(2024, 5, 1), utc(2024, 5, 3, 7, 20)) == utc(2024, 5, 3, 7)


def test_local_time_and_dst_changes_in_berlin() -> None:
    # 02:00 local is 01:00 UTC in winter and 00:00 UTC in summer.
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 1, 10, 12)) == utc(2024, 1, 10, 1)
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 7, 10, 12)) == utc(2024, 7, 10, 0)
    # 2024-03-31: 02:00 does not exist (01:59 CET -> 03:00 CEST), so there is no daily
    # slot that day: the latest is the day before's.
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 3, 31, 12)) == utc(2024, 3, 30, 1)
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 4, 1, 0)) == utc(2024, 4, 1, 0)
    # Hourly that night: 01:00 CET (00:00 UTC), then 03:00 CEST (01:00 UTC).
    assert latest_slot(0, 1, BERLIN, LONG_AGO, utc(2024, 3, 31, 0, 59)) == utc(2024, 3, 31, 0)
    assert latest_slot(0, 1, BERLIN, LONG_AGO, utc(2024, 3, 31, 1, 30)) == utc(2024, 3, 31, 1)
    # 2024-10-27: 02:00-02:59 happens twice (CEST, then CET): the slot is the first 02:00
    # (00:00 UTC); during the second 02:xx the latest slot is still that one, so a pass
    # then fires nothing new.
    first = utc(2024, 10, 27, 0)
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 10, 27, 0, 30)) == first
    assert latest_slot(2, 24, BERLIN, LONG_AGO, utc(2024, 10, 27, 1, 30)) == first
    assert latest_slot(0, 1, BERLIN, LONG_AGO, utc(2024, 10, 27, 1, 59)) == first
    assert latest_slot(0, 1, BERLIN, LONG_AGO, utc(2024, 10, 27, 2, 0)) == utc(2024, 10, 27, 2)


def test_instants_of_local_times() -> None:
    assert instant(datetime(2024, 3, 31, 2, 0), BERLIN) is None
    assert instant(datetime(2024, 10, 27, 2, 0), BERLIN) == utc(2024, 10, 27, 0)
    assert instant(datetime(2024, 10, 27, 3, 0), BERLIN) == utc(2024, 10, 27, 2)
    assert zone_of(None) is UTC and zone_of("") is UTC and zone_of("Not/AZone") is UTC
    assert zone_of("Europe/Berlin") == BERLIN


def test_keys_and_results() -> None:
    key = schedule_key("c0ffee00-0000-4000-8000-000000000000", utc(2024, 3, 31, 1))
    assert key == "schedule:c0ffee00-0000-4000-8000-000000000000:2024-03-31T01:00:00+00:00"
    assert parse_key(key) == ("c0ffee00-0000-4000-8000-000000000000", utc(2024, 3, 31, 1))
    for other in ("3f1c", "schedule:", "schedule:v:not-a-time", "schedule:v:2024-03-31T01:00"):
        assert parse_key(other) is None
    done = {"snapshot_id": "s1", "state": "COMPLETED"}
    assert taken_snapshot("succeeded", done) == "s1"
    assert taken_snapshot("failed", done) is None
    assert taken_snapshot("succeeded", {"snapshot_id": "s1", "state": "FAILED"}) is None
    assert taken_snapshot("succeeded", None) is None


# Zones with DST, half- and quarter-hour offsets, a DST shift of 30 minutes (Lord Howe),
# a southern hemisphere one and a negative-DST one (Dublin).
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/Santiago",
    "Europe/Dublin",
]


def oracle(start: int, every: int, zone: tzinfo, after: datetime, now: datetime) -> datetime | None:
    """The latest slot by brute force: every quarter hour (UTC) of the four days before
    ``now`` whose local time is a slot hour at minute 0, first occurrence only."""
    t = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    while t > now - timedelta(days=4):
        local = t.astimezone(zone)
        if local.minute == 0 and (local.hour - start) % every == 0 and local.fold == 0 and t <= now:
            return t if t > after else None
        t -= timedelta(minutes=15)
    return None


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(0, 23),
    every=st.sampled_from([1, 2, 4, 8, 12, 24]),
    zone=st.sampled_from(ZONES).map(zoneinfo.ZoneInfo),
    now=st.datetimes(datetime(2001, 1, 1), datetime(2037, 12, 31)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
    set_before=st.timedeltas(timedelta(0), timedelta(days=2)),
)
def test_latest_slot_agrees_with_brute_force(
    start: int, every: int, zone: tzinfo, now: datetime, set_before: timedelta
) -> None:
    after = now - set_before
    got = latest_slot(start, every, zone, after, now)
    assert got == oracle(start, every, zone, after, now)
    if got is not None:
        assert after < got <= now and got.tzinfo is UTC


@pytest.mark.parametrize("every", [1, 24])
def test_every_slot_of_a_year_fires_once_in_berlin(every: int) -> None:
    """Passes every 10 minutes through 2024 (both DST changes) each fire a slot at most
    once, and every local day has its slots (23, 24 or 25 hours long)."""
    fired: list[datetime] = []
    set_at = utc(2023, 12, 31, 23)  # midnight in Berlin
    now = utc(2024, 1, 1)
    while now < utc(2025, 1, 1):
        slot = latest_slot(2, every, BERLIN, set_at, now)
        if slot is not None and (not fired or slot != fired[-1]):
            assert not fired or slot > fired[-1]
            fired.append(slot)
        now += timedelta(minutes=10)
    if every == 24:
        assert len(fired) == 366 - 1  # 2024-03-31 has no 02:00
    else:
        assert len(fired) == 366 * 24 - 1  # 02:00 once skipped, and the repeated one once
    assert len(set(fired)) == len(fired)
