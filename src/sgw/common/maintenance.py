"""Maintenance windows: when a gateway may swap to a new release on its own.

A window opens once a week (``weekly``, ``day`` 0=Monday..6=Sunday) or once a month
(``monthly``, ``day`` 1..31; a day past the month's end means its last day) at ``hour``:
``minute`` local time in the gateway's IANA time zone, and stays open for
``duration_minutes`` of elapsed time (so a window across a DST change lasts as long as any
other). A local start time that does not exist (a DST gap) starts at the first instant
after it, the end of the gap; an ambiguous one (a DST fold) at its first occurrence.

The provider (sgw.provider.updates) stores the window and hands it to the gateway in its
plan; the gateway's update agent decides with ``is_open`` itself, so a provider cannot
push a swap outside it (except through an explicit ``now``).
"""

from __future__ import annotations

import calendar
import re
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Literal, Self

from sgw.common.errors import BadRequestError

Kind = Literal["weekly", "monthly"]
KINDS: tuple[Kind, ...] = ("weekly", "monthly")
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# Longest window (minutes): a week. A weekly window of a week is always open.
MAX_DURATION_MINUTES = 7 * 24 * 60
# How far back a window that is open now may have started: its longest duration and a
# day's margin for time-zone offsets.
_LOOKBACK_DAYS = 8
# How far ahead the next opening is looked for: past a month and its longest gap.
_LOOKAHEAD_DAYS = 64
_TEXT = re.compile(
    r"\s*(weekly|monthly)\s+(\w+)\s+(\d{1,2}):(\d{2})\s+(\d+)\s*(m|min|h)?\s*", re.IGNORECASE
)
WINDOW_HELP = (
    '"weekly DAY HH:MM DURATION" (DAY: mon..sun) or "monthly DAY HH:MM DURATION" (DAY: 1..31, '
    "past the month's end: its last day); DURATION in minutes (60m) or hours (2h), e.g. "
    '"weekly sun 03:00 60m"'
)


class WindowError(BadRequestError):
    """A window that cannot be: the message names the field and what it may be."""


@dataclass(frozen=True, slots=True)
class Window:
    """A recurring maintenance window (module docstring)."""

    kind: Kind
    day: int
    hour: int
    minute: int
    duration_minutes: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WindowError(f"window kind {self.kind!r}: give weekly or monthly")
        low, high = (0, 6) if self.kind == "weekly" else (1, 31)
        if not (isinstance(self.day, int) and low <= self.day <= high):
            what = "0=Monday..6=Sunday" if self.kind == "weekly" else "1..31"
            raise WindowError(f"{self.kind} window day {self.day!r}: give {what}")
        if not (isinstance(self.hour, int) and 0 <= self.hour <= 23):
            raise WindowError(f"window hour {self.hour!r}: give 0..23")
        if not (isinstance(self.minute, int) and 0 <= self.minute <= 59):
            raise WindowError(f"window minute {self.minute!r}: give 0..59")
        if not (
            isinstance(self.duration_minutes, int)
            and 1 <= self.duration_minutes <= MAX_DURATION_MINUTES
        ):
            raise WindowError(
                f"window duration {self.duration_minutes!r} minutes: give 1..{MAX_DURATION_MINUTES}"
            )

    # The wire format (the plan, the policy API) and the text the CLI takes

    @classmethod
    def from_json(cls, doc: Any) -> Self:
        """The window of a JSON object (WindowError naming a missing or bad field)."""
        if not isinstance(doc, dict):
            raise WindowError("a window is an object: kind, day, hour, minute, duration_minutes")
        fields = ("kind", "day", "hour", "minute", "duration_minutes")
        missing = [f for f in fields if f not in doc]
        if missing:
            raise WindowError(f"window: missing {', '.join(missing)}")
        for f in fields[1:]:
            if isinstance(doc[f], bool) or not isinstance(doc[f], int):
                raise WindowError(f"window {f} {doc[f]!r}: give a whole number")
        return cls(doc["kind"], doc["day"], doc["hour"], doc["minute"], doc["duration_minutes"])

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "day": self.day,
            "hour": self.hour,
            "minute": self.minute,
            "duration_minutes": self.duration_minutes,
        }

    @classmethod
    def parse(cls, text: str) -> Self:
        """A window written as ``weekly sun 03:00 60m`` or ``monthly 31 22:30 2h``."""
        m = _TEXT.fullmatch(text)
        if m is None:
            raise WindowError(f"window {text[:80]!r}: write it as {WINDOW_HELP}")
        kind, day_text, hour, minute, amount, unit = m.groups()
        kind = kind.lower()
        day_text = day_text.lower()
        if kind == "weekly":
            names = [d for d in _FULL_DAY_NAMES if len(day_text) >= 3 and d.startswith(day_text)]
            if not names:
                raise WindowError(f"weekly window day {day_text!r}: give mon, tue, ... or sun")
            day = _FULL_DAY_NAMES.index(names[0])
        elif day_text.isdigit():
            day = int(day_text)
        else:
            raise WindowError(f"monthly window day {day_text!r}: give 1..31")
        minutes = int(amount) * (60 if (unit or "m").lower() == "h" else 1)
        return cls(kind, day, int(hour), int(minute), minutes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        day = DAY_NAMES[self.day] if self.kind == "weekly" else str(self.day)
        return f"{self.kind} {day} {self.hour:02d}:{self.minute:02d} {self.duration_minutes}m"

    # Arithmetic

    def is_open(self, now: datetime, tz: str | None) -> bool:
        """True if ``now`` (aware) is inside an opening of the window in zone ``tz``."""
        return self._open_start(now, zone(tz)) is not None

    def next_open(self, now: datetime, tz: str | None) -> datetime:
        """When the window is next open: ``now`` if it is open, else its next start (UTC)."""
        z = zone(tz)
        if self._open_start(now, z) is not None:
            return now.astimezone(UTC)
        today = now.astimezone(z).date()
        for offset in range(-1, _LOOKAHEAD_DAYS):
            start = self.start_on(today + timedelta(days=offset), z)
            if start is not None and start > now:
                return start
        raise AssertionError(f"{self} has no opening within {_LOOKAHEAD_DAYS} days")  # unreachable

    def start_on(self, day: date, z: tzinfo) -> datetime | None:
        """The UTC instant the window opens on local date ``day``, or None if it does not
        open that day."""
        if self.kind == "weekly":
            if day.weekday() != self.day:
                return None
        else:
            last = calendar.monthrange(day.year, day.month)[1]
            if day.day != min(self.day, last):
                return None
        return local_instant(datetime.combine(day, time(self.hour, self.minute)), z)

    def _open_start(self, now: datetime, z: tzinfo) -> datetime | None:
        if now.tzinfo is None:
            raise ValueError(f"naive datetime {now!r}: pass an aware datetime")
        today = now.astimezone(z).date()
        length = timedelta(minutes=self.duration_minutes)
        for offset in range(-_LOOKBACK_DAYS, 2):
            start = self.start_on(today + timedelta(days=offset), z)
            if start is not None and start <= now < start + length:
                return start
        return None


def zone(name: str | None) -> tzinfo:
    """The IANA time zone ``name`` (UTC for None); WindowError for an unknown one."""
    if not name:
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise WindowError(
            f"unknown time zone {name[:64]!r}: give an IANA name such as Europe/Berlin"
        ) from None


def local_instant(wall: datetime, z: tzinfo) -> datetime:
    """The UTC instant of naive local time ``wall`` in zone ``z``: its first occurrence
    if a DST change repeats it; the first instant after it (the gap's end) if one skips it.
    """
    first = wall.replace(tzinfo=z, fold=0).astimezone(UTC)
    if first.astimezone(z).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=1 maps it with the offset after the change, landing before the gap;
    # fold=0 with the one before, landing after it. The change is between; find the first
    # second whose local time is past ``wall`` (offsets change on whole seconds).
    low = wall.replace(tzinfo=z, fold=1).astimezone(UTC)
    high = first
    if low > high:
        low, high = high, low
    while high - low > timedelta(seconds=1):
        mid = low + (high - low) / 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(z).replace(tzinfo=None) >= wall:
            high = mid
        else:
            low = mid
    return high
