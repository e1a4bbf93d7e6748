"""Rollouts: a published release handed out to the fleet in phases, halted by itself when
the fleet shows it is bad (docs/updates.md, "Rollouts").

Phases: 1, the gateways on the canary channel; 2, ``share`` percent of the others, chosen
by a stable hash of the gateway's id (the same gateways go early in every rollout); 3,
everyone. A gateway is handed the release (``sgw.provider.updates.service`` answers its
plan) once the rollout's phase reached the gateway's. A phase advances when every gateway
in it that takes the release on its own (its policy's ``automatic`` is ``all``, or the
release is an emergency one) runs it, and ``soak_s`` passed since the last of them
reported its swap done and the phase began. Gateways that take it only when told (``sgw
updates now``) are not waited for.

It halts by itself on either signal, in any phase reached so far:

- failed swaps: ``max_failures`` gateways (1 by default) reported ``failed`` for the
  release since the rollout began;
- missed heartbeats: a gateway that reported the swap done has not been heard from
  (``gateways.last_seen``, which the control channel keeps, or the done report itself)
  for ``heartbeat_timeout_s`` since.

A third signal comes from the fleet's health analysis (the health issue's cohort alerts):
it calls ``Rollouts.halt(reason)``, which halts the running rollout with that reason, as
``sgw updates halt`` does. A halted rollout hands out nothing more: the plan of a gateway
that has not swapped yet says to stay where it is. ``resume`` runs it again from the
phase it halted in (the failures counted so far then count from the resumption).

Every provider process evaluates the running rollout every ``TICK_S`` and after each
report it takes in. Each step (next phase, completed, halted) is a conditional update of
the rollout's row (``WHERE state = 'running' AND phase = p``), so however many processes
see it at once, it happens once, and only the process whose update took logs it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from packaging.version import InvalidVersion, Version
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError, NotFoundError
from sgw.provider.db.models import (
    Gateway,
    GatewayStatus,
    GatewayUpdate,
    Release,
    Rollout,
    UpdateReport,
    utcnow,
)
from sgw.provider.db.periodic import Periodic
from sgw.provider.updates.policy import Policy, effective_policies

LOG = logging.getLogger(__name__)

# How often each provider process evaluates the running rollout (seconds).
TICK_S = 15.0
DEFAULT_SHARE = 10
DEFAULT_SOAK_S = 60 * 60.0
DEFAULT_MAX_FAILURES = 1
# A gateway silent this long after its swap halts the rollout (seconds). Last-seen times
# are written at most once a minute (sgw.provider.management.gateways), so anything below
# MIN_HEARTBEAT_TIMEOUT_S would see healthy gateways as silent.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10 * 60.0
MIN_HEARTBEAT_TIMEOUT_S = 2 * 60.0
LAST_PHASE = 3
RUNNING, HALTED, COMPLETED, SUPERSEDED = "running", "halted", "completed", "superseded"


@dataclass(frozen=True, slots=True)
class RolloutInfo:
    id: str
    version: str
    severity: str
    channel: str
    state: str
    phase: int
    phase_started: datetime
    share: int
    soak_s: float
    max_failures: int
    heartbeat_timeout_s: float
    halt_reason: str | None
    halted: datetime | None
    started: datetime
    completed: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "severity": self.severity,
            "channel": self.channel,
            "state": self.state,
            "phase": self.phase,
            "phase_started": self.phase_started,
            "share": self.share,
            "soak_minutes": self.soak_s / 60,
            "max_failures": self.max_failures,
            "heartbeat_timeout_minutes": self.heartbeat_timeout_s / 60,
            "halt_reason": self.halt_reason,
            "halted": self.halted,
            "started": self.started,
            "completed": self.completed,
        }


def bucket(gateway_id: str) -> int:
    """The gateway's place in 0..99 for phase 2's share: a stable hash of its id."""
    return int.from_bytes(hashlib.sha256(gateway_id.encode()).digest()[:8], "big") % 100


def phase_of(gateway_id: str, policy: Policy, share: int) -> int:
    """The phase in which a rollout reaches the gateway."""
    if policy.channel == "canary":
        return 1
    return 2 if bucket(gateway_id) < share else 3


def at_least(running: str | None, version: str) -> bool:
    """True if ``running`` is ``version`` or newer (PEP 440; unparsable: equal only)."""
    if running is None:
        return False
    if running == version:
        return True
    try:
        return Version(running) > Version(version)
    except InvalidVersion:
        return False


def newer(a: str, b: str) -> bool:
    """True if release ``a`` is newer than ``b`` (PEP 440; unparsable: never)."""
    try:
        return Version(a) > Version(b)
    except InvalidVersion:
        return False


class Rollouts:
    """Starts, evaluates, halts and resumes rollouts (blocking: run in worker threads)."""

    def __init__(
        self, sessions: sessionmaker[Session], clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._sessions = sessions
        self._clock = clock

    # The operator's calls

    def start(
        self,
        version: str,
        *,
        share: int = DEFAULT_SHARE,
        soak_s: float = DEFAULT_SOAK_S,
        max_failures: int = DEFAULT_MAX_FAILURES,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ) -> RolloutInfo:
        """Starts a rollout of a published release; a rollout running or halted before is
        superseded (it hands out nothing more)."""
        if not 0 <= share <= 100:
            raise BadRequestError(f"share {share}: give a percentage of the fleet, 0..100")
        if soak_s < 0:
            raise BadRequestError(f"soak {soak_s / 60:g} minutes: give 0 or more")
        if max_failures < 1:
            raise BadRequestError(f"max failures {max_failures}: give 1 or more")
        if heartbeat_timeout_s < MIN_HEARTBEAT_TIMEOUT_S:
            raise BadRequestError(
                f"heartbeat timeout {heartbeat_timeout_s / 60:g} minutes: give at least "
                f"{MIN_HEARTBEAT_TIMEOUT_S / 60:g} (gateways' last-seen times are written "
                "once a minute)"
            )
        now = self._clock()
        with self._sessions.begin() as s:
            release = s.get(Release, version)
            if release is None:
                raise NotFoundError(
                    f"release {version!r} is not published here: publish it with "
                    "`sgw releases publish BUNDLE` (`sgw releases list` shows what is)"
                )
            if release.revoked is not None:
                raise BadRequestError(
                    f"release {version} is revoked: publish a new release and roll that out"
                )
            s.execute(
                update(Rollout)
                .where(Rollout.state.in_((RUNNING, HALTED)))
                .values(state=SUPERSEDED, updated=now)
            )
            row = Rollout(
                id=str(uuid.uuid4()),
                version=version,
                state=RUNNING,
                phase=1,
                phase_started=now,
                share=share,
                soak_s=float(soak_s),
                max_failures=max_failures,
                heartbeat_timeout_s=float(heartbeat_timeout_s),
                started=now,
                updated=now,
            )
            s.add(row)
            s.flush()
            info = _info(row, release)
        LOG.info("rollout started", extra={"rollout": info.id, "version": version})
        return info

    def halt(self, reason: str, version: str | None = None) -> list[RolloutInfo]:
        """Halts the running rollout (of ``version``, if given) with ``reason``: what
        ``sgw updates halt`` does, and what the fleet's health analysis calls when a
        cohort of gateways on the new release alerts. Returns the rollouts it halted (none
        when none ran)."""
        now = self._clock()
        query = select(Rollout.id).where(Rollout.state == RUNNING)
        if version is not None:
            query = query.where(Rollout.version == version)
        with self._sessions() as s:
            ids = list(s.scalars(query))
        halted = [i for i in ids if self._halt(i, None, reason, now)]
        return [self.get(i) for i in halted]

    def resume(self, version: str | None = None) -> RolloutInfo:
        """Runs a halted rollout again from its phase (the newest one without ``version``)."""
        now = self._clock()
        info = self._pick(version, (HALTED,), "halted")
        with self._sessions.begin() as s:
            done = s.execute(
                update(Rollout)
                .where(Rollout.id == info.id, Rollout.state == HALTED)
                .values(
                    state=RUNNING,
                    started=now,
                    phase_started=now,
                    halt_reason=None,
                    halted=None,
                    updated=now,
                )
                .execution_options(synchronize_session=False)
            )
        if done.rowcount:  # type: ignore[attr-defined]
            LOG.info("rollout resumed", extra={"rollout": info.id, "version": info.version})
        return self.get(info.id)

    def stop(self, version: str | None, reason: str) -> RolloutInfo:
        """``sgw updates halt``: halts the running rollout (of ``version``)."""
        info = self._pick(version, (RUNNING,), "running")
        self._halt(info.id, None, reason, self._clock())
        return self.get(info.id)

    def get(self, rollout_id: str) -> RolloutInfo:
        with self._sessions() as s:
            row = s.get(Rollout, rollout_id)
            if row is None:
                raise NotFoundError(f"rollout {rollout_id} not found")
            return _info(row, s.get(Release, row.version))

    def recent(self, limit: int = 20) -> list[RolloutInfo]:
        """The newest rollouts, newest first."""
        with self._sessions() as s:
            rows = s.execute(
                select(Rollout, Release)
                .join(Release, Release.version == Rollout.version)
                .order_by(Rollout.started.desc())
                .limit(limit)
            ).all()
            return [_info(r, rel) for r, rel in rows]

    def current(self, s: Session) -> tuple[Rollout, Release] | None:
        """The rollout that decides what gateways run: the newest one not superseded."""
        row = s.execute(
            select(Rollout, Release)
            .join(Release, Release.version == Rollout.version)
            .where(Rollout.state != SUPERSEDED)
            .order_by(Rollout.started.desc())
            .limit(1)
        ).first()
        return None if row is None else (row[0], row[1])

    def _pick(self, version: str | None, states: tuple[str, ...], what: str) -> RolloutInfo:
        with self._sessions() as s:
            query = select(Rollout.id).where(Rollout.state.in_(states))
            if version is not None:
                query = query.where(Rollout.version == version)
            rollout_id = s.scalar(query.order_by(Rollout.started.desc()).limit(1))
        if rollout_id is None:
            of = f" of release {version}" if version else ""
            raise NotFoundError(f"no {what} rollout{of}: `sgw updates status` lists the rollouts")
        return self.get(rollout_id)

    # Evaluation

    def evaluate(self, now: datetime | None = None) -> list[str]:
        """Takes every step the running rollout is due for (halt, next phase, completed);
        returns what this call did, for the log and the tests."""
        now = now or self._clock()
        steps: list[str] = []
        for _ in range(LAST_PHASE + 1):
            step = self._step(now)
            if step is None:
                break
            steps.append(step)
        return steps

    def _step(self, now: datetime) -> str | None:
        with self._sessions() as s:
            row = s.execute(
                select(Rollout, Release)
                .join(Release, Release.version == Rollout.version)
                .where(Rollout.state == RUNNING)
                .order_by(Rollout.started.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            rollout, release = row[0], row[1]
            if release.revoked is not None:
                revoked = f"release {release.version} was revoked"
                return self._halt(rollout.id, rollout.phase, revoked, now)
            members = self._members(s, rollout)
            reason = self._halt_reason(s, rollout, members, now)
            if reason is not None:
                return self._halt(rollout.id, rollout.phase, reason, now)
            waited = [m for m in members if m.phase == rollout.phase and m.waited(release)]
            if not all(at_least(m.running, rollout.version) for m in waited):
                return None
            since = max([rollout.phase_started, *(m.done for m in waited if m.done)])
            if now - since < timedelta(seconds=rollout.soak_s):
                return None
            return self._advance(rollout, now)

    def _members(self, s: Session, rollout: Rollout) -> list[_Member]:
        """The active gateways in the phases the rollout reached, with what they reported."""
        gateways = list(
            s.scalars(select(Gateway).where(Gateway.status == GatewayStatus.ACTIVE.value))
        )
        policies = effective_policies(s, gateways)
        states = {
            u.gateway_id: u
            for u in s.scalars(
                select(GatewayUpdate).where(GatewayUpdate.gateway_id.in_([g.id for g in gateways]))
            )
        }
        done = dict(
            s.execute(
                select(UpdateReport.gateway_id, func.max(UpdateReport.received))
                .where(UpdateReport.version == rollout.version, UpdateReport.state == "done")
                .group_by(UpdateReport.gateway_id)
            ).all()
        )
        members = []
        for g in gateways:
            phase = phase_of(g.id, policies[g.id], rollout.share)
            if phase > rollout.phase:
                continue
            state = states.get(g.id)
            members.append(
                _Member(
                    g.id,
                    g.name,
                    phase,
                    policies[g.id],
                    state.running if state else None,
                    state.now_version if state else None,
                    done.get(g.id),
                    g.last_seen,
                )
            )
        return members

    def _halt_reason(
        self, s: Session, rollout: Rollout, members: list[_Member], now: datetime
    ) -> str | None:
        names = {m.gateway_id: m.name for m in members}
        failed = sorted(
            set(
                s.scalars(
                    select(UpdateReport.gateway_id).where(
                        UpdateReport.version == rollout.version,
                        UpdateReport.state == "failed",
                        UpdateReport.received >= rollout.started,
                        UpdateReport.gateway_id.in_(list(names)),
                    )
                )
            )
        )
        if len(failed) >= rollout.max_failures:
            who = ", ".join(f"{names[g]} ({g})" for g in failed[:5])
            return (
                f"{len(failed)} gateway(s) failed their swap to {rollout.version} "
                f"(threshold {rollout.max_failures}): {who}"
            )
        limit = timedelta(seconds=rollout.heartbeat_timeout_s)
        for m in members:
            if m.done is None or not at_least(m.running, rollout.version):
                continue
            heard = max(m.done, m.last_seen) if m.last_seen else m.done
            if now - heard > limit:
                return (
                    f"gateway {m.name} ({m.gateway_id}) has not been heard from since "
                    f"{heard.isoformat(timespec='seconds')}, after its swap to "
                    f"{rollout.version} (heartbeat timeout "
                    f"{rollout.heartbeat_timeout_s / 60:g} minutes)"
                )
        return None

    def _halt(self, rollout_id: str, phase: int | None, reason: str, now: datetime) -> str | None:
        where = [Rollout.id == rollout_id, Rollout.state == RUNNING]
        if phase is not None:
            where.append(Rollout.phase == phase)
        with self._sessions.begin() as s:
            done = s.execute(
                update(Rollout)
                .where(*where)
                .values(state=HALTED, halt_reason=reason, halted=now, updated=now)
                .execution_options(synchronize_session=False)
            )
        if not done.rowcount:  # type: ignore[attr-defined]
            return None  # another process took a step first
        LOG.warning("rollout halted: %s", reason, extra={"rollout": rollout_id})
        return f"halted: {reason}"

    def _advance(self, rollout: Rollout, now: datetime) -> str | None:
        last = rollout.phase >= LAST_PHASE
        values: dict[str, Any] = (
            {"state": COMPLETED, "completed": now, "updated": now}
            if last
            else {"phase": rollout.phase + 1, "phase_started": now, "updated": now}
        )
        with self._sessions.begin() as s:
            done = s.execute(
                update(Rollout)
                .where(
                    Rollout.id == rollout.id,
                    Rollout.state == RUNNING,
                    Rollout.phase == rollout.phase,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        if not done.rowcount:  # type: ignore[attr-defined]
            return None
        step = "completed" if last else f"phase {rollout.phase + 1}"
        LOG.info("rollout %s", step, extra={"rollout": rollout.id, "version": rollout.version})
        return step


@dataclass(frozen=True, slots=True)
class _Member:
    gateway_id: str
    name: str
    phase: int
    policy: Policy
    running: str | None
    now_version: str | None
    done: datetime | None  # when its done report for the release arrived
    last_seen: datetime | None

    def waited(self, release: Release) -> bool:
        """True if the phase waits for it: it takes the release on its own, or was told."""
        return self.policy.takes(release.severity) or self.now_version == release.version


def _info(row: Rollout, release: Release | None) -> RolloutInfo:
    return RolloutInfo(
        id=row.id,
        version=row.version,
        severity=release.severity if release else "normal",
        channel=release.channel if release else "stable",
        state=row.state,
        phase=row.phase,
        phase_started=row.phase_started,
        share=row.share,
        soak_s=row.soak_s,
        max_failures=row.max_failures,
        heartbeat_timeout_s=row.heartbeat_timeout_s,
        halt_reason=row.halt_reason,
        halted=row.halted,
        started=row.started,
        completed=row.completed,
    )


class RolloutEvaluator(Periodic[list[str]]):
    """Evaluates the running rollout every ``tick_s`` in this provider process."""

    def __init__(self, rollouts: Rollouts, *, tick_s: float = TICK_S) -> None:
        super().__init__("rollouts", rollouts.evaluate, [], tick_s=tick_s)
        self.rollouts = rollouts
