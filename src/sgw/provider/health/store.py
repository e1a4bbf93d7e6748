"""The health store: what gateways report, kept in the provider's database (SQLite or
PostgreSQL) and read back as the latest sample, series, events and the fleet's table.

Ingest (``ingest``): a batch's reports are inserted once per ``(gateway, seq)`` (``INSERT
... ON CONFLICT DO NOTHING``, so a batch sent again changes nothing), their events once per
``(gateway, seq, n)``; the gateway's row in ``health_gateways`` keeps the labels and metrics
of its newest report (highest ``seq``, a conditional update: two batches racing leave the
newest) and answers ``accepted_through``.

Retention (``maintain``, every provider process every ``TICK_S``; the pass runs in one of
them per ``MAINTAIN_EVERY``, ``sgw.provider.db.periodic.claim``) keeps three tiers in
``health_blocks``, one row per (gateway, tier, block of time) holding a columnar block
(``sgw.provider.health.codec``): ``raw`` (an hour of samples per row), ``hour`` (a day of
hourly buckets per row) and ``day`` (32 days of daily buckets per row). The pass moves
every complete hour's raw rows into the hour's raw block (merged once per ``seq``: a
report sent again after its hour was blocked is stored as a row once more, and dropped
here), writes that hour's bucket from the whole raw block, and the day's bucket from its
hours (the day so far). Rows of an hour older than the raw window are aggregated only if
the hour has no bucket yet (a gateway's backlog), and dropped past the hourly window.
Then raw blocks older than ``raw_days`` (whole hours), hour blocks of days that ended
``hourly_days`` ago, daily buckets of days that ended ``daily_days`` ago and events older
than ``events_days`` are deleted.

A bucket keeps, per gauge, min, max, sum and count (the mean is exact) and per counter
(``_total``) its first and last value and its increase, resets handled (``increase``):
rates per second across the gateway's restarts, which the series serve.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError
from sgw.common.health import GATEWAY_METRICS, VOLUME_METRICS, HealthReport
from sgw.provider.db import schema
from sgw.provider.db.models import (
    Gateway,
    GatewayStatus,
    HealthBlock,
    HealthEventRow,
    HealthGateway,
    HealthSample,
    Volume,
    utcnow,
)
from sgw.provider.db.periodic import claim
from sgw.provider.health.codec import Block, decode, decode_block, encode, encode_block

LOG = logging.getLogger(__name__)

# How often each provider process looks whether retention is due (seconds), and how often
# it is (one process per period does it).
TICK_S = 60.0
MAINTAIN_EVERY = timedelta(minutes=5)
JOB = "health-retention"
HOUR_S = 3600
DAY_S = 86400
# The tiers of health_blocks, and the time one block of each covers (seconds).
RAW, HOUR, DAY = 0, 1, 2
SPAN = {RAW: HOUR_S, HOUR: DAY_S, DAY: 32 * DAY_S}
# The defaults (days): raw samples 2 days, hourly aggregates a month, daily aggregates
# and events 13 months (docs/performance.md: a year of 1,000 gateways under 1 GiB).
RAW_DAYS = 2.0
HOURLY_DAYS = 31.0
DAILY_DAYS = 396.0
EVENTS_DAYS = 396.0
# Most points one series answer holds (a week of raw samples at one a minute is 10,080).
MAX_POINTS = 20_000
ERROR_SEVERITIES = ("error", "critical")

Step = Literal["raw", "hour", "day"]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of health data is kept (days)."""

    raw_days: float = RAW_DAYS
    hourly_days: float = HOURLY_DAYS
    events_days: float = EVENTS_DAYS
    daily_days: float = DAILY_DAYS

    def check(self) -> Retention:
        """Itself; BadRequestError naming a setting that cannot work."""
        if not 1 / 24 <= self.raw_days <= self.hourly_days:
            raise BadRequestError(
                f"health raw retention {self.raw_days} days: give at least an hour (1/24) "
                f"and at most the hourly retention ({self.hourly_days} days)"
            )
        if not 1 <= self.hourly_days <= self.daily_days:
            raise BadRequestError(
                f"health hourly retention {self.hourly_days} days: give at least a day "
                f"and at most the daily retention ({self.daily_days} days)"
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
    hours: int  # hourly buckets written
    days: int  # daily buckets written
    raw: int  # deleted: raw blocks (hours of samples)
    hourly: int  # hour blocks (days of hours)
    daily: int  # daily buckets
    events: int  # events


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
        """One metric's points, oldest first. ``raw``: ``{"at", "value"}`` per sample (and
        a counter's ``rate`` per second since the previous sample, across resets; None on
        the first). ``hour``/``day``, the buckets that overlap ``since`` to ``until``: a
        gauge's ``{"at", "min", "max", "mean", "samples"}``, a counter's ``{"at", "last",
        "rate", "samples"}`` (``rate``: its increase over the bucket, resets handled, per
        second)."""
        known = VOLUME_METRICS if volume is not None else GATEWAY_METRICS
        if metric not in known:
            scope = "volume" if volume is not None else "gateway"
            raise BadRequestError(
                f"no {scope} metric {metric!r}; the {scope} metrics are {', '.join(sorted(known))}"
            )
        lo, hi = _epoch(since), _epoch(until or utcnow())
        key = (volume or "", metric)
        with self.sessions() as s:
            num = s.scalar(select(HealthGateway.num).where(HealthGateway.gateway_id == gateway_id))
            if num is None:
                return []
            if step == "raw":
                samples = [x for x in self._raw(s, num, lo, hi) if key in x[2]]
                return _raw_points(samples[:MAX_POINTS], key)
            tier, width = (HOUR, HOUR_S) if step == "hour" else (DAY, DAY_S)
            blocks = s.scalars(
                select(HealthBlock.data)
                .where(
                    HealthBlock.gw == num,
                    HealthBlock.tier == tier,
                    HealthBlock.start > lo - SPAN[tier],
                    HealthBlock.start <= hi,
                )
                .order_by(HealthBlock.start)
            ).all()
        points = []
        for data in blocks:
            for b in _buckets(decode_block(data)):
                if lo < b.start + width and b.start <= hi and key in b.stats:
                    points.append(_bucket_point(b, key))
        return points[:MAX_POINTS]

    def _raw(self, s: Session, num: int, lo: int, hi: int) -> list[Sample]:
        """The gateway's samples from ``lo`` to ``hi`` (rows and raw blocks, once per seq)."""
        by_seq: dict[int, Sample] = {}
        blocks = s.scalars(
            select(HealthBlock.data).where(
                HealthBlock.gw == num,
                HealthBlock.tier == RAW,
                HealthBlock.start > lo - HOUR_S,
                HealthBlock.start <= hi,
            )
        ).all()
        for data in blocks:
            for x in _samples(decode_block(data)):
                if lo <= x[0] <= hi:
                    by_seq[x[1]] = x
        rows = s.execute(
            select(HealthSample.at, HealthSample.seq, HealthSample.data).where(
                HealthSample.gw == num, HealthSample.at >= lo, HealthSample.at <= hi
            )
        ).all()
        for at, seq, data in rows:
            by_seq.setdefault(seq, (at, seq, _flat(decode(data))))
        return sorted(by_seq.values(), key=lambda x: (x[0], x[1]))

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
        if any(astuple(result)):
            LOG.info("health retention", extra=asdict(result))
        return result

    def run_retention(self, now: datetime) -> MaintainResult:
        """Blocks and downsamples, then deletes what is past its retention (module doc)."""
        r = self.retention
        t = _epoch(now)
        raw_cut = _epoch(now - timedelta(days=r.raw_days)) // HOUR_S * HOUR_S
        hourly_cut = _epoch(now - timedelta(days=r.hourly_days))
        daily_cut = _epoch(now - timedelta(days=r.daily_days))
        with self.sessions() as s:
            due = s.execute(
                select(HealthSample.gw, (HealthSample.at // HOUR_S).label("hour"))
                .where(HealthSample.at < t // HOUR_S * HOUR_S)
                .group_by(HealthSample.gw, "hour")
            ).all()
        days: set[tuple[int, int]] = set()
        hours = 0
        for gw, hour in sorted(due):
            day = self._block_hour(gw, int(hour) * HOUR_S, raw_cut, hourly_cut)
            if day is not None:
                hours += 1
                days.add((gw, day))
        for gw, day in sorted(days):
            self._day(gw, day)
        with schema.write_lock(self._url), self.sessions.begin() as s:
            raw = s.execute(
                delete(HealthBlock).where(HealthBlock.tier == RAW, HealthBlock.start < raw_cut)
            )
            hourly = s.execute(
                delete(HealthBlock).where(
                    HealthBlock.tier == HOUR, HealthBlock.start + DAY_S <= hourly_cut
                )
            )
            daily = self._trim_days(s, daily_cut)
            events = s.execute(
                delete(HealthEventRow).where(
                    HealthEventRow.at < now - timedelta(days=r.events_days)
                )
            )
        return MaintainResult(
            hours,
            len(days),
            raw.rowcount,  # type: ignore[attr-defined]
            hourly.rowcount,  # type: ignore[attr-defined]
            daily,
            events.rowcount,  # type: ignore[attr-defined]
        )

    def _block_hour(self, gw: int, hour: int, raw_cut: int, hourly_cut: int) -> int | None:
        """Moves the gateway's raw rows of ``hour`` into its raw block (merged, once per
        seq) and writes the hour's bucket; the hour's day, None if nothing was written
        (rows too old for the hourly window, or past the raw one with the hour's bucket
        already written: those rows are dropped)."""
        day = hour // DAY_S * DAY_S
        with schema.write_lock(self._url), self.sessions.begin() as s:
            rows = s.execute(
                select(HealthSample.seq, HealthSample.at, HealthSample.data).where(
                    HealthSample.gw == gw,
                    HealthSample.at >= hour,
                    HealthSample.at < hour + HOUR_S,
                )
            ).all()
            s.execute(
                delete(HealthSample).where(
                    HealthSample.gw == gw, HealthSample.seq.in_([seq for seq, _a, _d in rows])
                )
            )
            if hour + HOUR_S <= hourly_cut:
                return None
            hours = _get(s, gw, HOUR, day)
            have = hours is not None and hour in hours.at
            if hour < raw_cut and have:
                return None
            raw = _get(s, gw, RAW, hour)
            by_seq = {x[1]: x for x in (_samples(raw) if raw is not None else [])}
            for seq, at, data in rows:
                by_seq.setdefault(seq, (at, seq, _flat(decode(data))))
            samples = sorted(by_seq.values(), key=lambda x: (x[0], x[1]))
            if hour >= raw_cut:
                _put(s, gw, RAW, hour, _samples_block(samples))
            buckets = {b.start: b for b in (_buckets(hours) if hours is not None else [])}
            buckets[hour] = _aggregate(hour, samples)
            _put(s, gw, HOUR, day, _buckets_block(buckets))
        return day

    def _day(self, gw: int, day: int) -> None:
        """(Re)writes the day's bucket from its hours' (the day so far)."""
        start = day // SPAN[DAY] * SPAN[DAY]
        with schema.write_lock(self._url), self.sessions.begin() as s:
            hours = _get(s, gw, HOUR, day)
            if hours is None:
                return
            days = _get(s, gw, DAY, start)
            buckets = {b.start: b for b in (_buckets(days) if days is not None else [])}
            buckets[day] = _combine(day, _buckets(hours))
            _put(s, gw, DAY, start, _buckets_block(buckets))

    def _trim_days(self, s: Session, cut: int) -> int:
        """Deletes the daily buckets of days that ended before ``cut``; how many."""
        gone = 0
        rows = s.execute(
            select(HealthBlock.gw, HealthBlock.start, HealthBlock.data).where(
                HealthBlock.tier == DAY, HealthBlock.start < cut
            )
        ).all()
        for gw, start, data in rows:
            buckets = _buckets(decode_block(data))
            keep = {b.start: b for b in buckets if b.start + DAY_S > cut}
            gone += len(buckets) - len(keep)
            if not keep:
                s.execute(
                    delete(HealthBlock).where(
                        HealthBlock.gw == gw, HealthBlock.tier == DAY, HealthBlock.start == start
                    )
                )
            elif len(keep) < len(buckets):
                _put(s, gw, DAY, start, _buckets_block(keep))
        return gone


# A sample: (at, seq, {(scope, metric): value}); scope "" is the gateway's, else a volume's.
Sample = tuple[int, int, dict[tuple[str, str], float]]
Stats = dict[str, float]


@dataclass(slots=True)
class Bucket:
    """An hour's or a day's aggregates: per (scope, metric), a gauge's min, max, sum and n
    or a counter's first, last, inc (increase, resets handled) and n; ``t0``/``t1``: the
    first and last sample's times."""

    start: int
    samples: int
    t0: int
    t1: int
    stats: dict[tuple[str, str], Stats]


def is_counter(metric: str) -> bool:
    """Whether the metric is a running total (sgw.common.health: ``_total``)."""
    return metric.endswith("_total")


def increase(prev: float, value: float) -> float:
    """A counter's increase from ``prev`` to ``value``: a fall is a reset (the gateway's
    process restarted and counts from 0), after which it grew by ``value``."""
    return value - prev if value >= prev else value


def _aggregate(start: int, samples: Sequence[Sample]) -> Bucket:
    series: dict[tuple[str, str], list[float]] = {}
    for _at, _seq, values in samples:
        for key, v in values.items():
            series.setdefault(key, []).append(v)
    stats: dict[tuple[str, str], Stats] = {}
    for key, xs in series.items():
        if is_counter(key[1]):
            inc = math.fsum(increase(a, b) for a, b in pairwise(xs))
            stats[key] = {"first": xs[0], "last": xs[-1], "inc": inc, "n": len(xs)}
        else:
            stats[key] = {"min": min(xs), "max": max(xs), "sum": math.fsum(xs), "n": len(xs)}
    return Bucket(start, len(samples), samples[0][0], samples[-1][0], stats)


def _combine(start: int, buckets: Sequence[Bucket]) -> Bucket:
    """One bucket of consecutive ones (oldest first): what ``_aggregate`` gives of all
    their samples."""
    stats: dict[tuple[str, str], Stats] = {}
    for b in buckets:
        for key, x in b.stats.items():
            y = stats.get(key)
            if y is None:
                stats[key] = dict(x)
            elif is_counter(key[1]):
                y["inc"] = math.fsum((y["inc"], increase(y["last"], x["first"]), x["inc"]))
                y["last"] = x["last"]
                y["n"] += x["n"]
            else:
                y["min"] = min(y["min"], x["min"])
                y["max"] = max(y["max"], x["max"])
                y["sum"] = math.fsum((y["sum"], x["sum"]))
                y["n"] += x["n"]
    return Bucket(start, sum(b.samples for b in buckets), buckets[0].t0, buckets[-1].t1, stats)


def _samples_block(samples: Sequence[Sample]) -> Block:
    keys = sorted({key for _a, _s, values in samples for key in values})
    return Block(
        at=[x[0] for x in samples],
        ints={"seq": [x[1] for x in samples]},
        cols={(sc, m, "v"): [x[2].get((sc, m)) for x in samples] for sc, m in keys},
    )


def _samples(block: Block) -> list[Sample]:
    out: list[Sample] = [(at, seq, {}) for at, seq in zip(block.at, block.ints["seq"], strict=True)]
    for (scope, metric, _stat), values in block.cols.items():
        for x, v in zip(out, values, strict=True):
            if v is not None:
                x[2][(scope, metric)] = v
    return out


def _buckets_block(buckets: dict[int, Bucket]) -> Block:
    rows = [buckets[k] for k in sorted(buckets)]
    names = sorted({(key, stat) for b in rows for key, x in b.stats.items() for stat in x})
    return Block(
        at=[b.start for b in rows],
        ints={
            "samples": [b.samples for b in rows],
            "t0": [b.t0 - b.start for b in rows],
            "t1": [b.t1 - b.start for b in rows],
        },
        cols={
            (key[0], key[1], stat): [b.stats.get(key, {}).get(stat) for b in rows]
            for key, stat in names
        },
    )


def _buckets(block: Block) -> list[Bucket]:
    out = [
        Bucket(start, n, start + t0, start + t1, {})
        for start, n, t0, t1 in zip(
            block.at, block.ints["samples"], block.ints["t0"], block.ints["t1"], strict=True
        )
    ]
    for (scope, metric, stat), values in block.cols.items():
        for b, v in zip(out, values, strict=True):
            if v is not None:
                b.stats.setdefault((scope, metric), {})[stat] = v
    return out


def _raw_points(samples: Sequence[Sample], key: tuple[str, str]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    prev: Sample | None = None
    for x in samples:
        point: dict[str, Any] = {"at": _time(x[0]), "value": x[2][key]}
        if is_counter(key[1]):
            dt = x[0] - prev[0] if prev is not None else 0
            point["rate"] = (
                increase(prev[2][key], x[2][key]) / dt if prev is not None and dt > 0 else None
            )
        points.append(point)
        prev = x
    return points


def _bucket_point(b: Bucket, key: tuple[str, str]) -> dict[str, Any]:
    x = b.stats[key]
    if is_counter(key[1]):
        span = b.t1 - b.t0
        return {
            "at": _time(b.start),
            "last": x["last"],
            "rate": x["inc"] / span if span > 0 else None,
            "samples": int(x["n"]),
        }
    return {
        "at": _time(b.start),
        "min": x["min"],
        "max": x["max"],
        "mean": x["sum"] / x["n"],
        "samples": int(x["n"]),
    }


def _get(s: Session, gw: int, tier: int, start: int) -> Block | None:
    data = s.scalar(
        select(HealthBlock.data).where(
            HealthBlock.gw == gw, HealthBlock.tier == tier, HealthBlock.start == start
        )
    )
    return None if data is None else decode_block(data)


def _put(s: Session, gw: int, tier: int, start: int, block: Block) -> None:
    data = encode_block(block)
    ins = schema.upsert_insert(s.get_bind().dialect.name)
    s.execute(
        ins(HealthBlock)
        .values(gw=gw, tier=tier, start=start, data=data)
        .on_conflict_do_update(index_elements=["gw", "tier", "start"], set_={"data": data})
    )


def _flat(doc: dict[str, Any]) -> dict[tuple[str, str], float]:
    out = {("", name): float(v) for name, v in doc.get("g", {}).items()}
    for vol, metrics in doc.get("v", {}).items():
        out.update({(vol, name): float(v) for name, v in metrics.items()})
    return out


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


def _epoch(t: datetime) -> int:
    return int(t.timestamp())


def _time(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
