"""Maintenance windows (sgw.common.maintenance): openings across DST changes (Berlin,
New York, Lord Howe's 30-minute shift) and month ends (day 31 in February, leap years),
the text and JSON forms, and properties that hold for any window, zone and instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common.maintenance import MAX_DURATION_MINUTES, Window, WindowError, local_instant, zone

ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[arg-type,misc]


# -- DST changes ---------------------------------------------------------------------------


def test_a_start_in_berlins_spring_gap_opens_when_the_gap_ends() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:30 does not exist that day.
    w = Window("weekly", 6, 2, 30, 60)
    assert w.next_open(utc(2026, 3, 28), "Europe/Berlin") == utc(2026, 3, 29, 1, 0)
    assert not w.is_open(utc(2026, 3, 29, 0, 59, 59), "Europe/Berlin")
    assert w.is_open(utc(2026, 3, 29, 1, 0), "Europe/Berlin")
    # 60 minutes of elapsed time from there.
    assert w.is_open(utc(2026, 3, 29, 1, 59, 59), "Europe/Berlin")
    assert not w.is_open(utc(2026, 3, 29, 2, 0), "Europe/Berlin")
    # The week after, 02:30 CEST exists again (00:30 UTC).
    assert w.next_open(utc(2026, 3, 30), "Europe/Berlin") == utc(2026, 4, 5, 0, 30)


def test_a_start_in_berlins_autumn_fold_opens_at_its_first_occurrence() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC.
    w = Window("weekly", 6, 2, 30, 30)
    assert w.next_open(utc(2026, 10, 24), "Europe/Berlin") == utc(2026, 10, 25, 0, 30)
    assert w.is_open(utc(2026, 10, 25, 0, 45), "Europe/Berlin")
    # The second 02:30 is no new opening.
    assert not w.is_open(utc(2026, 10, 25, 1, 30), "Europe/Berlin")


def test_new_york_gap_and_fold() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00 UTC); 2026-11-01: 02:00 EDT -> 01:00 EST.
    w = Window("weekly", 6, 2, 15, 10)
    assert w.next_open(utc(2026, 3, 7), "America/New_York") == utc(2026, 3, 8, 7, 0)
    fold = Window("weekly", 6, 1, 30, 10)
    assert fold.next_open(utc(2026, 10, 31), "America/New_York") == utc(2026, 11, 1, 5, 30)
    assert not fold.is_open(utc(2026, 11, 1, 6, 35), "America/New_York")


def test_lord_howes_thirty_minute_shift() -> None:
    # 2026-10-04: 02:00 (+10:30) becomes 02:30 (+11); 02:10 does not exist.
    w = Window("weekly", 6, 2, 10, 20)
    assert w.next_open(utc(2026, 10, 1), "Australia/Lord_Howe") == utc(2026, 10, 3, 15, 30)
    # 2027-04-04: 02:00 (+11) becomes 01:30 (+10:30); 01:45 happens twice, first at 14:45 UTC.
    fold = Window("weekly", 6, 1, 45, 20)
    assert fold.next_open(utc(2027, 4, 1), "Australia/Lord_Howe") == utc(2027, 4, 3, 14, 45)
    assert not fold.is_open(utc(2027, 4, 3, 15, 20), "Australia/Lord_Howe")


def test_a_window_across_a_dst_change_lasts_its_elapsed_minutes() -> None:
    # Opens 01:30 CET on 2026-03-29 (00:30 UTC) for 90 minutes: 2:00 UTC, 04:00 CEST.
    w = Window("weekly", 6, 1, 30, 90)
    assert w.is_open(utc(2026, 3, 29, 1, 59), "Europe/Berlin")
    assert not w.is_open(utc(2026, 3, 29, 2, 0), "Europe/Berlin")


# -- month ends ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "opening"),
    [
        (utc(2027, 2, 1), utc(2027, 2, 28, 3, 0)),  # not a leap year: the 28th
        (utc(2028, 2, 1), utc(2028, 2, 29, 3, 0)),  # leap year: the 29th
        (utc(2100, 2, 1), utc(2100, 2, 28, 3, 0)),  # divisible by 100, not by 400
        (utc(2027, 4, 1), utc(2027, 4, 30, 3, 0)),
        (utc(2027, 5, 1), utc(2027, 5, 31, 3, 0)),
        (utc(2027, 5, 31, 4, 0), utc(2027, 6, 30, 3, 0)),
    ],
)
def test_monthly_day_31_is_the_last_day_of_shorter_months(
    after: datetime, opening: datetime
) -> None:
    assert Window("monthly", 31, 3, 0, 60).next_open(after, "UTC") == opening


def test_a_monthly_window_in_a_zone_opens_on_the_local_date() -> None:
    w = Window("monthly", 1, 0, 30, 60)
    # Midnight thirty on 1 March in Berlin is 23:30 UTC on the last of February.
    assert w.next_open(utc(2028, 2, 20), "Europe/Berlin") == utc(2028, 2, 29, 23, 30)
    assert w.is_open(utc(2028, 2, 29, 23, 45), "Europe/Berlin")
    assert not w.is_open(utc(2028, 2, 29, 23, 45), "UTC")


# -- forms ---------------------------------------------------------------------------------


def test_text_and_json_forms() -> None:
    w = Window.parse("weekly sun 03:00 60m")
    assert w == Window("weekly", 6, 3, 0, 60)
    assert Window.parse("WEEKLY Tuesday 22:05 2h") == Window("weekly", 1, 22, 5, 120)
    assert Window.parse("monthly 31 23:59 90") == Window("monthly", 31, 23, 59, 90)
    assert Window.parse(str(w)) == w
    assert Window.from_json(w.to_json()) == w


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("weekly sunny 03:00 60m", "weekly window day"),
        ("weekly su 03:00 60m", "weekly window day"),
        ("monthly 32 03:00 60m", "1..31"),
        ("monthly 0 03:00 60m", "1..31"),
        ("weekly sun 24:00 60m", "hour"),
        ("weekly sun 03:60 60m", "minute"),
        ("weekly sun 03:00 0m", "duration"),
        (f"weekly sun 03:00 {MAX_DURATION_MINUTES + 1}m", "duration"),
        ("daily 03:00", "write it as"),
    ],
)
def test_bad_windows_name_the_field(text: str, names: str) -> None:
    with pytest.raises(WindowError, match=names):
        Window.parse(text)


def test_bad_json_and_zones_are_refused() -> None:
    with pytest.raises(WindowError, match="missing duration_minutes"):
        Window.from_json({"kind": "weekly", "day": 6, "hour": 3, "minute": 0})
    with pytest.raises(WindowError, match="whole number"):
        Window.from_json(
            {"kind": "weekly", "day": True, "hour": 3, "minute": 0, "duration_minutes": 5}
        )
    with pytest.raises(WindowError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")
    with pytest.raises(ValueError, match="naive"):
        Window("weekly", 0, 0, 0, 5).is_open(datetime(2026, 1, 1), "UTC")


# -- properties ----------------------------------------------------------------------------

windows = st.builds(
    Window,
    kind=st.just("weekly"),
    day=st.integers(0, 6),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    duration_minutes=st.integers(1, 6 * 24 * 60),
) | st.builds(
    Window,
    kind=st.just("monthly"),
    day=st.integers(1, 31),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    duration_minutes=st.integers(1, MAX_DURATION_MINUTES),
)
instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(w=windows, now=instants, tz=st.sampled_from(ZONES))
def test_the_next_opening_is_open_and_nothing_before_it_is(
    w: Window, now: datetime, tz: str
) -> None:
    opening = w.next_open(now, tz)
    assert opening >= now
    assert w.is_open(opening, tz)
    if opening > now:
        # Closed just before it, and at now (the window was not open yet).
        assert not w.is_open(now, tz)
        assert not w.is_open(opening - timedelta(seconds=1), tz)
        # It opens at the configured local time, or after it when that time does not exist.
        local = opening.astimezone(zone(tz))
        wanted = local.replace(hour=w.hour, minute=w.minute, second=0, microsecond=0)
        assert (local.hour, local.minute) == (w.hour, w.minute) or local > wanted.replace(
            tzinfo=None
        ).replace(tzinfo=zone(tz))


@settings(max_examples=300, deadline=None)
@given(w=windows, now=instants, tz=st.sampled_from(ZONES))
def test_an_opening_lasts_its_duration_and_then_closes(w: Window, now: datetime, tz: str) -> None:
    opening = w.next_open(now, tz)
    if opening > now:
        end = opening + timedelta(minutes=w.duration_minutes)
        assert w.is_open(end - timedelta(seconds=1), tz)
        # Closed at its end unless the next opening starts right there (long windows).
        if w.next_open(end, tz) != end:
            assert not w.is_open(end, tz)


@settings(max_examples=300, deadline=None)
@given(
    wall=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1)),
    tz=st.sampled_from(ZONES),
)
def test_local_instants_are_the_wall_time_or_the_end_of_its_gap(wall: datetime, tz: str) -> None:
    wall = wall.replace(second=0, microsecond=0)
    z = zone(tz)
    instant = local_instant(wall, z)
    local = instant.astimezone(z).replace(tzinfo=None)
    if local != wall:
        # A gap: the instant is the first one past it, and a second earlier was before it.
        assert local > wall
        assert (instant - timedelta(seconds=1)).astimezone(z).replace(tzinfo=None) < wall
    else:
        # The first occurrence: an hour earlier the wall clock was not there yet.
        earlier = instant - timedelta(hours=1)
        assert earlier.astimezone(z).replace(tzinfo=None) < wall
