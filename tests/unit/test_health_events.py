"""Health events the gateway detects: conditions fire once and re-arm, facts each time."""

from __future__ import annotations

from email.utils import formatdate

from sgw.gateway.health.events import (
    EventDetector,
    check_previous_run,
    clean_stop,
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def kinds(det: EventDetector) -> list[str]:
    return [e.kind for e in det.take()]


def test_log_nearly_full_fires_once_and_rearms_below_the_margin():
    det = EventDetector()
    det.observe({"log_used_percent": 89.9}, {}, remote=False)
    assert kinds(det) == []
    det.observe({"log_used_percent": 91.0}, {}, remote=False)
    det.observe({"log_used_percent": 95.0}, {}, remote=False)
    det.observe({"log_used_percent": 85.0}, {}, remote=False)  # still above the clear mark
    det.observe({"log_used_percent": 92.0}, {}, remote=False)
    events = det.take()
    assert [e.kind for e in events] == ["log_nearly_full"]
    assert "91% full" in events[0].detail
    det.observe({"log_used_percent": 10.0}, {}, remote=False)
    det.observe({"log_used_percent": 90.0}, {}, remote=False)
    assert kinds(det) == ["log_nearly_full"]


def test_clock_skew_from_a_date_header():
    clock = Clock()
    det = EventDetector(clock=clock)
    now = clock.now
    # The provider's clock 42 s behind ours: its Date header says now - 42.
    skew = det.observe_date(formatdate(now - 42, usegmt=True), now - 0.1, now + 0.1)
    assert skew is not None
    assert 41.0 <= skew <= 43.0
    events = det.take()
    assert [e.kind for e in events] == ["clock_skew"]
    assert "+42 s" in events[0].detail or "+41 s" in events[0].detail
    # In step again (the header's second resolution): no event, and the condition re-arms.
    small = det.observe_date(formatdate(now, usegmt=True), now, now)
    assert small is not None and abs(small) <= 1.0
    assert det.clock_skew == small
    assert kinds(det) == []
    det.observe_date(formatdate(now + 60, usegmt=True), now, now)
    assert kinds(det) == ["clock_skew"]


def test_a_missing_or_bad_date_header_measures_nothing():
    det = EventDetector()
    assert det.observe_date(None, 0, 0) is None
    assert det.observe_date("yesterday-ish", 0, 0) is None
    assert det.clock_skew is None


def test_provider_unreachable_after_the_grace_only():
    clock = Clock()
    det = EventDetector(provider_grace_s=60, clock=clock)
    det.observe({"control_channel_connected": 0.0}, {}, remote=True)
    clock.now += 59
    det.observe({"control_channel_connected": 0.0}, {}, remote=True)
    assert kinds(det) == []
    clock.now += 2
    det.observe({"control_channel_connected": 0.0}, {}, remote=True)
    assert kinds(det) == ["provider_unreachable"]
    det.observe({"control_channel_connected": 1.0}, {}, remote=True)
    clock.now += 100
    det.observe({"control_channel_connected": 0.0}, {}, remote=True)
    assert kinds(det) == []  # down again, but not for the grace yet


def test_upload_stalled_needs_queued_bytes_and_an_old_recovery_point():
    det = EventDetector(upload_stall_s=600)
    det.observe({"queued_write_bytes": 0, "recovery_point_age_seconds": 900}, {}, remote=True)
    det.observe({"queued_write_bytes": 4096, "recovery_point_age_seconds": 599}, {}, remote=True)
    assert kinds(det) == []
    det.observe({"queued_write_bytes": 4096, "recovery_point_age_seconds": 601}, {}, remote=True)
    assert kinds(det) == ["upload_stalled"]


def test_disk_errors_and_passthrough():
    det = EventDetector()
    det.observe({"disk_errors_total": 2}, {"vol0": {"passthrough": 0}}, remote=True)
    assert kinds(det) == []  # the first sample is the baseline
    det.observe({"disk_errors_total": 5}, {"vol0": {"passthrough": 1}}, remote=True)
    events = det.take()
    assert sorted(e.kind for e in events) == ["disk_error", "passthrough"]
    assert next(e for e in events if e.kind == "passthrough").volume == "vol0"
    assert "3 I/O errors" in next(e for e in events if e.kind == "disk_error").detail


def test_restart_after_crash_from_the_run_marker(tmp_path):
    det = EventDetector()
    check_previous_run(str(tmp_path), det, standby=False)
    assert kinds(det) == []  # first start
    # killed: the marker stays; the next start reports it
    check_previous_run(str(tmp_path), det, standby=False)
    assert kinds(det) == ["restart_after_crash"]
    # a swap's successor takes the marker over: no event
    check_previous_run(str(tmp_path), det, standby=True)
    assert kinds(det) == []
    clean_stop(str(tmp_path))
    check_previous_run(str(tmp_path), det, standby=False)
    assert kinds(det) == []


def test_events_wait_for_reports_in_order_bounded_per_report():
    det = EventDetector()
    for i in range(150):
        det.note("disk_error", "error", f"#{i}")
    first, second = det.take(), det.take()
    assert len(first) == 100 and len(second) == 50
    assert first[0].detail == "#0" and second[-1].detail == "#149"
