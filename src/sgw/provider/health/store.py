"""The health store: what gateways report, kept in the provider's database (SQLite or
PostgreSQL) and read back as the latest sample, series, events and the fleet's table.

Ingest (``ingest``): a batch's reports are inserted once per ``(gateway, seq)`` (``INSERT
... ON CONFLICT DO NOTHING``, so a batch sent again changes nothing), their events once per
``(gateway, seq, n)``; the gateway's row in ``health_gateways`` keeps the labels and metrics
of its newest report (highest ``seq``, a conditional update: two batches racing leave the
newest) and answers ``accepted_through``.

Retention (``maintain``, every provider process every ``TICK_S``; the pass runs in one of
them per ``MAINTAIN_EVERY``, ``sgw.provider.db.periodic.claim``): first every complete
hour of raw samples is downsampled into ``health_hours`` (min, max, mean, last of every
metric, per gateway and per volume); an hour is computed again when its count of raw
samples changed (a late report) while its raw samples are all still kept. Then raw
samples older than ``raw_days`` (whole hours), hours older than ``hourly_days`` and
events older than ``events_days`` are deleted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError
from sgw.common.health import GATEWAY_METRICS, VOLUME_METRICS, HealthReport
from sgw.provider.db import schema
from sgw.provider.db.models import (
    Gateway,
    GatewayStatus,
    HealthEventRow,
    HealthGateway,
    HealthHour,
    HealthSample,
    Volume,
    utcnow,
)
from sgw.provider.db.periodic import claim
from sgw.provider.health.codec import decode, encode

LOG = logging.getLogger(__name__)

# How often each provider process looks whether retention is due (seconds), and how often
# it is (one process per period does it).
TICK_S = 60.0
MAINTAIN_EVERY = timedelta(minutes=5)
JOB = "health-retention"
HOUR_S = 3600
# The defaults (days): raw samples a week; hourly aggregates and events 13 months.
RAW_DAYS = 7.0
HOURLY_DAYS = 396.0
EVENTS_DAYS = 396.0
# Most points one series answer holds (a week of raw samples at one a minute is 10,080).
MAX_POINTS = 20_000
ERROR_SEVERITIES = ("error", "critical")

Step = Literal["raw", "hour"]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of health data is kept (days)."""

    raw_days: float = RAW_DAYS
    hourly_days: float = HOURLY_DAYS
    events_days: float = EVENTS_DAYS

    def check(self) -> Retention:
        """Itself; BadRequestError naming a setting that cannot work."""
        if not 1 / 24 <= self.raw_days <= self.hourly_days:
            raise BadRequestError(
                f"health raw retention {self.raw_days} days: give at least an hour (1/24) "
                f"and at most the hourly retention ({self.hourly_days} days)"
            )
        if self.events_days <= 0:
            raise BadRequestError("health events retention must be more than 0 days")
        return self


@dataclass(frozen=True, slots=True)
class Latest:
    """A gateway's newest report, as stored."""

    gateway_id: str
    seq: int
    at: datetime
    received: datetime
    labels: dict[str, str]
    gateway: dict[str, float]
    volumes: dict[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class EventInfo:
    seq: int
    at: datetime
    kind: str
    severity: str
    volume: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "severity": self.severity,
            "volume": self.volume,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class FleetRow:
    gateway_id: str
    name: str
    account_id: str
    received: datetime | None
    version: str | None
    hypervisor: str | None
    site: str | None
    gateway: dict[str, float] = field(default_factory=dict)
    errors: int = 0


@dataclass(frozen=True, slots=True)
class MaintainResult:
    hours: int  # hourly rows written
    raw: int  # rows deleted, each kind
    hourly: int
    events: int


class HealthStore:
    """The health tables, for the API, the metrics collector and the retention pass."""

    def __init__(self, sessions: sessionmaker[Session], retention: Retention | None = None) -> None:
        self.sessions = sessions
        self.retention = (retention or Retention()).check()
        self.holder = str(uuid.uuid4())
        engine = schema.bound_engine(sessions)
        self._url = engine.url.render_as_string(hide_password=False) if engine else ""

    # Ingest

    def ingest(self, gateway_id: str, reports: Sequence[HealthReport]) -> int:
        """Stores the reports not stored yet; the highest ``seq`` stored for the gateway."""
        if not reports:
            raise BadRequestError("a health batch carries at least one report")
        top = max(reports, key=lambda r: r.seq)
        now = utcnow()
        with schema.write_lock(self._url), self.sessions.begin() as s:
            ins = schema.upsert_insert(s.get_bind().dialect.name)
            num = s.scalar(select(HealthGateway.num).where(HealthGateway.gateway_id == gateway_id))
            if num is None:
                s.execute(
                    ins(HealthGateway)
                    .values(gateway_id=gateway_id, **_newest(top, now))
                    .on_conflict_do_nothing(index_elements=["gateway_id"])
                )
                num = s.scalar(
                    select(HealthGateway.num).where(HealthGateway.gateway_id == gateway_id)
                )
            assert num is not None
            s.execute(
                ins(HealthSample)
                .values(
                    [
                        {"gw": num, "seq": r.seq, "at": _epoch(r.at), "data": encode(_doc(r))}
                        for r in reports
                    ]
                )
                .on_conflict_do_nothing(index_elements=["gw", "seq"])
            )
            events = [
                {
                    "gw": num,
                    "seq": r.seq,
                    "n": n,
                    "at": e.at,
                    "kind": e.kind,
                    "severity": e.severity,
                    "volume": e.volume,
                    "detail": e.detail,
                }
                for r in reports
                for n, e in enumerate(r.events)
            ]
            if events:
                s.execute(
                    ins(HealthEventRow)
                    .values(events)
                    .on_conflict_do_nothing(index_elements=["gw", "seq", "n"])
                )
            s.execute(
                update(HealthGateway)
                .where(HealthGateway.num == num, HealthGateway.last_seq < top.seq)
                .values(**_newest(top, now))
                .execution_options(synchronize_session=False)
            )
            last = s.scalar(select(HealthGateway.last_seq).where(HealthGateway.num == num))
        assert last is not None
        return int(last)

    # Reads

    def latest(self, gateway_id: str) -> Latest | None:
        """The gateway's newest report; None before its first."""
        with self.sessions() as s:
            row = s.scalar(select(HealthGateway).where(HealthGateway.gateway_id == gateway_id))
        return None if row is None else _latest(row)

    def volume(self, volume_id: str) -> tuple[str, str | None, str] | None:
        """(account id, gateway id, name) of a volume; None if there is none."""
        with self.sessions() as s:
            row = s.execute(
                select(Volume.account_id, Volume.gateway_id, Volume.name).where(
                    Volume.id == volume_id
                )
            ).first()
        return None if row is None else (row[0], row[1], row[2])

    def latest_all(self) -> list[tuple[str, Latest]]:
        """(gateway name, newest report) of every active gateway that reported."""
        with self.sessions() as s:
            rows = s.execute(
                select(Gateway.name, HealthGateway)
                .join(Gateway, Gateway.id == HealthGateway.gateway_id)
                .where(Gateway.status == GatewayStatus.ACTIVE.value)
                .order_by(Gateway.id)
            ).all()
        return [(name, _latest(row)) for name, row in rows]

    def events(
        self,
        gateway_id: str,
        *,
        since: datetime,
        limit: int = 100,
        volume: str | None = None,
    ) -> list[EventInfo]:
        """The gateway's events since ``since``, newest first (one volume's: ``volume``)."""
        with self.sessions() as s:
            q = (
                select(HealthEventRow)
                .join(HealthGateway, HealthGateway.num == HealthEventRow.gw)
                .where(HealthGateway.gateway_id == gateway_id, HealthEventRow.at >= since)
            )
            if volume is not None:
                q = q.where(HealthEventRow.volume == volume)
            rows = s.scalars(
                q.order_by(HealthEventRow.at.desc(), HealthEventRow.seq.desc()).limit(limit)
            ).all()
        return [EventInfo(e.seq, e.at, e.kind, e.severity, e.volume, e.detail) for e in rows]

    def series(
        self,
        gateway_id: str,
        metric: str,
        *,
        since: datetime,
        until: datetime | None = None,
        step: Step = "raw",
        volume: str | None = None,
    ) -> list[dict[str, Any]]:
        """One metric's points, oldest first: ``{"at", "value"}`` raw, ``{"at", "min",
        "max", "mean", "last", "samples"}`` per hour (complete hours, downsampled)."""
        known = VOLUME_METRICS if volume is not None else GATEWAY_METRICS
        if metric not in known:
            scope = "volume" if volume is not None else "gateway"
            raise BadRequestError(
                f"no {scope} metric {metric!r}; the {scope} metrics are {', '.join(sorted(known))}"
            )
        lo, hi = _epoch(since), _epoch(until or utcnow())
        points: list[dict[str, Any]] = []
        with self.sessions() as s:
            num = s.scalar(select(HealthGateway.num).where(HealthGateway.gateway_id == gateway_id))
            if num is None:
                return []
            if step == "raw":
                rows = s.execute(
                    select(HealthSample.at, HealthSample.data)
                    .where(HealthSample.gw == num, HealthSample.at >= lo, HealthSample.at <= hi)
                    .order_by(HealthSample.at, HealthSample.seq)
                    .limit(MAX_POINTS)
                ).all()
                for at, data in rows:
                    value = _pick(decode(data), metric, volume)
                    if value is not None:
                        points.append({"at": _time(at), "value": float(value)})
                return points
            hours = s.execute(
                select(HealthHour.hour, HealthHour.samples, HealthHour.data)
                .where(
                    HealthHour.gw == num,
                    HealthHour.hour >= lo // HOUR_S,
                    HealthHour.hour <= hi // HOUR_S,
                )
                .order_by(HealthHour.hour)
                .limit(MAX_POINTS)
            ).all()
        for hour, samples, data in hours:
            stats = _pick(decode(data), metric, volume)
            if stats is not None:
                lo_, hi_, mean, last = stats
                points.append(
                    {
                        "at": _time(hour * HOUR_S),
                        "min": float(lo_),
                        "max": float(hi_),
                        "mean": float(mean),
                        "last": float(last),
                        "samples": samples,
                    }
                )
        return points

    def fleet(self, account_id: str | None, now: datetime | None = None) -> list[FleetRow]:
        """Every active gateway of the account (of every account: None) with its newest
        report's figures and its error events of the last 24 hours."""
        now = now or utcnow()
        with self.sessions() as s:
            q = (
                select(Gateway.id, Gateway.name, Gateway.account_id, HealthGateway)
                .outerjoin(HealthGateway, HealthGateway.gateway_id == Gateway.id)
                .where(Gateway.status == GatewayStatus.ACTIVE.value)
                .order_by(Gateway.name, Gateway.id)
            )
            if account_id is not None:
                q = q.where(Gateway.account_id == account_id)
            rows = s.execute(q).all()
            errors = dict(
                s.execute(
                    select(HealthEventRow.gw, func.count())
                    .where(
                        HealthEventRow.at >= now - timedelta(days=1),
                        HealthEventRow.severity.in_(ERROR_SEVERITIES),
                    )
                    .group_by(HealthEventRow.gw)
                ).all()
            )
        out = []
        for gid, name, account, h in rows:
            if h is None:
                out.append(FleetRow(gid, name, account, None, None, None, None))
                continue
            doc = decode(h.latest)
            out.append(
                FleetRow(
                    gid,
                    name,
                    account,
                    h.received,
                    h.version,
                    h.hypervisor,
                    h.site,
                    dict(doc.get("g", {})),
                    int(errors.get(h.num, 0)),
                )
            )
        return out

    # Retention

    def maintain(self, now: datetime | None = None) -> MaintainResult | None:
        """The retention pass if it is due (in any process); None if it was not."""
        now = now or utcnow()
        if not claim(self.sessions, JOB, now, MAINTAIN_EVERY, self.holder):
            return None
        result = self.run_retention(now)
        if result.hours or result.raw or result.hourly or result.events:
            LOG.info(
                "health retention",
                extra={
                    "hours_written": result.hours,
                    "raw_deleted": result.raw,
                    "hours_deleted": result.hourly,
                    "events_deleted": result.events,
                },
            )
        return result

    def run_retention(self, now: datetime) -> MaintainResult:
        """Downsamples, then deletes what is past its retention (see the module doc)."""
        r = self.retention
        raw_from = _epoch(now - timedelta(days=r.raw_days)) // HOUR_S  # first hour kept
        hours = self.downsample(now, raw_from)
        with schema.write_lock(self._url), self.sessions.begin() as s:
            raw = s.execute(delete(HealthSample).where(HealthSample.at < raw_from * HOUR_S))
            hourly = s.execute(
                delete(HealthHour).where(
                    HealthHour.hour < _epoch(now - timedelta(days=r.hourly_days)) // HOUR_S
                )
            )
            events = s.execute(
                delete(HealthEventRow).where(
                    HealthEventRow.at < now - timedelta(days=r.events_days)
                )
            )
        return MaintainResult(
            hours,
            raw.rowcount,  # type: ignore[attr-defined]
            hourly.rowcount,  # type: ignore[attr-defined]
            events.rowcount,  # type: ignore[attr-defined]
        )

    def downsample(self, now: datetime, raw_from: int) -> int:
        """Writes the hourly rows of complete hours that have none, or (from hour
        ``raw_from`` on, whose raw samples are all kept) whose count of samples changed."""
        end = _epoch(now) // HOUR_S  # the current hour is not complete
        hour_of = (HealthSample.at // HOUR_S).label("hour")
        with self.sessions() as s:
            counts = s.execute(
                select(HealthSample.gw, hour_of, func.count())
                .where(HealthSample.at < end * HOUR_S)
                .group_by(HealthSample.gw, hour_of)
            ).all()
            done = {
                (gw, hour): n
                for gw, hour, n in s.execute(
                    select(HealthHour.gw, HealthHour.hour, HealthHour.samples)
                ).all()
            }
        todo = [
            (gw, int(hour))
            for gw, hour, n in counts
            if (gw, int(hour)) not in done or (hour >= raw_from and done[(gw, int(hour))] != n)
        ]
        for gw, hour in todo:
            with schema.write_lock(self._url), self.sessions.begin() as s:
                data = s.scalars(
                    select(HealthSample.data)
                    .where(
                        HealthSample.gw == gw,
                        HealthSample.at >= hour * HOUR_S,
                        HealthSample.at < (hour + 1) * HOUR_S,
                    )
                    .order_by(HealthSample.at, HealthSample.seq)
                ).all()
                ins = schema.upsert_insert(s.get_bind().dialect.name)
                doc = encode(aggregate(decode(d) for d in data))
                s.execute(
                    ins(HealthHour)
                    .values(gw=gw, hour=hour, samples=len(data), data=doc)
                    .on_conflict_do_update(
                        index_elements=["gw", "hour"], set_={"samples": len(data), "data": doc}
                    )
                )
        return len(todo)


def aggregate(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """An hour's document from its samples' documents (oldest first): ``[min, max, mean,
    last]`` of each metric, per gateway and per volume, over the samples that carry it."""
    gw: dict[str, list[float]] = {}
    vols: dict[str, dict[str, list[float]]] = {}
    for doc in samples:
        for name, value in doc.get("g", {}).items():
            gw.setdefault(name, []).append(float(value))
        for vol, metrics in doc.get("v", {}).items():
            per = vols.setdefault(vol, {})
            for name, value in metrics.items():
                per.setdefault(name, []).append(float(value))
    return {
        "g": {name: _stats(values) for name, values in gw.items()},
        "v": {vol: {n: _stats(v) for n, v in per.items()} for vol, per in vols.items()},
    }


def _stats(values: list[float]) -> list[float]:
    return [min(values), max(values), sum(values) / len(values), values[-1]]


def _doc(r: HealthReport) -> dict[str, Any]:
    return {"g": dict(r.gateway), "v": {name: dict(m) for name, m in r.volumes.items()}}


def _newest(r: HealthReport, now: datetime) -> dict[str, Any]:
    return {
        "last_seq": r.seq,
        "last_at": r.at,
        "received": now,
        "version": r.version,
        "kernel": r.kernel,
        "hypervisor": r.hypervisor,
        "site": r.site,
        "latest": encode(_doc(r)),
    }


def _latest(row: HealthGateway) -> Latest:
    doc = decode(row.latest)
    return Latest(
        gateway_id=row.gateway_id,
        seq=row.last_seq,
        at=row.last_at,
        received=row.received,
        labels={
            "version": row.version,
            "kernel": row.kernel,
            "hypervisor": row.hypervisor,
            "site": row.site,
        },
        gateway={k: float(v) for k, v in doc.get("g", {}).items()},
        volumes={vol: {k: float(v) for k, v in m.items()} for vol, m in doc.get("v", {}).items()},
    )


def _pick(doc: dict[str, Any], metric: str, volume: str | None) -> Any:
    scope = doc.get("g", {}) if volume is None else doc.get("v", {}).get(volume, {})
    return scope.get(metric)


def _epoch(t: datetime) -> int:
    return int(t.timestamp())


def _time(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
