"""The update agent as a process (sgw.gateway.updates.agent) with a real gateway daemon:
it installs a published release into its slot, has the daemon swap to it, reports every
step, and re-executes itself from the new release; killed with SIGKILL at every step and
restarted, it ends on the new release with every report sent, and in between the
appliance always runs a verified release from an intact slot.

Stand-ins, until parts A and B of issue 17 land (the lead wires the real ones): the
release trust is tests/fixtures/agent_releases.DirectoryTrust (part A's TUF client verifies
for real), and the provider's plan and report endpoints are a small real HTTP server
(tests/fixtures/update_agent.UpdateProvider) that checks the gateway's signatures. The
release swapped to is this virtualenv under another version (tests/fixtures/agent_releases.py
``runnable_slot``): the mechanism is proved, not a code change (the appliance test swaps
between two builds).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from sgw import version
from sgw.common.releases import tree_digest
from sgw.gateway.link.command_runner import CommandRunner
from sgw.gateway.link.journal import Command
from sgw.gateway.updates import faults
from sgw.gateway.updates.state import AgentState
from tests.fixtures.agent_releases import publish, runnable_slot
from tests.fixtures.daemons import GatewayProcess, gateway_status, serving
from tests.fixtures.nbd_writer import BLOCK, Writer
from tests.fixtures.update_agent import (
    AgentProcess,
    UpdateProvider,
    agent_call,
    public_key_of,
    wait_for_agent_socket,
)
from tests.fixtures.waiting import wait_for

NEW = "2.0.0"
OLD = version()
VENV = str(Path(sys.executable).parent.parent)  # a directory with bin/sgw
KEY_ID = "gw-test-key"
WINDOW_CLOSED = {"kind": "weekly", "day": 0, "hour": 0, "minute": 0, "duration_minutes": 1}


@dataclass
class Appliance:
    """Slots under ``root`` (``current`` -> the running release), a gateway daemon, the
    provider's stand-in, a repository of releases and the agent's configuration."""

    tmp: Path
    root: Path
    gw: GatewayProcess
    provider: UpdateProvider
    repo: Path
    config: Path
    socket: str

    def agent(self, faults: str = "") -> AgentProcess:
        return AgentProcess(self.config, self.repo, self.tmp / "agent.stderr", faults).start()

    def state(self) -> AgentState:
        path = self.gw.data_dir / "updates" / "agent.json"
        if not path.exists():
            return AgentState()
        return AgentState(**json.loads(path.read_text()))

    def daemon_version(self) -> str:
        return str(gateway_status(self.gw)["daemon"]["version"])

    def current(self) -> str:
        return os.readlink(self.root / "current")

    def assert_bootable(self) -> None:
        """``current`` names an intact slot of a verified release (the old one, a link to
        this virtualenv, or the new one, as its manifest says) and the daemon serves."""
        target = Path(self.current())
        assert target.parent == self.root / "releases"
        if target.name == NEW:
            manifest = json.loads((target / "sgw-release.json").read_text())
            assert tree_digest(target) == manifest["tree_sha256"]
        else:
            assert target.name == OLD and os.path.realpath(target) == VENV
        assert self.daemon_version() in (OLD, NEW)

    def partials(self) -> list[str]:
        return [n for n in os.listdir(self.root / "releases") if n.endswith(".partial")]


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    root = tmp_path / "opt"
    (root / "releases").mkdir(parents=True)
    os.symlink(VENV, root / "releases" / OLD)
    os.symlink(root / "releases" / OLD, root / "current")
    repo = tmp_path / "repo"
    repo.mkdir()
    publish(repo, runnable_slot(tmp_path / "build" / NEW, NEW), NEW, swappable_from=">=0.1")

    gw = GatewayProcess(tmp_path / "gw", ["vol0:64M"])
    gw.data_dir.mkdir()
    gw.start()
    creds = {
        "gateway_id": "gw-1",
        "account_id": "acct-1",
        "name": "test",
        "key_id": KEY_ID,
        "provider_url": "http://127.0.0.1:9",
        "timezone": "UTC",
    }
    plan = {
        "version": NEW,
        "severity": "normal",
        "now": True,
        "channel": "stable",
        "automatic": "all",
        "timezone": "UTC",
        "window": WINDOW_CLOSED,
    }
    provider = UpdateProvider(KEY_ID, public_key_of(gw.data_dir / "identity.key"), plan)
    with provider:
        fd = os.open(gw.data_dir / "credentials.json", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, json.dumps(creds).encode())
        os.close(fd)
        sock = str(tmp_path / "run" / "update-agent.sock")
        config = tmp_path / "agent.toml"
        config.write_text(
            f'data_dir = "{gw.data_dir}"\n[remote]\nurl = "{provider.url}"\n'
            f'[updates]\nsocket = "{sock}"\nroot = "{root}"\ncheck_interval = 3600\n'
        )
        app = Appliance(tmp_path, root, gw, provider, repo, config, sock)
        try:
            yield app
        finally:
            for pid in serving(gw.data_dir):
                os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not serving(gw.data_dir), 60, what="the gateway to stop")
            if gw.proc is not None:
                gw.proc.wait(10)
                gw.proc = None


def _done(app: Appliance) -> bool:
    return "done" in app.provider.states()


def test_the_agent_swaps_the_daemon_to_a_published_release_and_follows_it(
    appliance: Appliance,
) -> None:
    """Window closed: installed, waiting. The console's "update now" (the daemon's update
    command handler, on the agent's socket): the daemon swaps while a client writes and
    flushes (no error, every flushed write read back), ``current`` moves, the reports
    arrive signed, the agent re-executes itself from the new release."""
    app = appliance
    app.provider.plan["now"] = False
    agent = app.agent()
    writer = Writer(app.gw.uri("vol0"), 64 * (1 << 20) // BLOCK)
    try:
        wait_for(lambda: "waiting" in app.provider.states(), 120, what="the agent to wait")
        assert app.provider.states() == ["downloading", "verified", "installed", "waiting"]
        assert app.daemon_version() == OLD and app.current() == str(app.root / "releases" / OLD)
        assert (app.root / "releases" / NEW / "bin" / "sgw").exists()

        writer.start()
        wait_for(lambda: len(writer.flushed) > 20, 60, what="the writer to get going")
        app.provider.plan["now"] = True  # `sgw updates now`, then its command:
        runner = CommandRunner(cast(Any, None), update_socket=app.socket)
        command = Command("c1", "update", {"version": NEW, "now": True}, "k1", 0.0)
        answer = asyncio.run(runner(command))
        assert answer["version"] == NEW and answer["state"] in ("waiting", "swapping", "done")

        wait_for(lambda: _done(app), 180, what=f"the swap to {NEW}\n{agent.log_text()}")
        assert app.provider.states()[4:] == ["swapping", "done"]
        done = app.provider.reports[-1]
        assert done["from_version"] == OLD and isinstance(done["pause_s"], float)
        assert done["at"].endswith("Z") and app.provider.rejected == 0
        assert app.daemon_version() == NEW
        written = len(writer.flushed)
        wait_for(lambda: len(writer.flushed) > written + 20, 60, what="writes after the swap")
        writer.stop_and_verify()  # no I/O error across the swap, every flushed write there
        assert app.current() == str(app.root / "releases" / NEW)  # moved by the daemon
        assert os.readlink(app.root / "releases" / OLD) == VENV  # the previous slot stays

        def reexecuted() -> bool:
            try:
                status = agent_call(app.socket, {"op": "status"}, timeout=5)
            except OSError:
                return False
            return bool(status["agent"]["version"] == NEW)

        wait_for(reexecuted, 120, what=f"the agent to run from {NEW}\n{agent.log_text()}")
        status = agent_call(app.socket, {"op": "status"})
        assert agent.proc is not None and status["agent"]["pid"] == agent.proc.pid
        assert status["state"] == "done" and status["pending_reports"] == 0
        assert "update agent: re-executing from the new release" in agent.messages()
    finally:
        writer.halt.set()
        agent.stop()


# What must hold right after the kill at each point, before the restart.
def _after_kill(app: Appliance, point: str) -> None:
    st = app.state()
    slot = app.root / "releases" / NEW
    if point == "downloading":
        assert st.state == "downloading" and not slot.exists()
    elif point == "unpacking":
        [partial] = app.partials()
        assert any(files for _d, _s, files in os.walk(app.root / "releases" / partial))
        assert not slot.exists()
    elif point == "installed":
        assert st.state == "verified" and slot.is_dir() and not app.partials()
    elif point == "swapping":
        assert st.state == "swapping" and app.daemon_version() == OLD
    else:  # swapped: the daemon swapped, the agent died before recording it
        assert point == "swapped" and st.state == "swapping"
        assert app.daemon_version() == NEW
    app.assert_bootable()


@pytest.mark.parametrize("point", faults.POINTS)
def test_the_agent_killed_at_each_step_resumes_and_finishes(
    appliance: Appliance, point: str
) -> None:
    app = appliance
    killed = app.agent(faults=point)
    assert killed.wait_killed() == -signal.SIGKILL, killed.log_text()
    assert "update fault point reached: killing the agent" in killed.messages()
    _after_kill(app, point)

    agent = app.agent()
    try:
        wait_for(lambda: _done(app), 180, what=f"the swap to {NEW}\n{agent.log_text()}")
        assert app.daemon_version() == NEW
        assert app.current() == str(app.root / "releases" / NEW)
        assert app.partials() == []
        if point == "unpacking":  # removed at start, before anything else
            assert "update agent: removed interrupted installs" in agent.messages()
        app.assert_bootable()
        assert app.provider.states().count("done") == 1 and app.provider.rejected == 0
        wait_for_agent_socket(app.socket)
        # The provider has the last report before the agent records it as sent.
        wait_for(lambda: app.state().reports == [], 60, what="the reports to be recorded sent")
        assert app.state().state == "done"
        assert len(serving(app.gw.data_dir)) == 1
    finally:
        agent.stop()


def test_reports_are_kept_while_the_provider_refuses_them_and_sent_after_a_restart(
    appliance: Appliance,
) -> None:
    app = appliance
    app.provider.reports_down = True
    agent = app.agent()
    try:
        wait_for(lambda: app.state().state == "done", 180, what=f"the swap\n{agent.log_text()}")
        assert app.provider.states() == []
        kept = [r["state"] for r in app.state().reports]
        assert kept == ["downloading", "verified", "installed", "swapping", "done"]
    finally:
        agent.stop()
    app.provider.reports_down = False
    agent = app.agent()
    try:
        wait_for(lambda: _done(app), 120, what=f"the kept reports\n{agent.log_text()}")
        assert app.provider.states() == kept
        wait_for(lambda: app.state().reports == [], 60, what="the reports to be recorded sent")
    finally:
        agent.stop()


def test_the_agent_waits_for_activation_then_updates(appliance: Appliance) -> None:
    app = appliance
    creds = app.gw.data_dir / "credentials.json"
    saved = creds.read_bytes()
    creds.unlink()
    agent = app.agent()
    try:
        wait_for_agent_socket(app.socket)
        answer = agent_call(app.socket, {"op": "check", "version": NEW, "now": True})
        assert answer == {
            "ok": False,
            "error": "the update agent waits for the gateway's activation (no credentials)",
        }
        assert app.provider.plans_served == 0 and app.provider.rejected == 0
        fd = os.open(creds, os.O_WRONLY | os.O_CREAT, 0o600)  # activated now
        os.write(fd, saved)
        os.close(fd)
        wait_for(lambda: _done(app), 180, what=f"the swap after activation\n{agent.log_text()}")
        assert app.daemon_version() == NEW
    finally:
        agent.stop()


def test_updates_disabled_checks_nothing(appliance: Appliance) -> None:
    app = appliance
    app.config.write_text(app.config.read_text() + "enabled = false\n")
    agent = app.agent()
    try:
        wait_for(
            lambda: (
                "updates are disabled ([updates] enabled = false): checking nothing"
                in agent.messages()
            ),
            60,
            what=f"the agent to start\n{agent.log_text()}",
        )
        status = agent_call(app.socket, {"op": "status"})
        assert status["ok"] and status["state"] == "idle"
        answer = agent_call(app.socket, {"op": "check", "version": NEW, "now": True})
        assert answer == {
            "ok": False,
            "error": "updates are disabled on this gateway: set [updates] enabled = true in "
            "its gateway.toml and restart sgw-update-agent",
        }
        assert app.provider.plans_served == 0 and app.provider.reports == []
        assert not (app.root / "releases" / NEW).exists()
    finally:
        agent.stop()
