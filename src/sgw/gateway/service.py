"""The gateway daemon's process: ``sgw gateway serve`` started afresh or as the standby of
a blue-green swap, signals, the service manager's notifications, and the swap on request
(the admin socket's ``upgrade``: sgw.gateway.handover.swap).

systemd follows the swap through ``Type=notify`` with ``NotifyAccess=all``: the daemon
says ``READY=1`` once it serves. On the appliance the service's main process is the
supervisor (sgw.gateway.supervisor), which a successor outlives its predecessor under;
run without it, a successor that took over says ``MAINPID=`` with its own pid before its
predecessor exits, so the service never looks stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
from collections.abc import Sequence
from typing import Any

from sgw import version
from sgw.common.errors import HandoverRefusedError, SgwError
from sgw.gateway.config import GatewayConfig
from sgw.gateway.daemon import Gateway, set_io_flusher
from sgw.gateway.handover.swap import DEFAULT_TIMEOUTS, Green, SwapTimeouts, standby, upgrade
from sgw.gateway.supervisor import SUPERVISED_ENV

LOG = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Tells the service manager ``state`` (sd_notify) if it asked to be told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if os.environ.get(SUPERVISED_ENV) == "1":  # the supervisor stays the main process
        state = "\n".join(x for x in state.split("\n") if not x.startswith("MAINPID="))
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        LOG.warning("cannot notify the service manager: %s", exc)


async def serve(
    config: GatewayConfig,
    serve_args: Sequence[str] = (),
    standby_fd: int | None = None,
    timeouts: SwapTimeouts = DEFAULT_TIMEOUTS,
) -> int:
    """Runs the gateway until SIGTERM or SIGINT, or until it handed over to a successor;
    returns the exit status. ``serve_args``: this daemon's own ``sgw gateway serve``
    arguments, given to a successor; ``standby_fd``: this daemon is a successor."""
    io_flusher = set_io_flusher()
    # Handlers first: a SIGTERM that arrives once the listeners accept must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    took_over: dict[str, Any] | None = None
    if standby_fd is None:
        gateway = Gateway(config)
        await gateway.start()
        notify("READY=1\nSTATUS=serving")
    else:

        async def open_green() -> Green:
            return Gateway(config, standby=True)

        def owned(facts: dict[str, Any]) -> None:
            nonlocal took_over
            took_over = facts

        green = await standby(standby_fd, version(), open_green, notify, timeouts, on_owned=owned)
        assert isinstance(green, Gateway)
        gateway = green
        if took_over is not None:
            gateway.health.event_now(
                "swap_done",
                "info",
                f"took over from sgw {took_over['from_version']} (pid {took_over['from_pid']}); "
                f"I/O paused {took_over['pause_s']:.3f} s",
            )
    gateway.admin.ops.daemon = {"pid": os.getpid(), "version": version(), "took_over": took_over}
    LOG.info(
        "gateway ready",
        extra={
            "volumes": [v.name for v in config.volumes],
            "nbd": [str(listener) for listener in config.listeners],
            "io_flusher": io_flusher,
            "provider": config.remote.url if config.remote else None,
            "pid": os.getpid(),
            "version": version(),
        },
    )
    swapped = asyncio.Event()
    swapping = asyncio.Lock()

    async def do_upgrade(release: str) -> dict[str, Any]:
        if swapping.locked():
            raise HandoverRefusedError("a swap of this daemon is in progress already")
        async with swapping:
            try:
                result = await upgrade(gateway, release, serve_args, version(), timeouts)
            except SgwError as exc:
                gateway.health.event_now("swap_failed", "error", f"swap to {release}: {exc}")
                raise
        gateway.admin.after_answer = swapped.set
        return result.describe()

    gateway.admin.ops.upgrade = do_upgrade
    stopping = loop.create_task(stop.wait())
    handed_over = loop.create_task(swapped.wait())
    await asyncio.wait([stopping, handed_over], return_when=asyncio.FIRST_COMPLETED)
    if handed_over.done():
        # Green serves every socket and file this process had: nothing here may touch
        # them (no drain, no flush, no unlink, no LIO clean-up). The kernel closes this
        # process's copies.
        LOG.info("gateway handed over: exiting", extra={"pid": os.getpid()})
        logging.shutdown()
        os._exit(0)
    LOG.info("gateway stopping")
    notify("STOPPING=1")
    await gateway.stop()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    LOG.info(
        "gateway stopped",
        extra={"requests": gateway.server.requests, "peak_rss_kib": peak_kib},
    )
    return 0
