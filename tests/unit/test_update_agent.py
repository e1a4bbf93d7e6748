"""The update agent's logic (sgw.gateway.updates.agent) against in-memory doubles of the
provider's plan and reports, the daemon and the release trust; installs into real slot
directories from real bundles (tests/fixtures/agent_releases.py). The agent as a process with a
real daemon, and killed at every step: tests/integration/test_update_agent.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from sgw.common.errors import HandoverError, HandoverRefusedError
from sgw.common.maintenance import Window
from sgw.gateway.updates import install, state
from sgw.gateway.updates.agent import (
    DaemonInfo,
    Plan,
    UpdateAgent,
    UpdateLinkError,
    compatible,
    may_swap,
    worth_fetching,
)
from sgw.gateway.updates.trust import UpdateRefused, VerifiedRelease
from tests.fixtures.agent_releases import DirectoryTrust, publish, simple_slot

# A Monday, 12:00 UTC; the window below opens on Mondays at 02:00 for two hours.
MONDAY_NOON = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
WINDOW = Window("weekly", 0, 2, 0, 120)


@dataclass
class FakeProvider:
    plan_doc: dict[str, Any]
    reports: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False
    reports_down: bool = False

    def plan(self) -> Plan:
        if self.down:
            raise UpdateLinkError("provider down")
        return Plan.from_json(self.plan_doc)

    def report(self, report: dict[str, Any]) -> None:
        if self.down or self.reports_down:
            raise UpdateLinkError("provider down")
        self.reports.append(report)

    def states(self) -> list[str]:
        return [r["state"] for r in self.reports]


@dataclass
class FakeDaemon:
    version: str = "1.0.0"
    pause_s: float | None = None
    swaps: list[str] = field(default_factory=list)
    fail: Exception | None = None

    async def status(self) -> DaemonInfo:
        return DaemonInfo(self.version, self.pause_s)

    async def swap(self, slot: str) -> DaemonInfo:
        self.swaps.append(slot)
        if self.fail is not None:
            raise self.fail
        self.version, self.pause_s = os.path.basename(slot), 0.012
        return DaemonInfo(self.version, self.pause_s)


@dataclass
class CountingTrust:
    inner: DirectoryTrust
    calls: int = 0

    def fetch(self, version: str) -> VerifiedRelease:
        self.calls += 1
        return self.inner.fetch(version)


@dataclass
class Rig:
    tmp: Path
    provider: FakeProvider
    daemon: FakeDaemon
    trust: CountingTrust
    clock: list[dt.datetime]

    @property
    def root(self) -> Path:
        return self.tmp / "opt"

    @property
    def state_file(self) -> str:
        return str(self.tmp / "data" / "updates" / "agent.json")

    def agent(self) -> UpdateAgent:
        return UpdateAgent(
            root=str(self.root),
            state_file=self.state_file,
            provider=self.provider,
            trust=self.trust,
            daemon=self.daemon,
            timezone="UTC",
            clock=lambda: self.clock[0],
        )

    def publish(self, version: str, **kwargs: Any) -> None:
        tree = simple_slot(self.tmp / "src" / version, content=version)
        publish(self.tmp / "repo", tree, version, **kwargs)

    def stored(self) -> state.AgentState:
        return state.load(self.state_file)


def plan(version: str | None = "2.0.0", **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": version,
        "severity": "normal",
        "now": False,
        "channel": "stable",
        "automatic": "all",
        "timezone": "UTC",
        "window": WINDOW.to_json(),
    }
    doc.update(kw)
    return doc


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    (tmp_path / "repo").mkdir()
    return Rig(
        tmp_path,
        FakeProvider(plan()),
        FakeDaemon(),
        CountingTrust(DirectoryTrust(tmp_path / "repo")),
        [MONDAY_NOON],
    )


def check(agent: UpdateAgent, **kw: Any) -> dict[str, Any]:
    return asyncio.run(agent.check(**kw))


# -- the rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("automatic", "severity", "now", "at_hour", "swap"),
    [
        ("all", "normal", False, 3, True),  # inside the window
        ("all", "normal", False, 12, False),  # outside it
        ("all", "normal", True, 12, True),  # now: whatever the window
        ("emergency", "normal", False, 3, False),  # policy: emergencies only
        ("emergency", "emergency", False, 3, True),
        ("emergency", "emergency", False, 12, False),  # an emergency still waits for it
        ("emergency", "normal", True, 12, True),
    ],
)
def test_the_swap_rule(automatic: str, severity: str, now: bool, at_hour: int, swap: bool) -> None:
    p = Plan.from_json(plan(automatic=automatic, severity=severity, now=now))
    at = MONDAY_NOON.replace(hour=at_hour)
    assert may_swap(p, severity, now, at, "UTC") is swap


def test_what_is_fetched_ahead_of_its_window() -> None:
    assert worth_fetching(Plan.from_json(plan(automatic="all")), False)
    assert worth_fetching(Plan.from_json(plan(automatic="emergency", severity="emergency")), False)
    assert not worth_fetching(Plan.from_json(plan(automatic="emergency")), False)
    assert worth_fetching(Plan.from_json(plan(automatic="emergency")), True)


def test_no_window_means_only_now() -> None:
    p = Plan.from_json(plan(window=None))
    assert not may_swap(p, "emergency", False, MONDAY_NOON, "UTC")
    assert may_swap(p, "normal", True, MONDAY_NOON, "UTC")


def test_compatibility_with_the_running_version() -> None:
    assert compatible(">=1.0", "1.2.0") is None
    assert compatible("", "0.1.0") is None
    assert compatible(">=1.0,<2", "0.9") == (
        "it can be swapped to only from versions >=1.0,<2, not from 0.9"
    )
    assert "cannot compare" in str(compatible("~~1", "1.0"))


# -- the state machine ----------------------------------------------------------------------


def test_now_downloads_installs_swaps_and_reports_each_step(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    got = check(rig.agent())
    assert got["state"] == "done" and got["version"] == "2.0.0"
    assert rig.provider.states() == ["downloading", "verified", "installed", "swapping", "done"]
    assert all(
        r["from_version"] == "1.0.0" and r["version"] == "2.0.0" for r in rig.provider.reports
    )
    assert rig.provider.reports[-1]["pause_s"] == 0.012
    assert rig.provider.reports[-1]["at"] == "2026-12-07T12:00:00Z"
    slot = rig.root / "releases" / "2.0.0"
    assert rig.daemon.swaps == [str(slot)]
    assert (slot / "lib" / "pkg" / "mod.py").read_text() == "VALUE = '2.0.0'\n"
    assert os.readlink(slot / "bin" / "python3") == "/usr/bin/python3"
    assert os.access(slot / "bin" / "tool", os.X_OK)
    assert not (rig.root / "current").exists()  # never moved by the agent
    stored = rig.stored()
    assert stored.state == "done" and stored.reports == []
    # The next check finds the daemon on the release: nothing more to do or report.
    check(rig.agent())
    assert len(rig.provider.reports) == 5 and rig.trust.calls == 1


def test_outside_the_window_it_installs_and_waits_then_swaps_inside(rig: Rig) -> None:
    rig.publish("2.0.0")
    agent = rig.agent()
    assert check(agent)["state"] == "waiting"
    assert rig.provider.states() == ["downloading", "verified", "installed", "waiting"]
    assert rig.daemon.swaps == []
    check(agent)  # still closed: no new report, nothing fetched again
    assert len(rig.provider.reports) == 4 and rig.trust.calls == 1
    rig.clock[0] = dt.datetime(2026, 12, 14, 2, 30, tzinfo=dt.UTC)  # next Monday, 02:30
    assert check(rig.agent())["state"] == "done"  # a restarted agent too
    assert rig.provider.states()[4:] == ["swapping", "done"]
    assert rig.trust.calls == 1  # the installed slot was re-checked, not fetched again


def test_emergency_only_policy_leaves_a_normal_release_undownloaded(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(automatic="emergency")
    rig.clock[0] = MONDAY_NOON.replace(hour=3)  # even inside the window
    got = check(rig.agent())
    assert got["state"] == "waiting" and "sgw updates now 2.0.0" in got["message"]
    assert rig.trust.calls == 0 and not (rig.root / "releases").exists()
    # The console's "update now" reaches the agent as a check with now.
    assert check(rig.agent(), version="2.0.0", now=True)["state"] == "done"


def test_an_emergency_release_swaps_in_the_window_under_emergency_policy(rig: Rig) -> None:
    rig.publish("2.0.0", severity="emergency")
    rig.provider.plan_doc = plan(automatic="emergency", severity="emergency")
    rig.clock[0] = MONDAY_NOON.replace(hour=3)
    assert check(rig.agent())["state"] == "done"


@pytest.mark.parametrize("reason", ["tampered", "rollback", "expired", "untrusted", "revoked"])
def test_a_refusal_of_the_trust_installs_nothing_and_is_reported(rig: Rig, reason: str) -> None:
    (rig.tmp / "repo" / "2.0.0.json").write_text(json.dumps({"refuse": reason}))
    rig.provider.plan_doc = plan(now=True)
    got = check(rig.agent())
    assert got["state"] == "refused" and got["reason"] == reason
    assert rig.provider.states() == ["downloading", "refused"]
    assert rig.provider.reports[-1]["reason"] == reason
    assert rig.daemon.swaps == [] and not (rig.root / "releases").exists()
    rig.provider.plan_doc = plan(now=False)
    check(rig.agent())  # not retried without "now"
    assert rig.trust.calls == 1


def test_an_older_release_is_refused_as_a_rollback_without_downloading(rig: Rig) -> None:
    rig.publish("0.9.0")
    rig.provider.plan_doc = plan("0.9.0", now=True)
    got = check(rig.agent())
    assert got["state"] == "refused" and got["reason"] == "rollback"
    assert got["message"] == (
        "release 0.9.0 is older than the running 1.0.0: the agent refuses rollbacks "
        "(publish a newer release with the fix instead)"
    )
    assert rig.provider.states() == ["refused"] and rig.trust.calls == 0
    assert rig.daemon.swaps == []


def test_an_unpacked_tree_unlike_its_manifest_is_refused_as_tampered(rig: Rig) -> None:
    rig.publish("2.0.0", tamper=True)
    rig.provider.plan_doc = plan(now=True)
    got = check(rig.agent())
    assert got["state"] == "refused" and got["reason"] == "tampered"
    assert "do not match the signed manifest" in got["message"]
    assert os.listdir(rig.root / "releases") == []  # no slot, no partial
    assert rig.daemon.swaps == []


def test_a_release_that_excludes_the_running_version_is_refused(rig: Rig) -> None:
    rig.publish("2.0.0", swappable_from=">=1.5")
    rig.provider.plan_doc = plan(now=True)
    got = check(rig.agent())
    assert got["state"] == "refused" and got["reason"] == "incompatible"
    assert got["message"] == (
        "release 2.0.0: it can be swapped to only from versions >=1.5, not from 1.0.0"
    )
    assert rig.provider.states() == ["downloading", "verified", "refused"]
    assert not (rig.root / "releases" / "2.0.0").exists() and rig.daemon.swaps == []


def test_a_failed_swap_is_reported_and_retried_only_when_told(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    rig.daemon.fail = HandoverError("swap called off: green died")
    got = check(rig.agent())
    assert got["state"] == "failed" and "green died" in got["message"]
    assert rig.provider.reports[-1]["reason"] == "swap to 2.0.0 failed: swap called off: green died"
    rig.daemon.fail = None
    rig.provider.plan_doc = plan(now=False)
    rig.clock[0] = MONDAY_NOON.replace(hour=3)
    check(rig.agent())
    assert len(rig.daemon.swaps) == 1  # failed stays failed until "now"
    rig.provider.plan_doc = plan(now=True)
    assert check(rig.agent())["state"] == "done"


def test_a_swap_still_in_progress_is_waited_for(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent killed mid-swap, restarted: the daemon refuses a second swap while the
    first runs; the agent waits until the daemon serves the release."""
    from sgw.gateway.updates import agent as agent_mod

    monkeypatch.setattr(agent_mod, "SWAP_POLL_S", 0.0)
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    polls = []

    class Busy(FakeDaemon):
        async def status(self) -> DaemonInfo:
            polls.append(self.version)
            if len(polls) == 3:  # the other swap ends
                self.version, self.pause_s = "2.0.0", 0.02
            return await super().status()

        async def swap(self, slot: str) -> DaemonInfo:
            self.swaps.append(slot)
            raise HandoverRefusedError("a swap of this daemon is in progress already")

    rig.daemon = Busy()
    assert check(rig.agent())["state"] == "done"
    assert rig.provider.reports[-1]["pause_s"] == 0.02


def test_reports_the_provider_missed_are_kept_and_sent_later_in_order(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    rig.provider.reports_down = True  # the plan comes, the reports do not go
    assert check(rig.agent())["state"] == "done"
    assert rig.provider.reports == []
    assert [r["state"] for r in rig.stored().reports] == [
        *("downloading", "verified", "installed", "swapping", "done")
    ]
    rig.provider.reports_down = False
    check(rig.agent())  # a restarted agent sends them, oldest first
    assert rig.provider.states() == ["downloading", "verified", "installed", "swapping", "done"]
    assert rig.stored().reports == []


def test_a_swap_found_done_at_start_is_recorded_without_swapping_again(rig: Rig) -> None:
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    st = state.AgentState(state="swapping", version="2.0.0", from_version="1.0.0")
    state.save(rig.state_file, st)
    rig.daemon.version, rig.daemon.pause_s = "2.0.0", 0.03  # the daemon swapped meanwhile
    assert check(rig.agent())["state"] == "done"
    assert rig.provider.states() == ["done"] and rig.provider.reports[0]["pause_s"] == 0.03
    assert rig.daemon.swaps == []


def test_a_damaged_installed_slot_is_fetched_again(rig: Rig) -> None:
    rig.publish("2.0.0")
    check(rig.agent())  # installed, waiting for the window
    mod = rig.root / "releases" / "2.0.0" / "lib" / "pkg" / "mod.py"
    mod.write_text("VALUE = 'evil'\n")
    rig.provider.plan_doc = plan(now=True)
    assert check(rig.agent())["state"] == "done"
    assert rig.trust.calls == 2 and mod.read_text() == "VALUE = '2.0.0'\n"


def test_a_plan_that_cannot_be_fetched_changes_nothing(rig: Rig) -> None:
    rig.provider.down = True
    got = check(rig.agent())
    assert got["state"] == "idle" and got["error"] == "provider down"
    assert not os.path.exists(rig.state_file)


# -- install --------------------------------------------------------------------------------


def test_partial_slots_are_removed_at_start(rig: Rig) -> None:
    partial = install.partial_path(str(rig.root), "2.0.0")
    (partial / "bin").mkdir(parents=True)
    (rig.root / "releases" / "1.0.0").mkdir()
    assert install.remove_partials(str(rig.root)) == [".2.0.0.partial"]
    assert os.listdir(rig.root / "releases") == ["1.0.0"]


def _bundle_with(tmp: Path, name: str, kind: bytes = tarfile.REGTYPE) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = 0 if kind != tarfile.REGTYPE else 1
        info.linkname = "/etc/passwd" if kind == tarfile.LNKTYPE else ""
        tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
    path = tmp / "bad.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("opt/sgw/releases/1.0.0/x", tarfile.REGTYPE, "is outside opt/sgw/releases/2.0.0/"),
        ("opt/sgw/releases/2.0.0/../../x", tarfile.REGTYPE, "bad member path"),
        ("/etc/x", tarfile.REGTYPE, "bad member path"),
        ("opt/sgw/releases/2.0.0/h", tarfile.LNKTYPE, "neither a file"),
        ("opt/sgw/releases/2.0.0/dev", tarfile.CHRTYPE, "neither a file"),
    ],
)
def test_bundles_that_would_write_elsewhere_are_refused(
    rig: Rig, name: str, kind: bytes, message: str
) -> None:
    rig.publish("2.0.0")
    good = rig.trust.fetch("2.0.0")
    bad = VerifiedRelease("2.0.0", "normal", _bundle_with(rig.tmp, name, kind), good.manifest)
    with pytest.raises(UpdateRefused, match=message) as err:
        install.install(str(rig.root), bad)
    assert err.value.reason == "tampered"
    assert os.listdir(rig.root / "releases") == []


def test_a_check_asked_during_another_is_queued_not_lost(rig: Rig) -> None:
    """A periodic pass read a plan without "now"; the console's "now" arrives meanwhile:
    the answer says busy at once, and the queued pass applies the release."""
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=False)  # window closed: the first pass waits

    class Gate(FakeDaemon):
        gate: asyncio.Event | None = None
        entered: asyncio.Event | None = None

        async def status(self) -> DaemonInfo:
            if self.gate is not None and self.entered is not None:
                self.entered.set()
                await self.gate.wait()
                self.gate = None
            return await super().status()

    daemon = Gate()
    rig.daemon = daemon

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        daemon.gate, daemon.entered = asyncio.Event(), asyncio.Event()
        agent = rig.agent()
        first = asyncio.create_task(agent.check())
        await daemon.entered.wait()  # the first pass runs, holding the lock
        rig.provider.plan_doc = plan(now=True)
        answer = await agent.check_answer(version="2.0.0", now=True)
        daemon.gate.set()
        await first
        async with agent.settled():
            pass
        while agent._tasks:  # the queued pass
            await asyncio.gather(*agent._tasks)
        return answer, agent.describe()

    answer, final = asyncio.run(scenario())
    assert answer["busy"] is True
    assert final["state"] == "done" and rig.daemon.swaps == [str(rig.root / "releases" / "2.0.0")]


def test_the_answer_to_a_check_comes_before_the_download(rig: Rig) -> None:
    """The download waits until the check was answered: were the answer held up by the
    download, the fetch would find no answer and say so."""
    rig.publish("2.0.0")
    rig.provider.plan_doc = plan(now=True)
    answered = threading.Event()
    seen: list[bool] = []

    class Watching(CountingTrust):
        def fetch(self, version: str) -> VerifiedRelease:
            seen.append(answered.wait(30))
            return super().fetch(version)

    rig.trust = Watching(rig.trust.inner)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        agent = rig.agent()
        answer = await agent.check_answer(version="2.0.0", now=True)
        answered.set()
        while agent._tasks:
            await asyncio.gather(*agent._tasks)
        return answer, agent.describe()

    answer, final = asyncio.run(scenario())
    assert answer["state"] == "downloading" and answer["version"] == "2.0.0"
    assert seen == [True] and final["state"] == "done"
