"""Health reports: what a gateway uploads about itself, in one schema that the gateway and
the provider share (DESIGN.md section 3, "Status").

A gateway samples its metrics and collects typed events; each sample becomes a
``HealthReport`` numbered by the gateway (``seq``, strictly increasing per gateway,
also across restarts). Reports wait in a bounded buffer on the gateway's disk and go up
in batches, ``POST /v1/gateway/health`` (signed like every gateway request), body
``{"reports": [report, ...]}``; the provider stores each report once per
``(gateway, seq)`` (a batch sent twice changes nothing) and answers
``{"accepted_through": N}``: the gateway may forget every report up to ``seq`` N.

The metric names are a wire format, bounded: ``GATEWAY_METRICS`` per gateway,
``VOLUME_METRICS`` per volume (a report carries any subset; names it does not know are
refused, so a typo cannot grow the provider's tables). Their Prometheus names are
``sgw_<name>``. Counters (``_total``) are the gateway's running totals since its
process started; the provider turns them into rates and survives resets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sgw.common.errors import BadRequestError
from sgw.common.names import is_volume_name

HEALTH_PATH = "/v1/gateway/health"
MAX_REPORTS_PER_BATCH = 200
MAX_EVENTS_PER_REPORT = 100
MAX_VOLUMES_PER_REPORT = 256
MAX_DETAIL_CHARS = 500
MAX_LABEL_CHARS = 100

# Per gateway.
GATEWAY_METRICS: frozenset[str] = frozenset(
    {
        "cache_hit_percent",  # reads served from the local cache, over the interval
        "cache_used_percent",
        "cache_dirty_percent",
        "log_used_percent",  # the write log (the upload buffer)
        "log_used_bytes",
        "queued_write_bytes",  # written locally, not yet committed to the provider
        "queued_write_oldest_seconds",
        "cloud_uploaded_bytes_total",
        "cloud_downloaded_bytes_total",
        "cloud_download_latency_seconds",  # mean over the interval
        "upload_errors_total",
        "destage_errors_total",
        "read_bytes_total",
        "write_bytes_total",
        "read_latency_seconds",  # mean over the interval
        "write_latency_seconds",
        "recovery_point_age_seconds",  # since the oldest volume's last committed upload
        "io_wait_seconds_total",  # time the local disks spent on I/O
        "nbd_connections",
        "nbd_requests_in_flight",
        "control_channel_connected",  # 1 or 0
        "swap_pause_seconds",  # the last swap's I/O pause
        "clock_skew_seconds",  # the gateway's clock minus the provider's Date
        "disk_errors_total",
        "uptime_seconds",
    }
)

# Per volume.
VOLUME_METRICS: frozenset[str] = frozenset(
    {
        "cache_hit_percent",
        "queued_write_bytes",
        "queued_write_oldest_seconds",
        "read_bytes_total",
        "write_bytes_total",
        "read_latency_seconds",
        "write_latency_seconds",
        "recovery_point_age_seconds",
        "cloud_uploaded_bytes_total",
        "cloud_downloaded_bytes_total",
        "upload_errors_total",
        "passthrough",  # 1 while the volume writes through (its log is unusable)
        "restore_in_progress",  # 1 while a lazy restore fills the volume
        "size_bytes",
    }
)

EventKind = Literal[
    "disk_error",
    "log_nearly_full",
    "upload_stalled",
    "provider_unreachable",
    "clock_skew",
    "restart_after_crash",
    "swap_done",
    "swap_failed",
    "passthrough",
    "started",
]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: frozenset[str] = frozenset(get_args(Severity))


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """Something that happened on the gateway, at a moment."""

    kind: str
    at: datetime
    severity: str = "warning"
    volume: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "at": _iso(self.at),
            "severity": self.severity,
            "volume": self.volume,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, doc: Any) -> HealthEvent:
        d = _mapping(doc, "event")
        kind = _choice(d, "kind", EVENT_KINDS)
        severity = _choice(d, "severity", SEVERITIES)
        volume = d.get("volume")
        if volume is not None and not (isinstance(volume, str) and is_volume_name(volume)):
            raise BadRequestError(f"event volume {volume!r} is not a volume name")
        detail = d.get("detail", "")
        if not isinstance(detail, str):
            raise BadRequestError("event detail must be text")
        return cls(kind, _time(d, "at"), severity, volume, detail[:MAX_DETAIL_CHARS])


@dataclass(frozen=True, slots=True)
class HealthReport:
    """One sample of a gateway's metrics, with the events since the previous one."""

    seq: int
    at: datetime
    version: str
    kernel: str = ""
    hypervisor: str = ""
    site: str = ""
    gateway: Mapping[str, float] = field(default_factory=dict)
    volumes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    events: tuple[HealthEvent, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": _iso(self.at),
            "version": self.version,
            "kernel": self.kernel,
            "hypervisor": self.hypervisor,
            "site": self.site,
            "gateway": dict(self.gateway),
            "volumes": {name: dict(m) for name, m in self.volumes.items()},
            "events": [e.to_json() for e in self.events],
        }

    @classmethod
    def from_json(cls, doc: Any) -> HealthReport:
        """A report as received; BadRequestError naming the first bad field."""
        d = _mapping(doc, "report")
        seq = d.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise BadRequestError("report seq must be a whole number >= 0")
        labels = {k: _label(d, k) for k in ("version", "kernel", "hypervisor", "site")}
        gateway = _metrics(d.get("gateway", {}), GATEWAY_METRICS, "gateway")
        volumes_doc = _mapping(d.get("volumes", {}), "volumes")
        if len(volumes_doc) > MAX_VOLUMES_PER_REPORT:
            raise BadRequestError(f"a report carries at most {MAX_VOLUMES_PER_REPORT} volumes")
        volumes: dict[str, dict[str, float]] = {}
        for name, m in volumes_doc.items():
            if not is_volume_name(name):
                raise BadRequestError(f"volumes: {name!r} is not a volume name")
            volumes[name] = _metrics(m, VOLUME_METRICS, f"volume {name}")
        events_doc = d.get("events", [])
        if not isinstance(events_doc, list) or len(events_doc) > MAX_EVENTS_PER_REPORT:
            raise BadRequestError(f"events must be a list of at most {MAX_EVENTS_PER_REPORT}")
        events = tuple(HealthEvent.from_json(e) for e in events_doc)
        return cls(seq, _time(d, "at"), gateway=gateway, volumes=volumes, events=events, **labels)


def parse_batch(doc: Any) -> list[HealthReport]:
    """The reports of one upload, in ``seq`` order; BadRequestError on any bad one."""
    d = _mapping(doc, "body")
    reports = d.get("reports")
    if not isinstance(reports, list) or not 1 <= len(reports) <= MAX_REPORTS_PER_BATCH:
        raise BadRequestError(f"reports must be a list of 1 to {MAX_REPORTS_PER_BATCH} reports")
    return sorted((HealthReport.from_json(r) for r in reports), key=lambda r: r.seq)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _mapping(doc: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise BadRequestError(f"{what} must be a JSON object")
    return doc


def _choice(d: Mapping[str, Any], key: str, allowed: frozenset[str]) -> str:
    value = d.get(key)
    if value not in allowed:
        raise BadRequestError(f"{key} {value!r} is not one of {', '.join(sorted(allowed))}")
    return str(value)


def _label(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise BadRequestError(f"{key} must be printable text of at most {MAX_LABEL_CHARS}")
    return value


def _time(d: Mapping[str, Any], key: str) -> datetime:
    value = d.get(key)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadRequestError(f"{key} {value!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise BadRequestError(f"{key} {value!r} has no time zone")
    return t.astimezone(UTC)


def _metrics(doc: Any, allowed: frozenset[str], what: str) -> dict[str, float]:
    d = _mapping(doc, what)
    out: dict[str, float] = {}
    for name, value in d.items():
        if name not in allowed:
            raise BadRequestError(f"{what}: unknown metric {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequestError(f"{what}: metric {name} must be a number")
        if not math.isfinite(value):
            raise BadRequestError(f"{what}: metric {name} must be finite")
        out[name] = float(value)
    return out
