"""The update agent: the appliance's own process (``python -m sgw.gateway.updates.agent
--config FILE``, unit ``sgw-update-agent.service``) that brings the gateway to the release
the provider wants it to run.

Every ``[updates] check_interval`` seconds, and at once when the daemon forwards the
console's ``update`` command over the agent's socket, it asks the provider for its plan
(``GET /v1/updates/plan``) and, when the plan names a release other than the one the
daemon runs, downloads and verifies it (a ``ReleaseTrust``: TUF), installs it into its
release slot (sgw.gateway.updates.install) and, inside the maintenance window or at once
when told, asks the daemon to swap to it (the admin socket's ``upgrade``). Each step is
recorded in the state file first (sgw.gateway.updates.state) and reported to the provider
(``POST /v1/updates/reports``); reports that cannot be sent are kept and sent later.

The rule (docs/updates.md): apply ``plan.version`` when it differs from the running
version and either ``now``, or the window is open and the policy is ``all`` or the
release is an emergency. A release whose manifest cannot be swapped to from the running
version is refused (``incompatible``). The agent never moves ``<root>/current``: the daemon
does once its successor serves; after a swap the agent re-executes itself from there.

The agent's socket speaks one JSON line each way: ``{"op": "check", "version": V|null,
"now": BOOL}`` answers once the plan is decided (``{"ok": true, "state": ..., "version":
...}``; the swap, if any, goes on after the answer), ``{"op": "status"}`` answers the
agent's state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from sgw import version
from sgw.common.errors import HandoverRefusedError, SgwError
from sgw.common.maintenance import Window
from sgw.gateway import admin_socket
from sgw.gateway.config import GatewayConfig
from sgw.gateway.config import load as load_config
from sgw.gateway.link.activation import tls_verify
from sgw.gateway.link.identity import load_or_create_key, read_credentials
from sgw.gateway.link.release_root import metadata_dir
from sgw.gateway.link.request_signing import GatewayAuth
from sgw.gateway.updates import faults, install, state
from sgw.gateway.updates import trust as tuf_trust
from sgw.gateway.updates.state import AgentState
from sgw.gateway.updates.trust import UpdateRefused, VerifiedRelease

LOG = logging.getLogger(__name__)

PLAN_PATH = "/v1/updates/plan"
REPORTS_PATH = "/v1/updates/reports"
# Seconds between looks for the credentials while the gateway is not activated.
ACTIVATION_POLL_S = 5.0
# Seconds between looks at the daemon while a swap someone else started runs, and the
# longest such wait (the swap's own deadlines add up to less: sgw.gateway.handover.swap).
SWAP_POLL_S = 1.0
SWAP_WAIT_S = 600.0
# How long a "check" from the socket waits for the plan to be decided before answering.
CHECK_ANSWER_S = 60.0
_MAX_LINE = 64 * 1024


class UpdateLinkError(SgwError):
    """The provider's update endpoints could not be reached or answered an error."""


# -- what the agent talks to (in-memory doubles in the unit tests) ----------------------


class ReleaseTrust(Protocol):
    """Downloads and verifies a release (part A: sgw.gateway.updates.trust, TUF)."""

    def fetch(self, version: str) -> VerifiedRelease: ...


class ProviderLink(Protocol):
    """The provider's update endpoints."""

    def plan(self) -> Plan: ...

    def report(self, report: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class DaemonInfo:
    """The serving daemon's version and, if it took over in a swap, that swap's pause."""

    version: str
    pause_s: float | None = None


class DaemonLink(Protocol):
    """The running gateway daemon (its admin socket)."""

    async def status(self) -> DaemonInfo: ...

    async def swap(self, slot: str) -> DaemonInfo: ...


# -- the decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The provider's answer to ``GET /v1/updates/plan``."""

    version: str | None
    severity: str | None = None
    now: bool = False
    channel: str = "stable"
    automatic: str = "all"
    timezone: str | None = None
    window: Window | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Plan:
        window = doc.get("window")
        version = doc.get("version")
        return cls(
            version=None if version is None else str(version),
            severity=doc.get("severity"),
            now=bool(doc.get("now", False)),
            channel=str(doc.get("channel", "stable")),
            automatic=str(doc.get("automatic", "all")),
            timezone=doc.get("timezone"),
            window=None if window is None else Window.from_json(window),
        )


def worth_fetching(plan: Plan, now: bool) -> bool:
    """True if the plan's release may be applied some day without a further ``now``: it
    is fetched and installed ahead of its window. A normal release under the
    ``emergency`` policy waits, undownloaded, for ``sgw updates now``."""
    return now or plan.automatic == "all" or plan.severity == "emergency"


def may_swap(plan: Plan, severity: str, now: bool, at: dt.datetime, timezone: str) -> bool:
    """The contract's rule, with the verified ``severity``: at once when told (``now``),
    else inside the window when the policy allows this release."""
    if now:
        return True
    if plan.automatic != "all" and severity != "emergency":
        return False
    return plan.window is not None and plan.window.is_open(at, timezone)


def compatible(swappable_from: str, running: str) -> str | None:
    """None if a release whose manifest says ``swappable_from`` may replace ``running``;
    else why not."""
    try:
        spec = SpecifierSet(swappable_from)
        ok = spec.contains(Version(running), prereleases=True)
    except (InvalidSpecifier, InvalidVersion) as exc:
        return f"cannot compare {running!r} with swappable_from {swappable_from!r}: {exc}"
    if ok:
        return None
    return f"it can be swapped to only from versions {swappable_from}, not from {running}"


def downgrade(target: str, running: str) -> str | None:
    """Why going from ``running`` to ``target`` is refused as a rollback (an older
    release, DESIGN.md section 4), or None. Going back by hand stays possible on the
    appliance: ``sgw gateway upgrade --to`` the previous slot."""
    try:
        older = Version(target) < Version(running)
    except InvalidVersion:
        return None  # not comparable: the manifest's swappable_from decides
    if not older:
        return None
    return (
        f"release {target} is older than the running {running}: the agent refuses "
        "rollbacks (publish a newer release with the fix instead)"
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the agent --------------------------------------------------------------------------


class UpdateAgent:
    """One gateway's updates: the state machine, driven by ``check``."""

    def __init__(
        self,
        *,
        root: str,
        state_file: str,
        provider: ProviderLink,
        trust: ReleaseTrust,
        daemon: DaemonLink,
        timezone: str | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.root = root
        self.state_file = state_file
        self.provider = provider
        self.trust = trust
        self.daemon = daemon
        self.timezone = timezone
        self.clock = clock
        self.state: AgentState = state.load(state_file)
        self.swapped: str | None = None  # the slot swapped to in this process's lifetime
        self.swap_done = asyncio.Event()
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._decided: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()  # checks the socket asked for

    def recover(self) -> None:
        """At start: removes half-unpacked slots an interrupted install left."""
        install.remove_partials(self.root)

    def describe(self) -> dict[str, Any]:
        return {**self.state.describe(), "error": self.last_error}

    def settled(self) -> asyncio.Lock:
        """Held while a check runs (``async with agent.settled()`` waits for it)."""
        return self._lock

    async def check(
        self,
        *,
        version: str | None = None,
        now: bool = False,
        decided: asyncio.Future[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One pass: plan, decision, and whatever step is due; the state after it.
        ``decided`` is given the state once the pass has decided (before a download or a
        swap). Passes run one at a time, in the order they were asked for."""
        async with self._lock:
            self._decided = decided
            try:
                await self._pass(version, now)
                self.last_error = None
            except (SgwError, OSError) as exc:
                self.last_error = str(exc)
                LOG.warning("update agent: check failed: %s", exc)
            finally:
                self._decide()
                self._decided = None
        return self.describe()

    async def check_answer(self, *, version: str | None, now: bool) -> dict[str, Any]:
        """Starts a pass and answers once it has decided, so that the answer is not held
        up by a download or a swap. While another pass runs, this one is queued behind it
        (a "now" must not be lost to a pass that read the plan before it) and the answer,
        at once, says so."""
        busy = self._lock.locked()
        decided: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self.check(version=version, now=now, decided=decided))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)
        if busy:
            return {**self.describe(), "busy": True}
        try:
            return await asyncio.wait_for(asyncio.shield(decided), CHECK_ANSWER_S)
        except TimeoutError:
            return {**self.describe(), "busy": True}

    def _decide(self) -> None:
        if self._decided is not None and not self._decided.done():
            self._decided.set_result(self.describe())

    async def _pass(self, asked_version: str | None, asked_now: bool) -> None:
        await self._send_reports()
        running = await self.daemon.status()
        st = self.state
        if st.state == "swapping" and st.version is not None:
            # The agent stopped while the daemon swapped (or was about to): the daemon
            # says which release serves.
            await self._settle_swap(running, st.version)
        plan = await asyncio.to_thread(self.provider.plan)
        now = plan.now or (asked_now and asked_version in (None, plan.version))
        target = plan.version
        if target is None or target == running.version:
            if (
                st.version == running.version
                and st.version is not None
                and st.state not in ("done", state.IDLE)
            ):
                await self._set("done", pause_s=running.pause_s)
            return
        if st.version != target:
            self.state = st = AgentState(
                version=target, from_version=running.version, reports=st.reports
            )
        elif st.from_version != running.version:
            st.from_version = running.version
        if st.state in ("failed", "refused") and st.reason != "unreachable" and not now:
            return  # retried when the console says "now" again
        older = downgrade(target, running.version)
        if older is not None:
            await self._set("refused", reason="rollback", message=older)
            return
        if not worth_fetching(plan, now):
            await self._set(
                "waiting",
                message="a normal release under the emergency-only policy waits for "
                f"`sgw updates now {target}`",
            )
            return
        slot = await self._installed_slot(target)
        if slot is None:
            fetched = await self._fetch_and_install(target, running.version)
            if fetched is None:
                return
            slot = fetched
        severity = st.severity or "normal"
        tz = plan.timezone or self.timezone or "UTC"
        if not may_swap(plan, severity, now, self.clock(), tz):
            await self._set("waiting", message=f"the maintenance window ({tz}) is closed")
            return
        self._decide()
        await self._swap(slot, target)

    async def _installed_slot(self, target: str) -> str | None:
        """The slot of ``target`` if an earlier pass installed and recorded it and its
        files are intact (re-checked: a slot is never trusted on its name alone)."""
        st = self.state
        if st.state not in ("installed", "waiting", "swapping") or st.manifest is None:
            return None
        digest = str(st.manifest.get("tree_sha256", ""))
        if await asyncio.to_thread(install.slot_is_intact, self.root, target, digest):
            return str(install.slot_path(self.root, target))
        LOG.warning("update agent: installed slot of %s is damaged: fetching it again", target)
        return None

    async def _fetch_and_install(self, target: str, running: str) -> str | None:
        await self._set("downloading")
        self._decide()  # the answer to a check: what follows may take minutes
        faults.hit("downloading")
        try:
            release = await asyncio.to_thread(self.trust.fetch, target)
        except UpdateRefused as exc:
            await self._set("refused", reason=exc.reason, message=str(exc))
            return None
        if release.version != target:
            await self._set(
                "refused",
                reason="tampered",
                message=f"asked for release {target}, the trust returned {release.version}",
            )
            return None
        self.state.severity = release.severity
        self.state.manifest = release.manifest.to_json()
        await self._set("verified")
        why = compatible(release.manifest.swappable_from, running)
        if why is not None:
            await self._set("refused", reason="incompatible", message=f"release {target}: {why}")
            return None
        try:
            slot = await asyncio.to_thread(install.install, self.root, release)
        except UpdateRefused as exc:
            await self._set("refused", reason=exc.reason, message=str(exc))
            return None
        except OSError as exc:
            await self._set("failed", message=f"cannot install release {target}: {exc}")
            return None
        faults.hit("installed")
        await self._set("installed")
        return str(slot)

    async def _swap(self, slot: str, target: str) -> None:
        await self._set("swapping")
        faults.hit("swapping")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SWAP_WAIT_S
        while True:
            try:
                info = await self.daemon.swap(slot)
                break
            except HandoverRefusedError as exc:
                # A swap an agent since killed asked for may still run: once it ends, the
                # daemon serves the target, or a new swap is accepted.
                if "in progress" not in str(exc) or loop.time() > deadline:
                    await self._set("failed", message=f"swap to {target} refused: {exc}")
                    return
            except SgwError as exc:
                await self._set("failed", message=f"swap to {target} failed: {exc}")
                return
            await asyncio.sleep(SWAP_POLL_S)
            info = await self.daemon.status()
            if info.version == target:
                break
        faults.hit("swapped")
        if info.version != target:
            await self._set(
                "failed",
                message=f"after the swap to {slot} the daemon runs {info.version}, not {target}",
            )
            return
        self.swapped = slot
        self.swap_done.set()
        await self._set("done", pause_s=info.pause_s)

    async def _settle_swap(self, running: DaemonInfo, target: str) -> None:
        """Resolves a ``swapping`` state found at start: done if the daemon runs the target
        (the swap is idempotent), else back to installed (this pass decides again, and a
        swap still running is waited for then)."""
        if running.version == target:
            await self._set("done", pause_s=running.pause_s)
        else:
            self.state.state = "installed"
            state.save(self.state_file, self.state)

    async def _set(
        self,
        new: str,
        *,
        reason: str | None = None,
        message: str | None = None,
        pause_s: float | None = None,
    ) -> None:
        """Records a step (state file first), queues its report unless it repeats the
        last one, and sends what is queued."""
        st = self.state
        repeat = st.state == new and st.reason == reason
        st.state, st.reason, st.message, st.pause_s = new, reason, message, pause_s
        if not repeat and st.version is not None:
            st.reports.append(
                {
                    "version": st.version,
                    "from_version": st.from_version or "",
                    "state": new,
                    "reason": reason if reason is not None else message,
                    "pause_s": pause_s,
                    "at": self.clock().isoformat().replace("+00:00", "Z"),
                }
            )
        state.save(self.state_file, st)
        log = LOG.warning if new in ("failed", "refused") else LOG.info
        log(
            "update agent: %s %s%s",
            new,
            st.version,
            f": {message}" if message else "",
            extra={"release": st.version, "state": new, "reason": reason, "pause_s": pause_s},
        )
        if not repeat:
            await self._send_reports()

    async def _send_reports(self) -> None:
        """Sends the queued reports in order; stops at the first that fails (kept)."""
        st = self.state
        sent = 0
        for report in list(st.reports):
            try:
                await asyncio.to_thread(self.provider.report, report)
            except UpdateLinkError as exc:
                LOG.info("update agent: report kept for later: %s", exc)
                break
            sent += 1
        if sent:
            del st.reports[:sent]
            state.save(self.state_file, st)


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        LOG.error("update agent: check crashed", exc_info=task.exception())


# -- the real links ---------------------------------------------------------------------


class HttpProvider:
    """The provider's update endpoints over the gateway's signed HTTP client."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def plan(self) -> Plan:
        try:
            resp = self.http.get(PLAN_PATH)
        except httpx.HTTPError as exc:
            raise UpdateLinkError(f"cannot ask the provider for its update plan: {exc}") from exc
        if resp.status_code != 200:
            raise UpdateLinkError(
                f"the provider answered {resp.status_code} to {PLAN_PATH}: {resp.text[:200]}"
            )
        try:
            return Plan.from_json(resp.json())
        except (ValueError, KeyError, TypeError) as exc:
            raise UpdateLinkError(f"the provider's update plan is not understood: {exc}") from exc

    def report(self, report: dict[str, Any]) -> None:
        try:
            resp = self.http.post(REPORTS_PATH, json=report)
        except httpx.HTTPError as exc:
            raise UpdateLinkError(f"cannot report to the provider: {exc}") from exc
        if resp.status_code in (400, 422):  # it will never be accepted: dropped
            LOG.error("update agent: the provider rejected a report %s: %s", report, resp.text)
            return
        if resp.status_code >= 300:
            raise UpdateLinkError(f"the provider answered {resp.status_code} to a report")


class AdminSocketDaemon:
    """The daemon through its admin socket (sgw.gateway.admin_socket)."""

    def __init__(self, data_dir: str) -> None:
        self.path = admin_socket.socket_path(data_dir)

    async def status(self) -> DaemonInfo:
        answer = await admin_socket.call(self.path, {"op": "status"}, timeout=60)
        return _daemon_info(answer.get("daemon"))

    async def swap(self, slot: str) -> DaemonInfo:
        answer = await admin_socket.call(self.path, {"op": "upgrade", "release": slot})
        pause = answer.get("pause_s")
        return DaemonInfo(str(answer.get("version")), None if pause is None else float(pause))


def _daemon_info(daemon: Any) -> DaemonInfo:
    if not isinstance(daemon, dict) or not daemon.get("version"):
        raise UpdateLinkError("the gateway daemon does not say which version it runs")
    took_over = daemon.get("took_over") or {}
    pause = took_over.get("pause_s") if isinstance(took_over, dict) else None
    return DaemonInfo(str(daemon["version"]), None if pause is None else float(pause))


# -- the socket -------------------------------------------------------------------------


class AgentServer:
    """The agent's local socket (mode 0600): what the daemon's ``update`` command asks."""

    def __init__(self, agent: UpdateAgent | None, path: str, *, enabled: bool = True) -> None:
        self.agent = agent  # None until the gateway is activated
        self.path = path
        self.enabled = enabled  # [updates] enabled: False answers status only
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=_MAX_LINE)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await self._answer(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            op = req.get("op")
            if op not in ("check", "status"):
                raise ValueError(f"unknown op {op!r}; try check, status")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        if self.agent is None:
            return {
                "ok": False,
                "error": "the update agent waits for the gateway's activation (no credentials)",
            }
        if op == "status":
            agent = {"pid": os.getpid(), "version": version()}
            return {"ok": True, **self.agent.describe(), "agent": agent}
        if not self.enabled:
            return {
                "ok": False,
                "error": "updates are disabled on this gateway: set [updates] enabled = true "
                "in its gateway.toml and restart sgw-update-agent",
            }
        asked = req.get("version")
        answer = await self.agent.check_answer(
            version=None if asked is None else str(asked), now=bool(req.get("now"))
        )
        return {"ok": True, **answer}


# -- the process ------------------------------------------------------------------------

TrustFactory = Callable[[GatewayConfig, httpx.Client], ReleaseTrust]


def default_trust(config: GatewayConfig, http: httpx.Client) -> ReleaseTrust:
    """The TUF client (sgw.gateway.updates.trust), its metadata kept under the data
    directory (where activation pinned the root) so that rollback and freeze protection
    hold across reboots."""
    return tuf_trust.ReleaseTrust(
        metadata_dir(config.data_dir),
        Path(config.data_dir) / "updates" / "cache",
        str(http.base_url),
        http,
    )


async def run(config: GatewayConfig, trust_factory: TrustFactory = default_trust) -> int:
    """Runs the agent until SIGTERM; re-executes itself from ``<root>/current`` after a
    swap it made (the new release's agent takes over)."""
    import signal

    updates = config.updates
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = AgentServer(None, updates.socket, enabled=updates.enabled)
    await server.start()
    LOG.info("update agent listening", extra={"socket": updates.socket, "root": updates.root})
    try:
        credentials = read_credentials(config.data_dir)
        while credentials is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ACTIVATION_POLL_S)
            if stop.is_set():
                return 0
            credentials = read_credentials(config.data_dir)
        remote = config.remote
        url = remote.url if remote is not None else credentials.provider_url
        auth = GatewayAuth(load_or_create_key(config.data_dir), credentials.key_id)
        verify = tls_verify(remote) if remote is not None else True
        with httpx.Client(base_url=url, auth=auth, verify=verify, timeout=60.0) as http:
            agent = UpdateAgent(
                root=updates.root,
                state_file=state.state_path(config.data_dir),
                provider=HttpProvider(http),
                trust=trust_factory(config, http),
                daemon=AdminSocketDaemon(config.data_dir),
                timezone=credentials.timezone,
            )
            agent.recover()
            server.agent = agent
            if not updates.enabled:
                LOG.info("updates are disabled ([updates] enabled = false): checking nothing")
                await stop.wait()
                return 0
            while not stop.is_set() and agent.swapped is None:
                await agent.check()
                await _first(stop, agent.swap_done, timeout=updates.check_interval)
            if stop.is_set():
                return 0
            async with agent.settled():  # a check the socket started finishes first
                pass
    finally:
        await server.stop()
    _reexec(updates.root)
    return 0


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Returns once one of ``events`` is set, or after ``timeout`` seconds."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _reexec(root: str) -> None:
    """Replaces this process by the agent of the release ``<root>/current`` names."""
    python = os.path.join(root, "current", "bin", "python")
    if not os.access(python, os.X_OK):
        LOG.warning("update agent: %s is not runnable: exiting for a restart instead", python)
        return
    LOG.info("update agent: re-executing from the new release", extra={"python": python})
    logging.shutdown()
    os.execv(python, [python, *sys.orig_argv[1:]])


def main(argv: list[str] | None = None, trust_factory: TrustFactory = default_trust) -> int:
    """``python -m sgw.gateway.updates.agent --config FILE``."""
    from sgw.common.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m sgw.gateway.updates.agent",
        description="The gateway's update agent (docs/updates.md).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the gateway's TOML")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(config.log_level)
        return asyncio.run(run(config, trust_factory))
    except SgwError as exc:
        print(f"sgw update agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
