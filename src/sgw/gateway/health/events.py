"""Typed health events (``sgw.common.health.EVENT_KINDS``) the gateway detects itself.

Conditions (log nearly full, upload stalled, provider unreachable, clock skew, a volume
in pass-through) raise one event when they begin and re-arm only once they have cleared
(with a margin, so that a value hovering at a threshold does not raise one per sample);
facts (a disk error, a restart after a crash, a swap done or failed) raise one each time.
Events wait here until a report takes them, at most ``MAX_PENDING`` (oldest dropped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from sgw.common.health import MAX_DETAIL_CHARS, MAX_EVENTS_PER_REPORT, HealthEvent

LOG = logging.getLogger(__name__)

# The write log is nearly full at this percent of its size (writes slow down from 80 %,
# sgw.gateway.nbd.connection.THROTTLE_START); cleared below LOG_CLEAR_PERCENT.
LOG_FULL_PERCENT = 90.0
LOG_CLEAR_PERCENT = 80.0
# Uploads are stalled when writes have waited this long (seconds) without a committed
# upload: a destage pass takes seconds, its retries back off to 30 s at most.
UPLOAD_STALL_S = 600.0
# The provider is unreachable once the control channel has been down this long (seconds):
# one failed long-poll and its first retries are not worth an event.
PROVIDER_GRACE_S = 60.0
# Clock skew worth an event (seconds): well beyond the Date header's 1 s resolution and a
# round trip, far inside the 300 s the provider accepts signed requests within.
CLOCK_SKEW_S = 10.0
CLOCK_CLEAR_S = 5.0
# Events kept while no report takes them.
MAX_PENDING = 1_000
# The run marker: present while a daemon serves this data directory; left behind by one
# that did not stop cleanly.
RUN_MARKER = "running"


class EventDetector:
    """Turns samples and facts into events; ``take`` hands them to a report."""

    def __init__(
        self,
        *,
        upload_stall_s: float = UPLOAD_STALL_S,
        provider_grace_s: float = PROVIDER_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.upload_stall_s = upload_stall_s
        self.provider_grace_s = provider_grace_s
        self._clock = clock
        self._pending: deque[HealthEvent] = deque(maxlen=MAX_PENDING)
        self._active: set[str] = set()
        self._disk_errors: float | None = None
        self._down_since: float | None = None
        self.clock_skew: float | None = None  # seconds, the last measured

    def note(self, kind: str, severity: str, detail: str = "", volume: str | None = None) -> None:
        """Records an event that happened now."""
        at = datetime.fromtimestamp(self._clock(), UTC)
        self._pending.append(HealthEvent(kind, at, severity, volume, detail[:MAX_DETAIL_CHARS]))
        LOG.info("health event", extra={"kind": kind, "volume": volume, "detail": detail})

    def take(self) -> tuple[HealthEvent, ...]:
        """The events for the next report (the rest wait for the one after)."""
        n = min(len(self._pending), MAX_EVENTS_PER_REPORT)
        return tuple(self._pending.popleft() for _ in range(n))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _condition(self, key: str, on: bool, off: bool, fire: Callable[[], None]) -> None:
        """Fires when ``key`` turns on; re-arms once ``off``."""
        if on and key not in self._active:
            self._active.add(key)
            fire()
        elif off:
            self._active.discard(key)

    def observe(
        self,
        gateway: dict[str, float],
        volumes: dict[str, dict[str, float]],
        *,
        remote: bool,
    ) -> None:
        """Checks a sample's metrics (``remote``: the gateway uploads to a provider)."""
        used = gateway.get("log_used_percent", 0.0)
        self._condition(
            "log",
            used >= LOG_FULL_PERCENT,
            used < LOG_CLEAR_PERCENT,
            lambda: self.note("log_nearly_full", "warning", f"write log {used:.0f}% full"),
        )
        if remote:
            age = gateway.get("recovery_point_age_seconds", 0.0)
            queued = gateway.get("queued_write_bytes", 0.0)
            stalled = queued > 0 and age >= self.upload_stall_s
            self._condition(
                "upload",
                stalled,
                not stalled,
                lambda: self.note(
                    "upload_stalled",
                    "error",
                    f"{queued:.0f} bytes queued and no committed upload for {age:.0f} s",
                ),
            )
        connected = gateway.get("control_channel_connected")
        if connected is not None:
            now = self._clock()
            if connected:
                self._down_since = None
            elif self._down_since is None:
                self._down_since = now
            down = self._down_since is not None and now - self._down_since >= self.provider_grace_s
            since = 0.0 if self._down_since is None else now - self._down_since
            self._condition(
                "provider",
                down,
                bool(connected),
                lambda: self.note(
                    "provider_unreachable",
                    "warning",
                    f"control channel down for {since:.0f} s",
                ),
            )
        errors = gateway.get("disk_errors_total", 0.0)
        if self._disk_errors is not None and errors > self._disk_errors:
            self.note(
                "disk_error",
                "error",
                f"{errors - self._disk_errors:.0f} I/O errors of the write log, a volume "
                "disk or the cache since the last report",
            )
        self._disk_errors = errors
        for name, m in volumes.items():
            through = m.get("passthrough", 0.0) >= 1
            self._condition(
                f"passthrough:{name}",
                through,
                not through,
                lambda name=name: self.note(  # type: ignore[misc]
                    "passthrough",
                    "error",
                    "the provider is unreachable and the write log full: writes go to the "
                    "local disk only",
                    name,
                ),
            )

    def observe_date(self, date: str | None, sent: float, received: float) -> float | None:
        """The clock skew from a provider's HTTP ``Date`` header (a response received at
        ``received`` to a request sent at ``sent``, wall-clock seconds): this gateway's
        clock minus the provider's. None if the header is missing or unreadable."""
        if not date:
            return None
        try:
            theirs = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return None
        # The header is truncated to the second: the provider's clock read theirs + 0.5 on
        # average, somewhere between sent and received.
        skew = (sent + received) / 2 - (theirs + 0.5)
        self.clock_skew = skew
        self._condition(
            "clock",
            abs(skew) >= CLOCK_SKEW_S,
            abs(skew) < CLOCK_CLEAR_S,
            lambda: self.note(
                "clock_skew",
                "warning",
                f"this gateway's clock is {skew:+.0f} s off the provider's; check its NTP",
            ),
        )
        return skew


def check_previous_run(data_dir: str, detector: EventDetector, *, standby: bool) -> None:
    """Marks this daemon as running; a marker a predecessor left means it did not stop
    cleanly (killed, crashed, power lost): a ``restart_after_crash`` event. A swap's
    successor (``standby``) takes the marker over without an event."""
    path = os.path.join(data_dir, RUN_MARKER)
    if not standby and os.path.exists(path):
        try:
            with open(path) as f:
                before = f.read().strip()
        except OSError:
            before = ""
        detector.note(
            "restart_after_crash",
            "warning",
            f"the previous daemon (pid {before or '?'}) did not stop cleanly",
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def clean_stop(data_dir: str) -> None:
    """Removes the run marker: this daemon stopped cleanly."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(data_dir, RUN_MARKER))
