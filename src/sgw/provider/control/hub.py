"""One control server's hub: the gateways' held long-polls, registration, and doorbells.

Messages live in the database (``ControlStore``); the hub only decides *when* a held poll
looks at them. A poll registers its waiter, then reads the gateway's pending messages,
and waits only if there were none; a message posted to any server rings the doorbell of
the server that holds the gateway:

- held here: the poll wakes at once;
- held by a peer with a fresh registration: one HTTP call to that peer
  (``POST /v1/control/doorbell``, authenticated with the shared secret);
- the registration is stale, missing or the peer does not hold it (any more): the
  doorbell is broadcast to every live peer.

A command posted to the server that holds its gateway's poll, while that poll waits with
nothing else pending, is handed to the poll directly (the database has it already): the
poll answers without reading it back, and the delivery is recorded after the answer
(``mark_delivered_many``). A hand-over that cannot be delivered (the connection went, a
doorbell rang meanwhile) is left to the database like any other message.

A doorbell that gets lost costs latency, never a message: each server looks for pending
messages of the gateways it holds once per ``sweep_s`` and wakes them, and a message
delivered but not acknowledged is delivered again after ``redeliver_after_s``. Delivery
is therefore at least once; the gateway executes each idempotency key once.

Replies arrive at whichever server the gateway sends them to; that server records the
first reply of a message, runs the finished-hook, wakes its own waiters and rings the
server that accepted the command (``origin_server``), whose waiters are woken too (and
otherwise see the result within ``sweep_s``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from sgw.common.errors import GatewayOfflineError
from sgw.provider.control import peers
from sgw.provider.control.store import (
    DELIVERED,
    Completion,
    ControlStore,
    MessageInfo,
    NewMessage,
)
from sgw.provider.db.batching import GroupRunner
from sgw.provider.db.models import utcnow

LOG = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
FinishedHook = Callable[[MessageInfo], Awaitable[None]]
# A gateway's reply: message id, succeeded, result, error.
Reply = tuple[str, bool, dict[str, Any] | None, str | None]
# Threads for the hub's database reads (writes go through one writer thread, in groups:
# SQLite serialises writers anyway, and one transaction per group costs less everywhere).
_DB_THREADS = 4


@dataclass(frozen=True)
class HubTimings:
    """Intervals and limits of the hub (seconds unless said otherwise)."""

    server_heartbeat_s: float = 2.0  # a server writes its heartbeat this often
    server_ttl_s: float = 10.0  # and is gone without one for this long
    # A gateway that has not polled here for this long since its last poll ended is
    # dropped from the registration table (a gone gateway shows offline); checked every
    # cleanup_s. While its server's heartbeat is recent a registration is fresh.
    silent_s: float = 15.0
    cleanup_s: float = 5.0
    sweep_s: float = 1.0  # pending messages, expiries and waiters are checked this often
    redeliver_after_s: float = 10.0  # delivered, not acknowledged: delivered again
    # A delivered message is expired this long after its deadline (the gateway refuses to
    # start one past its deadline; this covers a clock skew up to the signing window).
    delivered_grace_s: float = 300.0
    peer_timeout_s: float = 2.0
    max_wait_s: float = 60.0  # longest hold of a poll
    batch: int = 32  # messages per poll answer
    keep_finished_s: float = 7 * 86400.0  # finished messages are kept this long
    # A gateway whose previous poll here ended longer ago than this may have polled
    # another server meanwhile: its registration is written again.
    reregister_gap_s: float = 2.0
    # A poll is held between (1 - this) and 1 times the wait it asks for.
    wait_jitter: float = 0.2


class _Poll:
    """A held poll: rung by a doorbell, superseded by a newer poll of its gateway, or
    gone with its connection."""

    __slots__ = ("future", "gone", "handed", "rung", "superseded")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.rung = False
        self.superseded = False
        self.gone = False
        self.handed: list[MessageInfo] = []  # posted here while it waited (ControlHub.post)

    def ring(self) -> None:
        self.rung = True
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


def _wake(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


class ControlHub:
    """Holds this server's gateway polls and routes doorbells between servers."""

    def __init__(
        self,
        store: ControlStore,
        *,
        server_id: str,
        url: str,
        secret: bytes,
        verify: ssl.SSLContext | bool = True,
        timings: HubTimings | None = None,
        on_finished: FinishedHook | None = None,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.url = url.rstrip("/")
        self.secret = secret
        self.t = timings or HubTimings()
        self.on_finished = on_finished
        self._verify = verify
        self._held: dict[str, _Poll] = {}
        self._last_poll: dict[str, float] = {}  # gateway -> monotonic end of its last poll
        self._registered: set[str] = set()
        # Gateways whose last look found nothing pending: their next poll skips the
        # database until a doorbell, a command posted here or the sweeper says otherwise.
        self._clean: set[str] = set()
        self._to_register: set[str] = set()
        self._register_now = asyncio.Event()
        # Waiters for commands: woken with the finished command (or None: look it up).
        self._waiters: dict[str, set[asyncio.Future[MessageInfo | None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            _DB_THREADS, thread_name_prefix="control-db"
        )
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control-w")
        self._takes = self._group(self._take_many)
        self._completions = self._group(self._complete_many)
        self._posts = self._group(self._post_many)
        self._marks = self._group(self._mark_many)
        self._background: set[asyncio.Task[None]] = set()
        self._doorbell: peers.Doorbell | None = None
        self.peer_urls: list[str] = []  # live servers, from the last heartbeat
        self.stats = {"polls": 0, "delivered": 0, "doorbells_sent": 0, "broadcasts": 0}

    def _group(self, run: Callable[..., list[R | BaseException]]) -> GroupRunner[Any, R]:
        """Group writes of ``run`` (called with ``nowait=True`` first on SQLite: on the
        loop's thread when it can be done at once; see sgw.provider.db.raw)."""
        now = functools.partial(run, nowait=True) if self.store.dialect == "sqlite" else None
        return GroupRunner(run, self._writer, run_now=now)

    @property
    def held(self) -> int:
        """Gateways whose poll this server holds now."""
        return len(self._held)

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A read (or a write that must not wait behind the groups) in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def _write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A write on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(fn, *args, **kwargs))

    def _take_many(
        self, polls: list[tuple[str, Sequence[str], bool]], nowait: bool = False
    ) -> list[list[MessageInfo] | BaseException]:
        return self.store.take_pending_many(
            polls,
            utcnow(),
            redeliver_after_s=self.t.redeliver_after_s,
            limit=self.t.batch,
            nowait=nowait,
        )

    def _complete_many(
        self, replies: list[Completion], nowait: bool = False
    ) -> list[tuple[MessageInfo | None, bool] | BaseException]:
        return self.store.complete_many(replies, utcnow(), nowait=nowait)

    def _post_many(
        self, items: list[NewMessage], nowait: bool = False
    ) -> list[tuple[MessageInfo, bool] | BaseException]:
        return self.store.post_many(items, utcnow(), nowait=nowait)

    def _mark_many(
        self, message_ids: list[str], nowait: bool = False
    ) -> list[BaseException | None]:
        self.store.mark_delivered_many(message_ids, utcnow(), nowait=nowait)
        return [None] * len(message_ids)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Announces the server and starts the background loops."""
        self._doorbell = peers.Doorbell(
            self.secret, self.server_id, timeout_s=self.t.peer_timeout_s, verify=self._verify
        )
        await self._heartbeat()
        loop = asyncio.get_running_loop()
        for name, coro in (
            ("control-heartbeat", self._heartbeat_loop()),
            ("control-registrar", self._registrar_loop()),
            ("control-sweeper", self._sweep_loop()),
        ):
            self._tasks.append(loop.create_task(coro, name=name))
        LOG.info("control server started", extra={"server": self.server_id, "url": self.url})

    def drain(self) -> None:
        """The server is about to stop: every held poll is answered now (empty, or with
        what the database holds for it) and every new one at once, so that its gateways
        go to another server straight away and the HTTP server, which waits for open
        requests before it stops, is not kept waiting by long-polls."""
        self._stopping = True
        for poll in list(self._held.values()):
            poll.ring()

    async def stop(self) -> None:
        """Answers every held poll (``drain``), stops the loops and withdraws the server
        from the registry so that its gateways' commands go elsewhere at once."""
        self.drain()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._background:  # deliveries being recorded
            await asyncio.wait(self._background, timeout=self.t.peer_timeout_s)
        try:
            await self._write(self.store.remove_server, self.server_id)
        except Exception as exc:  # the database may be gone too; peers time us out
            LOG.warning("control server: cannot withdraw from the registry: %s", exc)
        if self._doorbell is not None:
            await self._doorbell.aclose()
        self._pool.shutdown(wait=False)
        self._writer.shutdown(wait=False)
        LOG.info("control server stopped", extra={"server": self.server_id})

    # -- gateways ------------------------------------------------------------------------

    async def poll(
        self,
        gateway_id: str,
        wait: float,
        ack: Sequence[str] = (),
        disconnected: Callable[[], Awaitable[None]] | None = None,
        *,
        ends_after_answer: bool = False,
    ) -> list[MessageInfo]:
        """The gateway's long-poll: its pending messages, at once if there are any, else
        as soon as one arrives, else none after ``wait`` seconds. ``ack``: messages of
        earlier answers the gateway holds durably now. ``disconnected`` returns when the
        gateway's connection is gone: the poll ends at once (taking nothing), and unless
        the gateway polls again soon its registration is dropped, so that it shows
        offline at once rather than when the registration goes stale.
        ``ends_after_answer``: ``disconnected`` also returns once the answer is sent (an
        ASGI ``receive`` does), so its watcher is left to end by itself rather than
        cancelled (a cancelled task leaves a cycle of objects for the collector, per
        poll)."""
        self.stats["polls"] += 1
        previous = self._held.get(gateway_id)
        if previous is not None:  # the gateway gave up on it (a broken connection)
            previous.superseded = True
            previous.ring()
        poll = _Poll()
        self._held[gateway_id] = poll
        last = self._last_poll.get(gateway_id)
        if last is None or time.monotonic() - last >= self.t.reregister_gap_s:
            self._clean.discard(gateway_id)  # it may have been elsewhere meanwhile
        self._note(gateway_id)
        loop = asyncio.get_running_loop()
        hold = min(max(wait, 0.0), self.t.max_wait_s)
        # Ended a little early at random: polls that began together (many gateways back
        # after an outage) do not all come back at the same moment each time.
        hold *= random.uniform(1.0 - self.t.wait_jitter, 1.0)
        deadline = loop.time() + hold
        watch = None if disconnected is None else loop.create_task(_watch(disconnected, poll))
        acks = list(ack)
        try:
            while True:
                poll.rung = False
                messages: list[MessageInfo] = []
                if acks or gateway_id not in self._clean:
                    # Acknowledgements of a gateway known to have nothing else pending
                    # are written without looking for messages.
                    look = gateway_id not in self._clean
                    self._clean.add(gateway_id)  # a ring from now on takes it out again
                    messages = await self._takes.submit((gateway_id, acks, look))
                    acks = []
                    if len(messages) >= self.t.batch:
                        self._clean.discard(gateway_id)
                if messages or poll.superseded or self._stopping:
                    self.stats["delivered"] += len(messages)
                    return messages
                if poll.rung:
                    continue  # a doorbell rang while the database was read
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                poll.future = loop.create_future()
                timer = loop.call_later(remaining, _wake, poll.future)
                try:
                    await poll.future
                finally:
                    timer.cancel()
                    poll.future = None
                if not poll.rung or poll.gone:
                    return []
                if poll.handed:
                    handed, poll.handed = poll.handed, []
                    if poll.superseded or self._stopping:
                        self.ring_local([gateway_id])  # the newer poll reads the database
                        return []
                    if gateway_id in self._clean:
                        self.stats["delivered"] += len(handed)
                        return self._delivered(handed)
                    # A doorbell rang meanwhile: the look finds these with the others.
        finally:
            if poll.handed:  # not delivered: the gateway's next poll reads the database
                poll.handed = []
                self.ring_local([gateway_id])
            if watch is not None and not ends_after_answer:
                watch.cancel()
            if self._held.get(gateway_id) is poll:
                del self._held[gateway_id]
            ended = self._last_poll[gateway_id] = time.monotonic()
            if poll.gone and not self._stopping:
                loop.call_later(
                    self.t.reregister_gap_s,
                    lambda: loop.create_task(self._maybe_gone(gateway_id, ended)),
                )

    def _delivered(self, handed: list[MessageInfo]) -> list[MessageInfo]:
        """Messages handed to a poll, as delivered now; the delivery is written after the
        answer (the message stays pending until then: at worst delivered again)."""
        now = utcnow()
        out = [
            dataclasses.replace(m, status=DELIVERED, delivered=now, deliveries=m.deliveries + 1)
            for m in handed
        ]
        for m in out:
            self._spawn(self._mark(m.id))
        return out

    async def _mark(self, message_id: str) -> None:
        try:
            await self._marks.submit(message_id)
        except Exception as exc:  # it is delivered again after redeliver_after_s
            LOG.warning("control: cannot record a delivery: %s", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _hand_over(self, info: MessageInfo) -> bool:
        """Hands a message just posted to its gateway's poll if it is held here and waits
        with nothing else pending; True if it did (the poll answers at once)."""
        poll = self._held.get(info.gateway_id)
        if (
            poll is None
            or info.gateway_id not in self._clean
            or poll.future is None
            or poll.future.done()
            or poll.superseded
            or poll.gone
        ):
            return False
        poll.handed.append(info)
        poll.ring()
        return True

    async def _maybe_gone(self, gateway_id: str, ended: float) -> None:
        """The gateway's connection closed when its poll ``ended``: unless it polled here
        again since, it is gone (or elsewhere, which registered it anew)."""
        if gateway_id in self._held or self._last_poll.get(gateway_id) != ended:
            return
        self._registered.discard(gateway_id)
        try:
            await self._write(self.store.unregister, self.server_id, gateway_id)
        except Exception as exc:
            LOG.warning("control: cannot unregister a gone gateway: %s", exc)
            return
        LOG.info("gateway disconnected", extra={"gateway": gateway_id})

    def _note(self, gateway_id: str) -> None:
        """Registers the gateway as held here, unless it surely is already."""
        last = self._last_poll.get(gateway_id)
        if (
            gateway_id in self._registered
            and last is not None
            and time.monotonic() - last < self.t.reregister_gap_s
        ):
            return
        self._to_register.add(gateway_id)
        self._register_now.set()

    async def reply(
        self,
        gateway_id: str,
        replies: Sequence[tuple[str, bool, dict[str, Any] | None, str | None]],
    ) -> tuple[list[str], list[str]]:
        """Records replies ``(message id, succeeded, result, error)``; returns the ids
        accepted and those refused (no such message of this gateway)."""
        outcomes = await asyncio.gather(
            *(
                self._completions.submit(Completion(gateway_id, mid, ok, result, error))
                for mid, ok, result, error in replies
            )
        )
        accepted: list[str] = []
        refused: list[str] = []
        origins: dict[str, list[str]] = {}
        for (message_id, *_rest), (info, changed) in zip(replies, outcomes, strict=True):
            if info is None:
                refused.append(message_id)
                continue
            accepted.append(message_id)
            if not changed:
                continue
            LOG.info(
                "command finished",
                extra={
                    "command": info.id,
                    "type": info.type,
                    "gateway": gateway_id,
                    "status": info.status,
                    "error": info.error,
                },
            )
            await self._finished(info)
            if info.origin_server and info.origin_server != self.server_id:
                origins.setdefault(info.origin_server, []).append(info.id)
        for origin, ids in origins.items():
            asyncio.get_running_loop().create_task(self._ring_server(origin, messages=ids))
        return accepted, refused

    async def _finished(self, info: MessageInfo) -> None:
        """Runs the follow-up of a command that just finished, then wakes its waiters."""
        if self.on_finished is not None:
            try:
                await self.on_finished(info)
            except Exception:
                LOG.exception("command follow-up failed", extra={"command": info.id})
        self.notify_messages([info.id], info)

    # -- admins --------------------------------------------------------------------------

    async def is_online(self, gateway_id: str) -> bool:
        """True if some server holds the gateway's poll (as far as the registry says)."""
        if gateway_id in self._held:
            return True
        holder = await self._db(self.store.holder, gateway_id, utcnow(), self.t.server_ttl_s)
        return holder is not None and holder.fresh

    async def check_online(self, gateway_id: str) -> None:
        """GatewayOfflineError unless some server holds the gateway's poll."""
        if not await self.is_online(gateway_id):
            raise GatewayOfflineError(
                f"gateway {gateway_id} is offline: no control server holds its connection "
                "(check that it runs and reaches the provider; `sgw gateways describe` "
                "shows when it was last seen)"
            )

    async def post(
        self,
        account_id: str,
        gateway_id: str,
        type_: str,
        args: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        ttl_s: float,
        require_online: bool = True,
        wait: float = 0.0,
    ) -> tuple[MessageInfo, bool]:
        """Stores a command and rings the doorbell of the server holding the gateway.
        With ``require_online``, a gateway no server holds is refused (nothing stored).
        With ``wait``, returns once it finished or after that many seconds. Returns the
        message and whether it is new (not a retry of an idempotency key)."""
        if require_online:
            await self.check_online(gateway_id)
        info, created = await self._posts.submit(
            NewMessage(account_id, gateway_id, type_, args, idempotency_key, ttl_s, self.server_id)
        )
        if created:
            LOG.info(
                "command posted",
                extra={"command": info.id, "type": type_, "gateway": gateway_id},
            )
        if info.finished:
            return info, created
        # Waiting starts before the doorbell rings: no outcome can slip past.
        future = self._waiter(info.id) if wait > 0 else None
        try:
            if not (created and self._hand_over(info)):
                await self.route(gateway_id)
            if future is not None:
                info = await self.wait_finished(
                    account_id, gateway_id, info.id, wait, known=info, future=future
                )
        finally:
            if future is not None:
                self._unwait(info.id, future)
        return info, created

    def _waiter(self, message_id: str) -> asyncio.Future[MessageInfo | None]:
        future: asyncio.Future[MessageInfo | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(message_id, set()).add(future)
        return future

    def _unwait(self, message_id: str, future: asyncio.Future[MessageInfo | None]) -> None:
        waiters = self._waiters.get(message_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[message_id]

    async def cancel(self, account_id: str, gateway_id: str, message_id: str) -> MessageInfo:
        """Expires a command the gateway has not acknowledged yet (and runs its follow-up);
        one the gateway took already is returned unchanged."""
        info, changed = await self._write(
            self.store.cancel, account_id, gateway_id, message_id, utcnow()
        )
        if changed:
            LOG.info("command cancelled", extra={"command": info.id, "gateway": gateway_id})
            await self._finished(info)
        return info

    async def wait_finished(
        self,
        account_id: str,
        gateway_id: str,
        message_id: str,
        wait: float,
        *,
        known: MessageInfo | None = None,
        future: asyncio.Future[MessageInfo | None] | None = None,
    ) -> MessageInfo:
        """The command, once finished or after ``wait`` seconds, whichever comes first.
        ``known``: the command as just read, with ``future`` registered before that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), self.t.max_wait_s)
        if future is None:
            future = self._waiter(message_id)
        info = known
        try:
            while True:
                if info is None:
                    info = await self._db(self.store.get, account_id, gateway_id, message_id)
                remaining = deadline - loop.time()
                if info.finished or remaining <= 0:
                    return info
                timer = loop.call_later(remaining, _wake, future)
                try:
                    woken = await future
                finally:
                    timer.cancel()
                # Armed again before anything else runs: no outcome slips past.
                self._unwait(message_id, future)
                future = self._waiter(message_id)
                info = woken if woken is not None and woken.finished else None
        finally:
            self._unwait(message_id, future)

    def notify_messages(self, message_ids: Iterable[str], info: MessageInfo | None = None) -> None:
        """Wakes whoever waits here for these commands (with ``info``: its outcome)."""
        for message_id in message_ids:
            for future in list(self._waiters.get(message_id, ())):
                if not future.done():
                    future.set_result(info)

    def ring_local(self, gateway_ids: Iterable[str]) -> list[str]:
        """Wakes the held polls of these gateways (or has their next poll here look for
        messages); returns those held here."""
        held = []
        for gateway_id in gateway_ids:
            self._clean.discard(gateway_id)
            poll = self._held.get(gateway_id)
            if poll is not None:
                poll.ring()
                held.append(gateway_id)
        return held

    # -- doorbells between servers -------------------------------------------------------

    async def route(self, gateway_id: str) -> bool:
        """Rings the gateway's holder (here, the registered peer, else every live peer);
        True if some server said it holds the gateway."""
        if self.ring_local([gateway_id]):
            return True
        holder = await self._db(self.store.holder, gateway_id, utcnow(), self.t.server_ttl_s)
        tried = {self.server_id}
        if holder is not None and holder.fresh and holder.server_id != self.server_id:
            tried.add(holder.server_id)
            if holder.url and gateway_id in await self._ring(holder.url, gateways=[gateway_id]):
                return True
        live = await self._db(self.store.live_servers, utcnow(), self.t.server_ttl_s)
        targets = [url for sid, url in live if sid not in tried]
        if not targets:
            return False
        self.stats["broadcasts"] += 1
        answers = await asyncio.gather(*(self._ring(u, gateways=[gateway_id]) for u in targets))
        return any(gateway_id in a for a in answers)

    async def _ring_server(self, server_id: str, *, messages: list[str]) -> None:
        live = await self._db(self.store.live_servers, utcnow(), self.t.server_ttl_s)
        for sid, url in live:
            if sid == server_id:
                await self._ring(url, messages=messages)

    async def _ring(
        self, url: str, *, gateways: Sequence[str] = (), messages: Sequence[str] = ()
    ) -> list[str]:
        """One doorbell call to a peer; the gateways it holds (empty if it failed)."""
        if self._doorbell is None:
            return []
        self.stats["doorbells_sent"] += 1
        return await self._doorbell.ring(url, gateways=gateways, messages=messages)

    # -- background ----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        now = utcnow()
        await self._write(self.store.server_heartbeat, self.server_id, self.url, now)
        live = await self._db(self.store.live_servers, now, self.t.server_ttl_s)
        self.peer_urls = [url for _sid, url in live]

    async def _heartbeat_loop(self) -> None:
        last_refresh = time.monotonic()
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(self.t.server_heartbeat_s)
            try:
                await self._heartbeat()
                now = time.monotonic()
                if now - last_refresh >= self.t.cleanup_s:
                    last_refresh = now
                    await self._drop_silent()
                if now - last_purge >= 600:
                    last_purge = now
                    before = utcnow() - timedelta(seconds=self.t.keep_finished_s)
                    await self._write(self.store.purge_messages, before)
                    await self._write(self.store.purge_servers, utcnow() - timedelta(hours=1))
            except Exception as exc:
                LOG.warning("control heartbeat failed: %s", exc)

    async def _drop_silent(self) -> None:
        """Unregisters the gateways that stopped polling here (gone, or elsewhere now:
        the delete only removes a registration that still names this server)."""
        now = time.monotonic()
        silent = [
            g
            for g, last in self._last_poll.items()
            if g not in self._held and now - last > self.t.silent_s
        ]
        for gateway_id in silent:
            del self._last_poll[gateway_id]
            self._clean.discard(gateway_id)
        gone = [g for g in silent if g in self._registered]
        self._registered.difference_update(silent)
        if gone:
            await self._write(self.store.unregister_many, self.server_id, gone)

    async def _registrar_loop(self) -> None:
        while True:
            await self._register_now.wait()
            await asyncio.sleep(0.02)  # gather a burst of new polls into one write
            self._register_now.clear()
            batch, self._to_register = self._to_register, set()
            if not batch:
                continue
            try:
                await self._write(self.store.register, self.server_id, batch, utcnow())
                self._registered |= batch
            except Exception as exc:
                LOG.warning("control registration failed: %s", exc)
                self._to_register |= batch
                await asyncio.sleep(1.0)
                self._register_now.set()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.t.sweep_s)
            try:
                await self._sweep()
            except Exception as exc:
                LOG.warning("control sweep failed: %s", exc)

    async def _sweep(self) -> None:
        # SQLite: the write-ahead log copied into the database file (no commit does it;
        # see sgw.provider.db.schema), from a reader thread: writers go on meanwhile.
        await self._db(self.store.checkpoint)
        now = utcnow()
        for info in await self._write(
            self.store.expire_due, now, delivered_grace_s=self.t.delivered_grace_s
        ):
            LOG.warning(
                "command expired",
                extra={"command": info.id, "type": info.type, "gateway": info.gateway_id},
            )
            await self._finished(info)
        if self._held:
            pending = await self._db(
                self.store.gateways_with_pending, now, redeliver_after_s=self.t.redeliver_after_s
            )
            self.ring_local(pending)
        if self._waiters:
            done = await self._db(self.store.get_many, list(self._waiters))
            for m in done:
                if m.finished:
                    self.notify_messages([m.id], m)


async def _watch(disconnected: Callable[[], Awaitable[None]], poll: _Poll) -> None:
    await disconnected()
    poll.gone = True
    poll.ring()
