"""What the provider tells each gateway about updates, and what it hears back.

- The plan (``GET /v1/updates/plan``, the gateway's update agent asks): which release the
  gateway should run, from the rollout and the gateway's policy, with the policy itself
  (channel, window, automatic, time zone) for the agent to enforce. ``version`` is the
  rollout's release once the rollout reached the gateway's phase (everyone's once it
  completed); the release an admin named with ``sgw updates now`` (and ``now`` true) until
  the gateway reports it done, failed or refused; else the version the gateway runs
  (null when it never reported): stay. A halted rollout hands out nothing more, and no
  plan names a release older than the one the gateway runs.
- Reports (``POST /v1/updates/reports``): each one kept once in the history (a report sent
  again, same gateway, version, state and time, is the same row); the newest by the
  gateway's time becomes its state, and the version it runs (the report's version once
  ``done``, else the one it swaps from).
- ``now``: marks the release the gateway should swap to at once; the API then sends the
  ``update`` command (``UpdateArgs(version, now=True)``) on the control channel, so the
  agent checks at once instead of at its next periodic check.
- Status: per gateway its running, planned and reported state, the swap's pause, its
  window's next opening; and the rollouts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError, NotFoundError
from sgw.common.maintenance import WindowError
from sgw.provider.db.models import (
    UPDATE_STATES,
    Gateway,
    GatewayStatus,
    GatewayUpdate,
    Release,
    UpdateReport,
    utcnow,
)
from sgw.provider.updates.policy import Policy, effective_policies
from sgw.provider.updates.rollouts import (
    COMPLETED,
    HALTED,
    RUNNING,
    Rollouts,
    at_least,
    newer,
    phase_of,
)

LOG = logging.getLogger(__name__)

# Reports that end an admin's ``now`` for their version.
_ENDS_NOW = ("done", "failed", "refused")
VERSION_MAX = 64


@dataclass(frozen=True, slots=True)
class Report:
    """One report of a gateway's update agent."""

    version: str
    from_version: str
    state: str
    reason: str | None
    pause_s: float | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    version: str | None
    severity: str | None
    now: bool
    policy: Policy
    timezone: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "severity": self.severity,
            "now": self.now,
            "channel": self.policy.channel,
            "automatic": self.policy.automatic,
            "timezone": self.timezone,
            "window": self.policy.window.to_json(),
        }


class Updates:
    """Plans, reports, ``now`` and status (blocking: run in worker threads)."""

    def __init__(self, sessions: sessionmaker[Session], rollouts: Rollouts) -> None:
        self._sessions = sessions
        self.rollouts = rollouts

    # The gateway's calls

    def plan(self, gateway_id: str) -> Plan:
        with self._sessions() as s:
            gateway = s.get(Gateway, gateway_id)
            if gateway is None:
                raise NotFoundError(f"gateway {gateway_id} not found")
            return self._plan(s, gateway)

    def record(self, gateway_id: str, report: Report) -> bool:
        """Keeps the report (False: it was kept before) and updates the gateway's state."""
        if report.state not in UPDATE_STATES:
            raise BadRequestError(f"state {report.state!r}: give one of {', '.join(UPDATE_STATES)}")
        for attempt in range(2):
            try:
                return self._record(gateway_id, report)
            except IntegrityError:
                # Another report of the gateway made its state row first: once more.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _record(self, gateway_id: str, report: Report) -> bool:
        received = utcnow()
        try:
            with self._sessions.begin() as s:
                s.add(
                    UpdateReport(
                        gateway_id=gateway_id,
                        version=report.version,
                        from_version=report.from_version,
                        state=report.state,
                        reason=report.reason,
                        pause_s=report.pause_s,
                        at=report.at,
                        received=received,
                    )
                )
                s.flush()
                self._apply(s, gateway_id, report, received)
        except IntegrityError:
            with self._sessions() as s:
                known = s.scalar(
                    select(UpdateReport.id).where(
                        UpdateReport.gateway_id == gateway_id,
                        UpdateReport.version == report.version,
                        UpdateReport.state == report.state,
                        UpdateReport.at == report.at,
                    )
                )
            if known is None:
                raise
            return False
        LOG.info(
            "update report",
            extra={
                "gateway": gateway_id,
                "version": report.version,
                "state": report.state,
                "reason": report.reason,
                "pause_s": report.pause_s,
            },
        )
        return True

    def _apply(self, s: Session, gateway_id: str, report: Report, received: datetime) -> None:
        state = s.get(GatewayUpdate, gateway_id)
        if state is None:
            state = GatewayUpdate(gateway_id=gateway_id)
            s.add(state)
        if report.state in _ENDS_NOW and state.now_version == report.version:
            state.now_version = None
            state.now_set = None
        if state.at is not None and report.at < state.at:
            return  # an older report sent late: history only
        state.version = report.version
        state.state = report.state
        state.reason = report.reason
        state.pause_s = report.pause_s if report.state == "done" else state.pause_s
        state.at = report.at
        state.received = received
        state.running = report.version if report.state == "done" else report.from_version

    # The admin's calls

    def mark_now(self, account_id: str, gateway_id: str) -> str:
        """Marks the release the gateway should swap to at once: its planned one, or the
        newest release of its channel when no rollout names one; returns that version."""
        with self._sessions.begin() as s:
            gateway = s.get(Gateway, gateway_id)
            if gateway is None or gateway.account_id != account_id:
                raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
            if gateway.status != GatewayStatus.ACTIVE.value:
                raise BadRequestError(f"gateway {gateway_id} is deactivated; it takes no updates")
            plan = self._plan(s, gateway, with_now=False)
            running = self._state(s, gateway_id).running
            version = plan.version if plan.version and plan.version != running else None
            if version is None:
                version = self._newest(s, plan.policy.channel, self._halted(s))
            if version is None:
                raise BadRequestError(
                    f"no release for the {plan.policy.channel} channel is published (or its "
                    "rollout is halted): publish one with `sgw releases publish BUNDLE`, or "
                    "`sgw updates resume` the halted rollout"
                )
            if running is not None and at_least(running, version):
                raise BadRequestError(
                    f"gateway {gateway.name} runs {running} already, the newest release for it; "
                    "nothing to update to"
                )
            state = self._state(s, gateway_id)
            if s.get(GatewayUpdate, gateway_id) is None:
                s.add(state)
            state.now_version = version
            state.now_set = utcnow()
        LOG.info("update now requested", extra={"gateway": gateway_id, "version": version})
        return version

    def status(self, account_id: str, gateway_id: str | None = None) -> dict[str, Any]:
        """Per gateway of the account (or the one): running, planned, reported; and the
        rollouts."""
        now = utcnow()
        with self._sessions() as s:
            query = select(Gateway).where(
                Gateway.account_id == account_id, Gateway.status == GatewayStatus.ACTIVE.value
            )
            if gateway_id is not None:
                query = query.where(Gateway.id == gateway_id)
            gateways = list(s.scalars(query.order_by(Gateway.created)))
            if gateway_id is not None and not gateways:
                raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
            rows = []
            for g in gateways:
                plan = self._plan(s, g)
                st = self._state(s, g.id)
                try:
                    opens: datetime | None = plan.policy.window.next_open(now, g.timezone)
                except WindowError:
                    opens = None
                rows.append(
                    {
                        "gateway_id": g.id,
                        "name": g.name,
                        "running": st.running,
                        "planned": plan.version,
                        "now": plan.now,
                        "state": st.state,
                        "version": st.version,
                        "reason": st.reason,
                        "last_report": st.at,
                        "pause_s": st.pause_s,
                        "channel": plan.policy.channel,
                        "automatic": plan.policy.automatic,
                        "window": str(plan.policy.window),
                        "timezone": g.timezone,
                        "next_window": opens,
                    }
                )
        return {
            "gateways": rows,
            "rollouts": [r.to_json() for r in self.rollouts.recent(limit=5)],
        }

    # The decision

    def _plan(self, s: Session, gateway: Gateway, *, with_now: bool = True) -> Plan:
        policy = effective_policies(s, [gateway])[gateway.id]
        state = self._state(s, gateway.id)
        running = state.running
        version: str | None = None
        now = False
        if with_now and state.now_version is not None:
            release = s.get(Release, state.now_version)
            if release is not None and release.revoked is None:
                version, now = release.version, True
        if version is None:
            version = self._from_rollout(s, gateway, policy)
        if version is None or (running is not None and newer(running, version)):
            version, now = running, False
        release = s.get(Release, version) if version else None
        return Plan(version, release.severity if release else None, now, policy, gateway.timezone)

    def _from_rollout(self, s: Session, gateway: Gateway, policy: Policy) -> str | None:
        current = self.rollouts.current(s)
        if current is None:
            return None
        rollout, release = current
        if release.revoked is not None or rollout.state == HALTED:
            return None
        if rollout.state == COMPLETED:
            return rollout.version
        if rollout.state == RUNNING and phase_of(gateway.id, policy, rollout.share) <= (
            rollout.phase
        ):
            return rollout.version
        return None

    @staticmethod
    def _state(s: Session, gateway_id: str) -> GatewayUpdate:
        state = s.get(GatewayUpdate, gateway_id)
        return state if state is not None else GatewayUpdate(gateway_id=gateway_id)

    def _halted(self, s: Session) -> str | None:
        """The release of the halted rollout, if the rollout in effect is halted."""
        current = self.rollouts.current(s)
        return current[0].version if current and current[0].state == HALTED else None

    @staticmethod
    def _newest(s: Session, channel: str, halted: str | None) -> str | None:
        """The newest release a gateway of ``channel`` takes (canary gateways take stable
        releases too), by PEP 440 order, else by publication; never a revoked one nor the
        release of a halted rollout."""
        channels = ("canary", "stable") if channel == "canary" else ("stable",)
        rows = [
            v
            for v in s.scalars(
                select(Release.version)
                .where(Release.channel.in_(channels), Release.revoked.is_(None))
                .order_by(Release.published.desc())
            )
            if v != halted
        ]
        best: str | None = None
        for version in rows:
            if best is None or newer(version, best):
                best = version
        return best
