"""The gateway daemon: wiring, lifecycle and shutdown.

Start: open the engine (recovering the log), start the destager, listen. SIGTERM or SIGINT:
stop accepting, let every connection finish what it received, flush the log, stop the
destager after its current batch, close. The pieces are kept apart so that the blue-green
handover can later flush the log and pass the listening sockets and connections on.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal

from sgw.gateway.config import GatewayConfig
from sgw.gateway.nbd.server import NbdServer
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import VolumeEngine
from sgw.gateway.volume.remote import BlockApiClient
from sgw.gateway.volume.upload import Uploader

LOG = logging.getLogger(__name__)

_PR_SET_IO_FLUSHER = 57


def set_io_flusher() -> bool:
    """Marks the process as an I/O flusher (PR_SET_IO_FLUSHER) so that memory reclaim does
    not wait on the writeback this process itself must serve; needs CAP_SYS_RESOURCE."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0)


class Gateway:
    """One running gateway: engine, destager and NBD server."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.engine = VolumeEngine.open(
            config.data_dir, config.log_path, config.log_size, config.volumes
        )
        self.uploader: Uploader | None = None
        if config.remote is None:
            _mark_unsynced(self.engine)
        else:
            r = config.remote
            client = BlockApiClient(r.url, max_connections=r.concurrency + 2)
            self.uploader = Uploader(
                self.engine, client, concurrency=r.concurrency, bandwidth=r.bandwidth
            )
        d = config.destage
        self.destager = Destager(
            self.engine,
            batch_bytes=d.batch_bytes,
            start_fill=d.start_fill,
            idle_seconds=d.idle_seconds,
            upload=self.uploader,
        )
        self.server = NbdServer(self.engine, on_write=self.destager.kick)

    async def start(self) -> None:
        """Starts the destager and the listeners."""
        self.destager.start()
        for listener in self.config.listeners:
            if listener.kind == "unix":
                os.makedirs(os.path.dirname(os.path.abspath(listener.path)), exist_ok=True)
                await self.server.listen_unix(listener.path)
            else:
                await self.server.listen_tcp(listener.host, listener.port)

    async def stop(self) -> None:
        """Drains the connections, flushes the log, stops the destager, closes files."""
        await self.server.shutdown()
        await self.engine.flush()
        await self.destager.stop()
        if self.uploader is not None:
            await self.uploader.close()
        self.engine.close()
        for listener in self.config.listeners:
            if listener.kind == "unix" and os.path.exists(listener.path):
                os.unlink(listener.path)


def _mark_unsynced(engine: VolumeEngine) -> None:
    """Without [remote], batches are destaged without uploading: a volume bound to a remote
    volume must upload in full (what differs) once the remote is configured again."""
    stale = [e for e in engine.registry.values() if e.remote_id is not None and e.remote_synced]
    if stale:
        for entry in stale:
            entry.remote_synced = False
        engine.save_registry()
        LOG.warning(
            "no [remote] configured: volumes bound to a remote volume will upload in full "
            "when it is configured again",
            extra={"volumes": len(stale)},
        )


async def serve(config: GatewayConfig) -> int:
    """Runs the gateway until SIGTERM or SIGINT; returns the exit status."""
    io_flusher = set_io_flusher()
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    LOG.info(
        "gateway ready",
        extra={
            "volumes": [v.name for v in config.volumes],
            "nbd": [str(listener) for listener in config.listeners],
            "io_flusher": io_flusher,
            "provider": config.remote.url if config.remote else None,
            "pid": os.getpid(),
        },
    )
    await stop.wait()
    LOG.info("gateway stopping")
    await gateway.stop()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    LOG.info(
        "gateway stopped",
        extra={"requests": gateway.server.requests, "peak_rss_kib": peak_kib},
    )
    return 0
