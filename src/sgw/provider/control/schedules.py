"""Snapshot schedules, run by every control server (``sgw provider serve``).

When: a schedule's slots are the hours ``h`` of its gateway's local day (IANA time zone;
UTC without one) with ``h = start_hour + k * recurrence_hours`` (mod 24), at minute 0:
the same hours every day, since every recurrence divides 24 (start 5, every 8: 05:00,
13:00, 21:00). Local times become UTC instants: an hour that a DST change skips has no
slot that day, one that it repeats has a slot at its first occurrence only. At start and
every ``TICK_S`` each server looks for due schedules: a slot is due when it is not in the
future and later than the schedule's ``updated`` (a schedule set at 10:30 first fires at
its next slot). Only the latest due slot fires; those missed while no server ran are not
replayed.

Firing posts a ``snapshot`` command to the volume's gateway under the idempotency key
``schedule:{volume_id}:{slot in UTC, ISO 8601}``: however many servers fire a slot, the
database holds one command and the gateway runs it once. The command waits in the queue
while the gateway is offline, for one recurrence period (at most ``MAX_TTL_S``).

Retention: a finished scheduled command (its key, and the snapshot id in its result)
marks its snapshot's row with the slot (``Snapshot.scheduled_for``), which outlives the
command's record (finished commands are purged after a week); then the volume's oldest
marked snapshots beyond the schedule's ``retain`` are deleted. Snapshots taken by hand
are never marked, so never counted nor deleted. The marking is the follow-up of the
command on the server that records its reply, and is done again for the volume's recent
scheduled commands whenever its schedule fires (should that server have died in
between). Both are idempotent; a snapshot another server deleted first is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.commands import SnapshotArgs
from sgw.common.errors import NotFoundError, SgwError
from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.store import SUCCEEDED, MessageInfo
from sgw.provider.db.models import (
    Gateway,
    GatewayStatus,
    Snapshot,
    SnapshotSchedule,
    Volume,
    utcnow,
)

LOG = logging.getLogger(__name__)

# How often each server looks for due schedules (seconds).
TICK_S = 30.0
# Idempotency keys of scheduled snapshots start with this; admins may not use it.
KEY_PREFIX = "schedule:"
DEFAULT_DESCRIPTION = "scheduled snapshot"
# Longest a scheduled snapshot waits for an offline gateway (seconds).
MAX_TTL_S = 4 * 3600.0
# A volume's newest scheduled commands looked at again when its schedule fires.
_RECHECK = 8
# How far back the latest slot is looked for: past the longest gap between slots (a day
# whose only slot a DST change skipped).
_LOOKBACK = timedelta(days=4)
# Commands posted at once by a pass (the hub writes them in groups).
_BATCH = 64


def latest_slot(
    start_hour: int, recurrence_hours: int, zone: tzinfo, after: datetime, now: datetime
) -> datetime | None:
    """The schedule's latest slot in ``(after, now]`` as a UTC instant, or None."""
    local = now.astimezone(zone).replace(tzinfo=None, fold=0)
    hour = local.replace(minute=0, second=0, microsecond=0)
    wall = hour - timedelta(hours=(local.hour - start_hour) % recurrence_hours)
    step = timedelta(hours=recurrence_hours)
    while wall >= local - _LOOKBACK:
        slot = instant(wall, zone)
        if slot is not None and slot <= now:
            return slot if slot > after else None
        wall -= step
    return None


def instant(wall: datetime, zone: tzinfo) -> datetime | None:
    """The UTC instant of a naive local wall-clock time: the first if a DST change repeats
    it, None if one skips it."""
    utc = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if utc.astimezone(zone).replace(tzinfo=None) != wall:
        return None
    return utc


@functools.lru_cache(maxsize=1024)
def zone_of(name: str | None) -> tzinfo:
    """A gateway's time zone (UTC if it has none, or an unknown one: logged once)."""
    if not name:
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        LOG.warning("unknown time zone %r: its gateways' schedules run in UTC", name)
        return UTC


def schedule_key(volume_id: str, slot: datetime) -> str:
    """The idempotency key of a volume's scheduled snapshot for ``slot``."""
    return f"{KEY_PREFIX}{volume_id}:{slot.astimezone(UTC).isoformat()}"


def parse_key(key: str) -> tuple[str, datetime] | None:
    """(volume id, slot) of a scheduled snapshot's key; None for any other key."""
    if not key.startswith(KEY_PREFIX):
        return None
    volume_id, sep, slot = key[len(KEY_PREFIX) :].partition(":")
    try:
        when = datetime.fromisoformat(slot)
    except ValueError:
        return None
    if not sep or not volume_id or when.tzinfo is None:
        return None
    return volume_id, when.astimezone(UTC)


def taken_snapshot(status: str, result: dict[str, Any] | None) -> str | None:
    """The snapshot a finished ``snapshot`` command made, if the provider holds it."""
    if status != SUCCEEDED or not isinstance(result, dict):
        return None
    snapshot_id = result.get("snapshot_id")
    if result.get("state") != "COMPLETED" or not isinstance(snapshot_id, str):
        return None
    return snapshot_id


@dataclass(frozen=True, slots=True)
class Due:
    """A schedule's slot to fire."""

    volume_id: str
    account_id: str
    gateway_id: str
    volume: str  # its name on the gateway
    description: str
    slot: datetime
    recurrence_hours: int

    @property
    def key(self) -> str:
        return schedule_key(self.volume_id, self.slot)

    @property
    def ttl_s(self) -> float:
        return min(self.recurrence_hours * 3600.0, MAX_TTL_S)

    def args(self) -> dict[str, Any]:
        """The gateway's ``snapshot`` command (as ``CommandPlanner`` prepares one)."""
        snapshot = SnapshotArgs(
            volume=self.volume, volume_id=self.volume_id, description=self.description, wait=True
        )
        return snapshot.to_args()


class SnapshotScheduler:
    """Fires due snapshot schedules and applies their retention (module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        maps: ChunkMaps,
        hub: ControlHub,
        *,
        tick_s: float = TICK_S,
    ) -> None:
        self._sessions = sessions
        self._maps = maps
        self._hub = hub
        self.tick_s = tick_s
        self._fired: dict[str, datetime] = {}  # volume -> the last slot this server posted
        self._unbound: set[str] = set()  # volumes on no usable gateway (logged once)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the loop (its first pass at once)."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="snapshot-schedules")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                LOG.warning("snapshot schedules: the pass failed, retried at the next: %s", exc)
            await asyncio.sleep(self.tick_s)

    async def run_once(self, now: datetime | None = None) -> list[MessageInfo]:
        """One pass: posts each schedule's due slot that this server has not posted yet;
        returns the commands (new, or posted before by another server). A slot that
        could not be posted is logged and tried again at the next pass."""
        due, scheduled = await asyncio.to_thread(self._due, now or utcnow())
        for gone in self._fired.keys() - scheduled:
            del self._fired[gone]
        todo = [d for d in due if self._fired.get(d.volume_id) != d.slot]
        posted: list[MessageInfo] = []
        for i in range(0, len(todo), _BATCH):
            batch = todo[i : i + _BATCH]
            outcomes = await asyncio.gather(*map(self._fire, batch), return_exceptions=True)
            for d, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, MessageInfo):
                    posted.append(outcome)
                elif isinstance(outcome, BaseException):
                    LOG.warning(
                        "scheduled snapshot not requested, tried again at the next pass: %s",
                        outcome,
                        extra={"volume": d.volume_id, "slot": d.slot.isoformat()},
                    )
        return posted

    def _due(self, now: datetime) -> tuple[list[Due], set[str]]:
        """The due slots, and every volume with a schedule (blocking)."""
        query = (
            select(SnapshotSchedule, Volume.account_id, Volume.name, Gateway.id, Gateway.timezone)
            .join(Volume, Volume.id == SnapshotSchedule.volume_id)
            .outerjoin(
                Gateway,
                (Gateway.id == Volume.gateway_id) & (Gateway.status == GatewayStatus.ACTIVE.value),
            )
        )
        with self._sessions() as s:
            rows = s.execute(query).all()
        due: list[Due] = []
        for schedule, account_id, name, gateway_id, timezone in rows:
            if gateway_id is None:
                self._note_unbound(schedule.volume_id)
                continue
            self._unbound.discard(schedule.volume_id)
            slot = latest_slot(
                schedule.start_hour,
                schedule.recurrence_hours,
                zone_of(timezone),
                schedule.updated,
                now,
            )
            if slot is not None:
                description = schedule.description or DEFAULT_DESCRIPTION
                due.append(
                    Due(
                        schedule.volume_id,
                        account_id,
                        gateway_id,
                        name,
                        description,
                        slot,
                        schedule.recurrence_hours,
                    )
                )
        scheduled = {schedule.volume_id for schedule, *_rest in rows}
        self._unbound &= scheduled
        return due, scheduled

    def _note_unbound(self, volume_id: str) -> None:
        if volume_id not in self._unbound:
            self._unbound.add(volume_id)
            LOG.debug(
                "snapshot schedule skipped: the volume is on no active gateway",
                extra={"volume": volume_id},
            )

    async def _fire(self, d: Due) -> MessageInfo | None:
        """Posts the slot's command (refused for good: logged, not tried again), then
        marks and prunes what the volume's earlier scheduled commands left."""
        try:
            info, new = await self._hub.post(
                d.account_id,
                d.gateway_id,
                "snapshot",
                d.args(),
                idempotency_key=d.key,
                ttl_s=d.ttl_s,
                require_online=False,
            )
        except SgwError as exc:  # the key was used otherwise, or the gateway is gone
            self._fired[d.volume_id] = d.slot
            LOG.warning(
                "scheduled snapshot refused: %s",
                exc,
                extra={"volume": d.volume_id, "gateway": d.gateway_id, "slot": d.slot.isoformat()},
            )
            return None
        self._fired[d.volume_id] = d.slot
        LOG.info(
            "scheduled snapshot requested",
            extra={
                "volume": d.volume_id,
                "gateway": d.gateway_id,
                "slot": d.slot.isoformat(),
                "command": info.id,
                "new": new,
            },
        )
        try:
            await asyncio.to_thread(self._recheck, d)
        except Exception as exc:
            LOG.warning(
                "scheduled snapshots: retention failed: %s", exc, extra={"volume": d.volume_id}
            )
        return info

    async def follow_up(self, info: MessageInfo) -> None:
        """After a scheduled ``snapshot`` command finished: marks its snapshot and applies
        the schedule's retention; a failed one is logged."""
        parsed = parse_key(info.idempotency_key)
        if info.type != "snapshot" or parsed is None:
            return
        volume_id, slot = parsed
        snapshot_id = taken_snapshot(info.status, info.result)
        if snapshot_id is None:
            LOG.warning(
                "scheduled snapshot failed",
                extra={
                    "volume": volume_id,
                    "slot": slot.isoformat(),
                    "command": info.id,
                    "status": info.status,
                    "error": info.error or (info.result or {}).get("error"),
                },
            )
            return
        deleted = await asyncio.to_thread(
            self._settle, info.account_id, volume_id, [(snapshot_id, slot)]
        )
        LOG.info(
            "scheduled snapshot taken",
            extra={
                "volume": volume_id,
                "snapshot": snapshot_id,
                "slot": slot.isoformat(),
                "deleted": deleted,
            },
        )

    def _recheck(self, d: Due) -> list[str]:
        """``_settle`` for the volume's newest scheduled commands that succeeded."""
        infos = self._hub.store.newest_under_prefix(
            d.gateway_id, f"{KEY_PREFIX}{d.volume_id}:", "snapshot", SUCCEEDED, _RECHECK
        )
        taken = []
        for info in infos:
            parsed = parse_key(info.idempotency_key)
            snapshot_id = taken_snapshot(info.status, info.result)
            if parsed is not None and parsed[0] == d.volume_id and snapshot_id is not None:
                taken.append((snapshot_id, parsed[1]))
        return self._settle(d.account_id, d.volume_id, taken)

    def _settle(
        self, account_id: str, volume_id: str, taken: Iterable[tuple[str, datetime]]
    ) -> list[str]:
        """Marks these snapshots of the volume as scheduled (for their slots), then deletes
        its oldest scheduled snapshots beyond the schedule's ``retain``; returns those this
        call deleted (blocking)."""
        with self._sessions.begin() as s:
            for snapshot_id, slot in taken:
                s.execute(
                    update(Snapshot)
                    .where(
                        Snapshot.id == snapshot_id,
                        Snapshot.volume_id == volume_id,
                        Snapshot.account_id == account_id,
                        Snapshot.scheduled_for.is_(None),
                    )
                    .values(scheduled_for=slot)
                    .execution_options(synchronize_session=False)
                )
        return self._prune(volume_id)

    def _prune(self, volume_id: str) -> list[str]:
        with self._sessions() as s:
            retain = s.scalar(
                select(SnapshotSchedule.retain).where(SnapshotSchedule.volume_id == volume_id)
            )
            if retain is None:
                return []
            surplus = list(
                s.scalars(
                    select(Snapshot.id)
                    .where(Snapshot.volume_id == volume_id, Snapshot.scheduled_for.is_not(None))
                    .order_by(
                        Snapshot.scheduled_for.desc(), Snapshot.created.desc(), Snapshot.id.desc()
                    )
                    .offset(retain)
                )
            )
        deleted = []
        for snapshot_id in surplus:
            try:
                self._maps.delete_snapshot(snapshot_id)
            except NotFoundError:
                continue  # deleted meanwhile (another server, an admin)
            deleted.append(snapshot_id)
        return deleted
