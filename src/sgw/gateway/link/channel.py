"""The gateway's end of the control channel (DESIGN.md section 3).

The provider never connects to a gateway: the gateway keeps one long-poll open,
``GET /v1/gateway/messages?wait=50``, signed like every request it makes, and the
control server holding it answers as soon as there are commands (or empty when the
wait ends). Each answer is a batch; the gateway records the new commands durably
(``ControlJournal``), acknowledges them with its next poll (``&ack=ID,...``), runs them
(``lane_of``: those on one volume, or on the gateway's settings, one at a time in the
order received; others side by side), keeps each reply in its outbox and sends it
(``POST /v1/gateway/messages/replies``) until the provider accepted it, also after a
restart. The provider delivers at least once; the journal's idempotency keys make every
command run once.

Reconnecting: a poll that fails quickly (refused connection, an error status, an empty
answer long before the wait was up) counts as an error and the next try waits a jittered,
exponentially growing time (and goes to the next known control server); a poll that was
held for a while and then ended, even by a dropped connection, is normal, and the next
one goes out at once.

Control servers the provider names in its answers are adopted only over a transport the
gateway's own configuration allows (``sgw.common.transport``): https; plain http only
where the provider URL is plain http too, and then to loopback or with
``remote.insecure_http``. Any other is ignored with a warning: a provider, or whoever
can alter its answers, cannot move the gateway's signed requests off TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import httpx

from sgw.common.backoff import jittered
from sgw.common.errors import ControlChannelError, SgwError
from sgw.common.transport import HTTPS, transport_refusal
from sgw.gateway.link.journal import Command, ControlJournal, Reply

LOG = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/gateway/messages"
REPLIES_PATH = "/v1/gateway/messages/replies"
# A poll answered in less than this (seconds) without commands, or failed that fast, was
# an error, not a long-poll that ran its course.
QUICK_S = 1.0
# Backoff after errors (seconds): doubling from the first to the cap, times a random
# factor in [0.5, 1) so that many gateways do not retry in step.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Control servers remembered from the provider's answers (to fail over to).
MAX_URLS = 16
# Refused control server URLs remembered so that each is warned about once (at most).
MAX_REFUSED = 64

Executor = Callable[[Command], Awaitable[dict[str, Any]]]
# Commands that change nothing: each runs on its own, beside whatever else runs.
READ_ONLY = frozenset({"describe", "diagnostics", "health_report"})


def lane_of(cmd: Command) -> str:
    """The lane a command runs in: commands of one lane run one at a time in the order
    received (a volume's create, snapshot and delete; the gateway's settings), lanes
    run side by side (a long drain of one volume holds up no other)."""
    if cmd.type in READ_ONLY:
        return f"command:{cmd.id}"
    target = cmd.args.get("volume") or cmd.args.get("name")
    if isinstance(target, str) and target:
        return f"volume:{target}"
    return "gateway"


def backoff(failures: int, rng: Callable[[], float] = random.random) -> float:
    """The wait before the next try after ``failures`` consecutive errors (seconds)."""
    return jittered(failures, BACKOFF_FIRST_S, BACKOFF_MAX_S, rng)


class ControlChannel:
    """Polls for commands, runs them through ``execute`` and delivers the replies.

    ``urls``: the provider's URL first, then other control servers; ``insecure_http``:
    ``remote.insecure_http`` (plain http beyond loopback allowed), for the servers the
    provider names.
    """

    def __init__(
        self,
        data_dir: str,
        urls: Sequence[str],
        execute: Executor,
        *,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
        insecure_http: bool = False,
        wait: float = 50.0,
        ready: asyncio.Event | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not urls:
            raise ValueError("the control channel needs the provider's URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.insecure_http = insecure_http
        # The provider's URL (the first) sets the floor: after https, never plain http.
        self.https_only = urllib.parse.urlsplit(self.urls[0]).scheme == HTTPS
        self._refused: set[str] = set()
        self.execute = execute
        self.wait = wait
        self.journal = ControlJournal(data_dir, clock=clock)
        self._ready = ready
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self._current = 0
        self._acks: list[str] = []
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[str, Command] = {}  # by id
        self._lanes: dict[str, deque[Command]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(
            auth=auth,
            verify=verify,
            transport=transport,
            timeout=httpx.Timeout(wait + 15.0, connect=5.0),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )
        self.connected = False
        self.server: str | None = None  # the control server that answered last
        self.stats = {"polls": 0, "errors": 0, "received": 0, "duplicates": 0, "executed": 0}

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def info(self) -> dict[str, Any]:
        """The channel's state for ``describe`` and diagnostics bundles."""
        return {
            "connected": self.connected,
            "server": self.server,
            "servers": list(self.urls),
            "stats": dict(self.stats),
            "replies_unsent": self.journal.unsent,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the journal and starts polling (once ``ready`` is set: the gateway is
        activated), running and replying."""
        to_run, cut_off = await asyncio.to_thread(self.journal.load)
        for reply in cut_off:
            LOG.warning("command cut off by a restart", extra={"command": reply.id})
        for cmd in to_run:
            self._queue.put_nowait(cmd)
        if self.journal.unsent:
            self._outbox_ready.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll_loop(), name="control-poll"),
            loop.create_task(self._run_loop(), name="control-run"),
            loop.create_task(self._reply_loop(), name="control-reply"),
        ]

    async def stop(self, grace: float = 5.0) -> None:
        """Stops polling; lets a running command finish for up to ``grace`` seconds (a
        command cut off is answered as failed after the restart); sends what it can."""
        poll, run, send = self._tasks or (None, None, None)
        if poll is not None:
            poll.cancel()
        if run is not None and self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._idle()), grace)
        tasks = [*self._tasks, *self._lane_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if send is not None and self.journal.unsent:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_replies(), 2.0)
        await self._http.aclose()

    async def _idle(self) -> None:
        while self._running:
            await asyncio.sleep(0.05)

    # -- polling -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        if self._ready is not None:
            await self._ready.wait()
        failures = 0
        while True:
            acks, self._acks = self._acks, []
            params: dict[str, str] = {"wait": f"{self.wait:g}"}
            if acks:
                params["ack"] = ",".join(acks)
            url = self.url
            started = time.monotonic()
            self.stats["polls"] += 1
            try:
                resp = await self._http.get(url + MESSAGES_PATH, params=params)
                if resp.status_code != 200:
                    raise ControlChannelError(
                        f"the control server at {url} answered {resp.status_code}: {_message(resp)}"
                    )
                doc = resp.json()
                commands = [_command(m) for m in doc["messages"]]
            except (httpx.HTTPError, ControlChannelError, ValueError, KeyError, TypeError) as exc:
                self._acks = acks + self._acks  # acknowledged with the next poll instead
                elapsed = time.monotonic() - started
                if elapsed >= QUICK_S:  # held, then ended: a long-poll that ran its course
                    LOG.info("control poll ended: %s", exc or type(exc).__name__)
                    continue
                failures += 1
                self._error(url, exc, failures)
                await self._sleep(backoff(failures, self._rng))
                continue
            elapsed = time.monotonic() - started
            self._learn(doc)
            if not self.connected:
                self.connected = True
                LOG.info("control channel connected", extra={"server": self.server})
            if commands:
                failures = 0
                await self._receive(commands)
            elif elapsed < min(QUICK_S, self.wait / 2):
                failures += 1  # answered empty at once: something is wrong over there
                self._error(url, ControlChannelError("empty answer before the wait"), failures)
                await self._sleep(backoff(failures, self._rng))
            else:
                failures = 0

    def _error(self, url: str, exc: BaseException, failures: int) -> None:
        self.stats["errors"] += 1
        if self.connected:
            self.connected = False
        if len(self.urls) > 1:
            self._current = (self._current + 1) % len(self.urls)
        LOG.warning(
            "control poll failed: %s",
            exc or type(exc).__name__,
            extra={"server": url, "failures": failures, "next": self.url},
        )

    def _learn(self, doc: dict[str, Any]) -> None:
        """Remembers the control servers the provider names (to fail over to)."""
        server = doc.get("server")
        self.server = str(server) if server else self.url
        for item in doc.get("servers") or []:
            url = str(item).rstrip("/")
            if not url or url in self.urls or len(self.urls) >= MAX_URLS:
                continue
            why = self.refusal(url)
            if why is None:
                self.urls.append(url)
            elif url not in self._refused and len(self._refused) < MAX_REFUSED:
                self._refused.add(url)
                LOG.warning(
                    "control server %s ignored: %s",
                    url,
                    why,
                    extra={"server": url, "provider": self.urls[0]},
                )

    def refusal(self, url: str) -> str | None:
        """Why a control server the provider named is not adopted, or None if it is."""
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return "not a URL"
        if parts.query or parts.fragment or parts.username or parts.password:
            return "not a base URL (it has a query, fragment or user name)"
        return transport_refusal(url, insecure_http=self.insecure_http, https_only=self.https_only)

    async def _receive(self, commands: list[Command]) -> None:
        try:
            new, dups = await self.journal.admit(commands)
        except OSError as exc:  # not acknowledged: the provider delivers them again
            LOG.error("control journal: cannot record commands: %s", exc)
            await self._sleep(backoff(3, self._rng))
            return
        self.stats["received"] += len(new)
        self.stats["duplicates"] += len(dups)
        self._acks.extend(c.id for c in commands)
        for cmd in new:
            LOG.info(
                "command received",
                extra={"command": cmd.id, "type": cmd.type, "key": cmd.key},
            )
            self._queue.put_nowait(cmd)
        for cmd in dups:
            LOG.info("command delivered again: not run again", extra={"command": cmd.id})
        if dups and self.journal.unsent:
            self._outbox_ready.set()

    # -- running -------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        """Hands each command to its lane (``lane_of``), starting the lane if idle."""
        while True:
            cmd = await self._queue.get()
            lane = lane_of(cmd)
            queue = self._lanes.get(lane)
            if queue is not None:
                queue.append(cmd)
                continue
            queue = self._lanes[lane] = deque([cmd])
            task = asyncio.get_running_loop().create_task(
                self._run_lane(lane, queue), name=f"control-{lane}"
            )
            self._lane_tasks.add(task)
            task.add_done_callback(self._lane_tasks.discard)

    async def _run_lane(self, lane: str, queue: deque[Command]) -> None:
        try:
            while queue:
                cmd = queue[0]
                self._running[cmd.id] = cmd
                try:
                    reply = await self._run(cmd)
                    failures = 0
                    while True:
                        try:
                            await self.journal.finish(cmd, reply)
                            break
                        except OSError as exc:  # a full or failing disk: keep the reply
                            failures += 1
                            LOG.error("control journal: cannot keep a reply: %s", exc)
                            await self._sleep(backoff(failures, self._rng))
                finally:
                    self._running.pop(cmd.id, None)
                    queue.popleft()
                self._outbox_ready.set()
        finally:
            if self._lanes.get(lane) is queue:
                del self._lanes[lane]

    async def _run(self, cmd: Command) -> Reply:
        if self._clock() > cmd.expires:
            return Reply(cmd.id, "failed", None, "the command arrived after its deadline")
        try:
            await self.journal.start(cmd)
        except OSError as exc:  # not started: cannot promise it runs once
            return Reply(cmd.id, "failed", None, f"the gateway cannot record the command: {exc}")
        started = time.monotonic()
        try:
            result = await self.execute(cmd)
        except SgwError as exc:
            LOG.warning("command refused: %s", exc, extra={"command": cmd.id, "type": cmd.type})
            return Reply(cmd.id, "failed", None, str(exc) or type(exc).__name__)
        except Exception as exc:
            LOG.exception("command failed", extra={"command": cmd.id, "type": cmd.type})
            return Reply(cmd.id, "failed", None, f"internal error on the gateway: {exc!r}")
        self.stats["executed"] += 1
        LOG.info(
            "command done",
            extra={
                "command": cmd.id,
                "type": cmd.type,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return Reply(cmd.id, "succeeded", result, None)

    # -- replies -------------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        failures = 0
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self.journal.unsent:
                try:
                    await self._send_replies()
                    failures = 0
                except (httpx.HTTPError, ControlChannelError, ValueError) as exc:
                    failures += 1
                    self._error(self.url, exc, failures)
                    await self._sleep(backoff(failures, self._rng))

    async def _send_replies(self) -> None:
        batch = self.journal.outbox()
        if not batch:
            return
        url = self.url
        resp = await self._http.post(
            url + REPLIES_PATH, json={"replies": [r.to_json() for r in batch]}
        )
        if resp.status_code != 200:
            raise ControlChannelError(
                f"the control server at {url} refused replies: {resp.status_code} {_message(resp)}"
            )
        doc = resp.json()
        refused = [str(i) for i in doc.get("refused", [])]
        if refused:
            LOG.warning(
                "replies refused by the provider (unknown commands)", extra={"ids": refused}
            )
        await self.journal.sent([str(i) for i in doc.get("accepted", [])] + refused)


def _command(doc: dict[str, Any]) -> Command:
    expires = datetime.fromisoformat(str(doc["expires"]).replace("Z", "+00:00")).timestamp()
    args = doc.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("a command's args must be an object")
    return Command(
        id=str(doc["id"]),
        type=str(doc["type"]),
        args=args,
        key=str(doc.get("idempotency_key") or doc["id"]),
        expires=expires,
    )


def _message(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])[:300]
    except ValueError:
        pass
    return resp.text[:300]
