"""Updates at the provider (sgw.provider.updates), through a real `sgw provider serve`
over HTTPS: update policies set with the CLI and read by gateways in their plan (signed
requests); rollouts across several simulated gateways (identities in this process that
sign their plan and report calls as the update agent does) through their phases, halted
by a failed swap and by a gateway silent after its swap, resumed; ``sgw updates now``
marks the release and sends an ``update`` command that a gateway's long-poll receives.

Releases are rows of the ``releases`` table written here as publishing leaves them (the
TUF side, part A of issue 17, is not what these tests are about).
"""

from __future__ import annotations

import json
import threading
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.provider.db import schema
from sgw.provider.db.models import Gateway, Release, UpdateReport
from sgw.provider.updates.rollouts import bucket
from tests.fixtures.management import FakeGateway, SecureProvider, activate, cli_json, new_account
from tests.fixtures.waiting import wait_for


@pytest.fixture
def db(secure_provider: SecureProvider) -> Iterator[sessionmaker[Session]]:
    engine: Engine = schema.make_engine(f"sqlite:///{secure_provider.data_dir / 'provider.db'}")
    yield schema.session_factory(engine)
    engine.dispose()


def publish(db: sessionmaker[Session], version: str, channel: str = "stable", **kw: Any) -> None:
    """A release row as publishing leaves it."""
    with db.begin() as s:
        s.add(
            Release(
                version=version,
                channel=channel,
                severity=kw.get("severity", "normal"),
                target=f"releases/{version}/sgw-{version}.tar.zst",
                length=1024,
                sha256="0" * 64,
                manifest=json.dumps({"version": version}),
            )
        )


class Agent:
    """A gateway's update agent, as far as the provider sees it: signed plan and reports."""

    def __init__(self, p: SecureProvider, gw: FakeGateway, running: str = "1.0") -> None:
        self.gw = gw
        self.id = gw.gateway_id
        self.http = p.client(auth=gw.auth())
        self.running = running

    def plan(self) -> dict[str, Any]:
        r = self.http.get("/v1/updates/plan")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def report(self, version: str, state: str, **kw: Any) -> httpx.Response:
        body = {
            "version": version,
            "from_version": self.running,
            "state": state,
            "reason": kw.get("reason"),
            "pause_s": kw.get("pause_s"),
            "at": kw.get("at", datetime.now(UTC)).isoformat(),
        }
        r = self.http.post("/v1/updates/reports", json=body)
        assert r.status_code == 204, r.text
        if state == "done":
            self.running = version
        return r


def rollout(p: SecureProvider) -> dict[str, Any]:
    (newest, *_rest) = cli_json(p, "updates", "rollouts")
    assert isinstance(newest, dict)
    return newest


# -- policies ------------------------------------------------------------------------------


def test_policies_from_the_cli_reach_the_gateways_plan(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "edge")
    assert (
        p.admin()
        .patch(f"/v1/gateways/{gw.gateway_id}", json={"timezone": "Europe/Berlin"})
        .is_success
    )
    agent = Agent(p, gw)
    # Built in: stable, Sunday 03:00 for an hour, every release; no release to run yet.
    assert agent.plan() == {
        "version": None,
        "severity": None,
        "now": False,
        "channel": "stable",
        "automatic": "all",
        "timezone": "Europe/Berlin",
        "window": {"kind": "weekly", "day": 6, "hour": 3, "minute": 0, "duration_minutes": 60},
    }
    assert cli_json(p, "updates", "policy", gw.gateway_id)["source"] == "default"

    # The account's default, then the gateway's own channel over it (the window kept).
    default = cli_json(p, "updates", "policy-set", "--default", "--window", "monthly 31 22:30 2h")
    assert (default["window"], default["source"]) == ("monthly 31 22:30 120m", "account")
    own = cli_json(p, "updates", "policy-set", gw.gateway_id, "--channel", "canary")
    assert (own["channel"], own["window"], own["source"]) == (
        "canary",
        "monthly 31 22:30 120m",
        "gateway",
    )
    plan = agent.plan()
    assert (plan["channel"], plan["automatic"]) == ("canary", "all")
    assert plan["window"] == {
        "kind": "monthly",
        "day": 31,
        "hour": 22,
        "minute": 30,
        "duration_minutes": 120,
    }
    # A weekday three days off in Berlin, so that the window is not open now (an open
    # window's next opening is now: the test once ran inside "tue 01:15 45m").
    day = (datetime.now(zoneinfo.ZoneInfo("Europe/Berlin")) + timedelta(days=3)).weekday()
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    flags = cli_json(
        p,
        *("updates", "policy-set", gw.gateway_id, "--kind", "weekly", "--day", names[day]),
        *("--at", "01:15", "--duration", "45", "--automatic", "emergency"),
    )
    assert (flags["window"], flags["automatic"]) == (f"weekly {names[day]} 01:15 45m", "emergency")
    assert agent.plan()["automatic"] == "emergency"
    status = cli_json(p, "updates", "status", "--gateway", gw.gateway_id)
    (row,) = status["gateways"]
    opens = datetime.fromisoformat(row["next_window"]).astimezone(UTC)
    local = opens.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
    assert (local.weekday(), local.hour, local.minute) == (day, 1, 15)

    # Dropped: the account's default again.
    cleared = cli_json(p, "updates", "policy-clear", gw.gateway_id)
    assert (cleared["source"], cleared["channel"]) == ("account", "stable")

    # Mistakes name the field and the fix.
    bad = p.sgw("updates", "policy-set", gw.gateway_id, "--window", "weekly someday 03:00 1h")
    assert bad.returncode == 2 and "weekly window day 'someday'" in bad.stderr
    bad = p.sgw("updates", "policy-set", gw.gateway_id)
    assert bad.returncode == 2 and "give --channel" in bad.stderr
    # Another account's admin sees no such gateway; a gateway makes no admin call and an
    # admin asks for no plan.
    _other, token = new_account(p, "other")
    assert p.sgw("updates", "policy", gw.gateway_id, token=token).returncode == 4
    assert agent.http.get(f"/v1/gateways/{gw.gateway_id}/update-policy").status_code == 403
    assert p.admin().get("/v1/updates/plan").status_code == 403


def test_reports_are_kept_once_and_bodies_are_capped(
    secure_provider: SecureProvider, db: sessionmaker[Session]
) -> None:
    p = secure_provider
    agent = Agent(p, activate(p, p.token, "edge"))
    at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    for _ in range(3):
        agent.report("2.0", "downloading", at=at)
    with db() as s:
        assert s.query(UpdateReport).filter_by(gateway_id=agent.id).count() == 1
    # A report that arrives late does not replace the newest state.
    agent.report("2.0", "verified", at=at + timedelta(minutes=2))
    agent.report("2.0", "installed", at=at + timedelta(minutes=1))
    (row,) = cli_json(p, "updates", "status")["gateways"]
    assert (row["state"], row["running"], row["version"]) == ("verified", "1.0", "2.0")
    r = agent.http.post(
        "/v1/updates/reports",
        json={"version": "2.0", "from_version": "1.0", "state": "done", "at": "2026-12-07T12:00"},
    )
    assert r.status_code == 422 and "zone" in r.text
    huge = agent.http.post(
        "/v1/updates/reports",
        content=b"{" + b" " * (64 * 1024) + b"}",
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413 and "update reports" in huge.text


# -- rollouts ------------------------------------------------------------------------------


def fleet(p: SecureProvider, n: int) -> list[Agent]:
    return [Agent(p, activate(p, p.token, f"gw{i}")) for i in range(n)]


def test_a_rollout_goes_through_its_phases_halts_on_a_failed_swap_and_resumes(
    secure_provider: SecureProvider, db: sessionmaker[Session]
) -> None:
    p = secure_provider
    canary, emergency_only, *rest = fleet(p, 7)
    for a in (canary, emergency_only):
        cli_json(p, "updates", "policy-set", a.id, "--channel", "canary")
    cli_json(p, "updates", "policy-set", emergency_only.id, "--automatic", "emergency")
    # Phase 2's share is chosen so that both phase 2 and phase 3 have gateways.
    rest.sort(key=lambda a: bucket(a.id))
    share = bucket(rest[len(rest) // 2].id)
    early = [a for a in rest if bucket(a.id) < share]
    late = [a for a in rest if bucket(a.id) >= share]
    assert early and late, [bucket(a.id) for a in rest]
    publish(db, "2.0")

    before = [a.plan()["version"] for a in (canary, *rest)]
    assert before == [None] * (1 + len(rest))
    started = cli_json(p, "updates", "rollout", "2.0", "--share", str(share), "--soak", "0")
    assert (started["state"], started["phase"]) == ("running", 1)
    # Phase 1: the canaries only.
    assert canary.plan()["version"] == "2.0"
    assert emergency_only.plan()["version"] == "2.0"  # handed out; applied only when told
    assert {a.plan()["version"] for a in rest} == {None}

    # The canary swaps; the emergency-only canary is not waited for.
    canary.report("2.0", "swapping")
    assert rollout(p)["phase"] == 1
    canary.report("2.0", "done", pause_s=0.42)
    assert rollout(p)["phase"] == 2
    assert {a.plan()["version"] for a in early} == {"2.0"}
    assert {a.plan()["version"] for a in late} == {None}

    # A failed swap in phase 2 halts the rollout: nobody else is handed the release.
    failing, *others = early
    failing.report("2.0", "failed", reason="green did not become ready")
    halted = rollout(p)
    assert halted["state"] == "halted"
    assert failing.id in halted["halt_reason"] and "failed their swap" in halted["halt_reason"]
    assert failing.plan()["version"] == "1.0"  # stays on what it runs
    assert {a.plan()["version"] for a in late} == {None}
    assert {a.plan()["version"] for a in others} == {None}
    assert canary.plan()["version"] == "2.0"  # what swapped stays swapped

    # Resumed: phase 2 again, its failures counted from now.
    resumed = cli_json(p, "updates", "resume")
    assert (resumed["state"], resumed["phase"]) == ("running", 2)
    for a in early:
        assert a.plan()["version"] == "2.0"
        a.report("2.0", "done", pause_s=0.3)
    assert rollout(p)["phase"] == 3
    assert {a.plan()["version"] for a in late} == {"2.0"}
    for a in late:
        a.report("2.0", "done", pause_s=0.2)
    done = rollout(p)
    assert (done["state"], done["phase"]) == ("completed", 3)
    status = cli_json(p, "updates", "status", "--gateway", canary.id)
    (row,) = status["gateways"]
    assert (row["running"], row["planned"], row["state"], row["pause_s"]) == (
        "2.0",
        "2.0",
        "done",
        0.42,
    )


def test_a_rollout_halts_when_a_gateway_goes_silent_after_its_swap(
    secure_provider: SecureProvider, db: sessionmaker[Session]
) -> None:
    p = secure_provider
    (canary,) = fleet(p, 1)
    cli_json(p, "updates", "policy-set", canary.id, "--channel", "canary")
    publish(db, "2.0", severity="emergency")
    # A long soak keeps phase 1 running after the swap; it is the heartbeats that matter.
    cli_json(p, "updates", "rollout", "2.0", "--soak", "600", "--heartbeat-timeout", "5")
    assert canary.plan()["severity"] == "emergency"

    def seen() -> bool:
        return p.admin().get(f"/v1/gateways/{canary.id}").json()["last_seen"] is not None

    wait_for(seen, what="the gateway's last-seen time")  # its plan calls were signed
    canary.report("2.0", "done", pause_s=0.5)
    assert rollout(p)["state"] == "running"  # healthy so far: evaluated, not halted
    # Silence since: its last-seen time and its done report an hour old.
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with db.begin() as s:
        s.execute(update(Gateway).where(Gateway.id == canary.id).values(last_seen=hour_ago))
        s.execute(
            update(UpdateReport)
            .where(UpdateReport.gateway_id == canary.id)
            .values(received=hour_ago)
        )
    halted = rollout(p)
    assert halted["state"] == "halted"
    assert "has not been heard from" in halted["halt_reason"]
    assert canary.id in halted["halt_reason"]
    # Halting by hand and resuming are the operator's.
    resumed = cli_json(p, "updates", "resume", "2.0")
    assert resumed["state"] == "running"
    stopped = cli_json(p, "updates", "halt", "--reason", "cohort alert: disk errors")
    assert (stopped["state"], stopped["halt_reason"]) == ("halted", "cohort alert: disk errors")
    _account, token = new_account(p, "customer")
    refused = p.sgw("updates", "resume", token=token)
    assert refused.returncode == 3 and "operator" in refused.stderr


def test_a_rollout_needs_a_published_release_and_sane_limits(
    secure_provider: SecureProvider, db: sessionmaker[Session]
) -> None:
    p = secure_provider
    missing = p.sgw("updates", "rollout", "9.9")
    assert missing.returncode == 4 and "sgw releases publish" in missing.stderr
    publish(db, "2.0")
    short = p.sgw("updates", "rollout", "2.0", "--heartbeat-timeout", "0.5")
    assert short.returncode == 1 and "at least 2" in short.stderr
    first = cli_json(p, "updates", "rollout", "2.0")
    publish(db, "2.1")
    second = cli_json(p, "updates", "rollout", "2.1")
    states = {r["id"]: r["state"] for r in cli_json(p, "updates", "rollouts")}
    assert states == {first["id"]: "superseded", second["id"]: "running"}


# -- update now ----------------------------------------------------------------------------


def test_update_now_marks_the_release_and_sends_the_update_command(
    secure_provider: SecureProvider, db: sessionmaker[Session]
) -> None:
    p = secure_provider
    agent = Agent(p, activate(p, p.token, "edge"))
    cli_json(p, "updates", "policy-set", agent.id, "--automatic", "emergency")
    nothing = p.sgw("updates", "now", agent.id)
    assert nothing.returncode == 1 and "no release for the stable channel" in nothing.stderr
    publish(db, "2.0")
    publish(db, "2.1-canary", channel="canary")

    polled: list[dict[str, Any]] = []

    def long_poll() -> None:
        http = p.client(auth=agent.gw.auth())
        r = http.get("/v1/gateway/messages", params={"wait": 20}, timeout=30)
        polled.extend(r.json()["messages"])

    poller = threading.Thread(target=long_poll)
    poller.start()
    wait_for(
        lambda: p.admin().get(f"/v1/gateways/{agent.id}/connection").json()["online"],
        what="the long-poll",
    )
    out = cli_json(p, "updates", "now", agent.id)
    poller.join(30)
    assert out["version"] == "2.0"  # the newest of its channel: no rollout names one
    (message,) = polled
    assert (message["type"], message["args"]) == ("update", {"version": "2.0", "now": True})
    assert message["id"] == out["command"]["id"]
    plan = agent.plan()
    assert (plan["version"], plan["now"], plan["automatic"]) == ("2.0", True, "emergency")

    agent.report("2.0", "swapping")
    assert agent.plan()["now"] is True
    agent.report("2.0", "done", pause_s=0.25)
    plan = agent.plan()
    assert (plan["version"], plan["now"]) == ("2.0", False)
    (row,) = cli_json(p, "updates", "status")["gateways"]
    assert (row["running"], row["pause_s"], row["now"]) == ("2.0", 0.25, False)
    again = p.sgw("updates", "now", agent.id)
    assert again.returncode == 1 and "runs 2.0 already" in again.stderr


def test_update_is_a_command_admins_may_send(secure_provider: SecureProvider) -> None:
    p = secure_provider
    agent = Agent(p, activate(p, p.token, "edge"))
    r = p.admin().post(
        f"/v1/gateways/{agent.id}/commands",
        json={"type": "update", "args": {"version": "2.0", "now": False}},
    )
    # Accepted by the planner (validated), refused only because the gateway is offline.
    assert r.status_code == 409 and r.json()["error"] == "gateway_offline"
    bad = p.admin().post(
        f"/v1/gateways/{agent.id}/commands", json={"type": "update", "args": {"later": True}}
    )
    assert bad.status_code == 400 and "later" in bad.text
