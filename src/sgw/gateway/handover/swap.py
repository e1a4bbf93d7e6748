"""The blue-green swap of the gateway daemon (DESIGN.md section 5, docs/adr/0006-swap.md).

Blue is the running daemon; it starts green (the new release's ``sgw gateway serve
--standby-fd N``) beside itself and talks to it over a socket pair:

    green -> hello (its version, the record versions it reads)  blue refuses if it cannot
    blue  -> begin         green indexes the write log while blue serves
    green -> indexed       blue stops its destager at a safe point, its control channel,
    blue  -> quiet         restores and map loads, and saves the registry
    green -> ready         green loaded the cached volumes' maps
          blue flushes while serving, stops reading (the fence), answers what it read,
          flushes the rest
    blue  -> handover      the record and every socket (NBD connections and listeners,
                           the activation page, the admin socket) and the data dir lock
    green -> prepared      green caught up the log and adopted the sockets, fenced
    blue  -> go            the point of no return: blue never serves again
    green -> owned         green reads again (the pause ends), starts everything else

Until blue sends ``go`` green has read, sent and written nothing, so any failure before
it (green refusing, dying, not answering in time, blue unable to fence) ends with green
killed and blue serving again as before. After ``go`` blue exits; if green then dies,
the service manager restarts the daemon, which recovers from the log and reattaches.
Once green said ``owned``, blue points the release slots' ``current`` link at green's
release (sgw.gateway.handover.slots), so that a restart starts the release that serves;
if green never said it, ``current`` stays (a restart starts the release that served).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sgw.common.errors import HandoverError, HandoverRefusedError
from sgw.gateway.handover import faults, slots
from sgw.gateway.handover.record import READS, VERSION, HandoverRecord
from sgw.gateway.handover.wire import Channel

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapTimeouts:
    """Deadlines of one swap, in seconds (TCG guests are slow: generous by default)."""

    ready: float = 180.0  # green's start, log index and map loads, before anything pauses
    destage_grace: float = 10.0  # the destager's batch in flight may finish this long
    fence: float = 5.0  # connections answer what they read (else the swap is called off)
    prepared: float = 30.0  # green catches up and adopts (blue is paused meanwhile)
    owned: float = 10.0  # green reports that it serves (only for the report)


DEFAULT_TIMEOUTS = SwapTimeouts()
# How long green waits, after blue closed the socket, for blue to have exited: its files are
# closed before the kernel finishes its exit, so an EOF can come first.
BLUE_EXIT_WAIT_S = 5.0


class Blue(Protocol):
    """What the swap needs of the running daemon (``sgw.gateway.daemon.Gateway``)."""

    async def quiet(self, grace: float) -> None: ...

    async def fence(self, deadline: float) -> float: ...

    def handover_record(
        self, fenced_at: float, version: str
    ) -> tuple[HandoverRecord, list[int]]: ...

    async def resume(self) -> None: ...


class Green(Protocol):
    """What the swap needs of the standby daemon (``sgw.gateway.daemon.Gateway``)."""

    async def prepare_standby(self, timeout: float) -> None: ...

    async def adopt(self, record: HandoverRecord, fds: list[int]) -> int: ...

    async def go(self) -> None: ...


@dataclass(frozen=True)
class SwapResult:
    """A swap that happened: green's pid and version, the pause it measured, and what
    became of the release slots' ``current`` link."""

    pid: int
    version: str
    pause_s: float | None
    current: slots.CurrentSwitch

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "version": self.version,
            "pause_s": self.pause_s,
            "current": self.current.describe(),
        }


async def upgrade(
    blue: Blue,
    release: str,
    serve_args: Sequence[str],
    version: str,
    timeouts: SwapTimeouts = DEFAULT_TIMEOUTS,
) -> SwapResult:
    """Swaps the running daemon for the release at ``release`` (a directory with
    ``bin/sgw``), started with ``serve_args`` (blue's own ``sgw gateway serve`` arguments).

    Returns once green serves; blue must then exit without touching anything it handed
    over. HandoverRefusedError or HandoverError if the swap was called off: blue serves
    as before."""
    exe = os.path.join(release, "bin", "sgw")
    if not os.access(exe, os.X_OK):
        raise HandoverRefusedError(f"{exe} is not an executable sgw: not a release directory")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    try:
        # subprocess, not the event loop's spawn: it closes every other descriptor in the
        # child (uvloop's leaves stray copies of stdio, one more per generation of swaps).
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [exe, "gateway", "serve", *serve_args, "--standby-fd", str(fd)],
            pass_fds=(fd,),
        )
    finally:
        theirs.close()
    LOG.info("swap: green started", extra={"release": release, "green_pid": proc.pid})
    channel = Channel(mine)
    touched = False  # blue stopped something that resume() must start again
    try:
        hello = _expect(await channel.recv(timeouts.ready), "hello")
        reads = hello.get("reads")
        if not isinstance(reads, list) or VERSION not in reads:
            await channel.send({"op": "abort", "reason": "record version"})
            raise HandoverRefusedError(
                f"the release at {release} (sgw {hello.get('version')}) cannot read this "
                f"daemon's handover record (version {VERSION}; it reads {reads})"
            )
        await channel.send({"op": "begin", "version": VERSION})
        indexed = _expect(await channel.recv(timeouts.ready), "indexed")
        LOG.info("swap: green indexed the log", extra={"records": indexed.get("records")})
        touched = True
        await blue.quiet(timeouts.destage_grace)
        await channel.send({"op": "quiet"})
        _expect(await channel.recv(timeouts.ready), "ready")
        fenced_at = await blue.fence(time.monotonic() + timeouts.fence)
        await faults.hit("blue-after-fence")
        record, fds = blue.handover_record(fenced_at, version)
        doc = record.to_json()
        if faults.active("blue-corrupt-record"):
            doc["log"]["next_seq"] += 1  # a record that does not match the log
        if faults.active("blue-record-version"):
            doc["version"] = VERSION + 100
        await channel.send({"op": "handover", "record": doc}, fds)
        await faults.hit("blue-after-handover")
        _expect(await channel.recv(timeouts.prepared), "prepared")
    except BaseException as exc:
        await _kill(proc)
        channel.close()
        if touched:
            await blue.resume()
        LOG.warning("swap called off: %s", exc, extra={"release": release})
        if isinstance(exc, HandoverError):
            raise
        if isinstance(exc, Exception):
            raise HandoverError(f"swap called off: {exc}") from exc
        raise
    # The point of no return: from here on green serves, whatever happens to it.
    await channel.send({"op": "go"})
    await faults.hit("blue-after-go")
    pause: float | None = None
    try:
        owned = _expect(await channel.recv(timeouts.owned), "owned")
        pause = float(owned["pause_s"])
        green_version = str(owned.get("version", ""))
    except (HandoverError, KeyError, TypeError, ValueError) as exc:
        LOG.error("swap: green did not confirm that it serves: %s", exc)
        green_version = str(hello.get("version", ""))
        current = slots.CurrentSwitch(
            False, None, release, None, f"green did not confirm that it serves: {exc}"
        )
    else:
        current = await asyncio.to_thread(slots.make_current, release)
    channel.close()
    LOG.info(
        "swap done: green serves",
        extra={
            "green_pid": proc.pid,
            "version": green_version,
            "pause_s": pause,
            "current": current.link if current.switched else current.reason,
        },
    )
    return SwapResult(proc.pid, green_version, pause, current)


async def standby(
    fd: int,
    version: str,
    open_green: Callable[[], Awaitable[Green]],
    notify: Callable[[str], None],
    timeouts: SwapTimeouts = DEFAULT_TIMEOUTS,
    *,
    on_owned: Callable[[dict[str, Any]], None] | None = None,
) -> Green:
    """Green's side: from ``hello`` to serving. ``open_green`` opens the standby daemon
    (indexes the log); ``notify`` tells the service manager (``MAINPID=``, ``READY=1``);
    ``on_owned`` is given the swap's facts once green serves (blue's pid and version, the
    pause). Returns the daemon, serving; HandoverError if the swap was called off (green
    then exits: blue serves)."""
    channel = Channel(socket.socket(fileno=fd))
    blue = os.pidfd_open(os.getppid())  # readable once blue has exited
    await channel.send({"op": "hello", "version": version, "reads": list(READS)})
    try:
        _expect(await channel.recv(timeouts.ready), "begin")
        green = await open_green()
        await faults.hit("green-before-indexed")
        await channel.send({"op": "indexed"})
        _expect(await channel.recv(timeouts.ready), "quiet")
        await green.prepare_standby(timeouts.ready)
        await faults.hit("green-before-ready")
        await channel.send({"op": "ready"})
        message, fds = await channel.recv(None)  # blue kills this process if it gives up
        _expect((message, fds), "handover")
        await faults.hit("green-after-handover")
        record = HandoverRecord.from_json(message.get("record"))
        caught_up = await green.adopt(record, fds)
        await faults.hit("green-before-prepared")
    except Exception as exc:
        LOG.error("swap: this standby gives up: %s", exc)
        with contextlib.suppress(HandoverError):
            await channel.send({"op": "failed", "reason": str(exc)})
        raise
    try:
        await channel.send({"op": "prepared", "caught_up": caught_up})
        _expect(await channel.recv(None), "go")
    except HandoverError:
        # Blue closes the socket when it calls the swap off (and kills this process), or
        # when it dies. Dead, it handed everything over: nobody else can serve it.
        if not await _exited(blue, BLUE_EXIT_WAIT_S):
            raise
        LOG.warning("swap: blue died after the handover; this daemon serves")
    finally:
        os.close(blue)
    await faults.hit("green-before-go")
    await green.go()
    pause = time.monotonic() - record.fenced_at
    notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS=serving (took over from pid {record.blue_pid})")
    LOG.info(
        "swap: this daemon serves",
        extra={"blue_pid": record.blue_pid, "pause_s": round(pause, 4), "caught_up": caught_up},
    )
    if on_owned is not None:
        on_owned(
            {
                "from_pid": record.blue_pid,
                "from_version": record.blue_version,
                "pause_s": round(pause, 6),
                "at": time.time(),
            }
        )
    with contextlib.suppress(HandoverError):
        await channel.send({"op": "owned", "version": version, "pause_s": pause})
    channel.close()
    return green


async def _exited(pidfd: int, timeout: float) -> bool:
    """True if the process behind ``pidfd`` exits within ``timeout`` seconds."""
    readable, _, _ = await asyncio.to_thread(select.select, [pidfd], [], [], timeout)
    return bool(readable)


def _expect(got: tuple[dict[str, Any], list[int]], op: str) -> dict[str, Any]:
    message, fds = got
    if message.get("op") != op:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        reason = message.get("reason")
        raise HandoverError(
            f"the other daemon said {message.get('op')!r} where {op!r} was due"
            + (f": {reason}" if reason else "")
        )
    return message


async def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kills green and waits for it: only a dead green cannot serve blue's sockets."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait)
