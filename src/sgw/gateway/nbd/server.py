"""The NBD server: the engine's volumes as exports, listeners on unix and TCP sockets, and
a shutdown that lets every connection answer what it received. Each accepted socket gets
its own protocol object (``connection.NbdConnection``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable

from sgw.gateway.nbd.connection import NbdConnection
from sgw.gateway.nbd.negotiation import ExportInfo
from sgw.gateway.volume.engine import VolumeEngine
from sgw.gateway.volume.volume import Volume

LOG = logging.getLogger(__name__)


class NbdServer:
    """Serves the engine's volumes as NBD exports."""

    def __init__(
        self,
        engine: VolumeEngine,
        *,
        default_export: str | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.default_export = default_export or next(iter(engine.volumes), None)
        self.on_write = on_write or (lambda: None)
        self.connections: set[NbdConnection] = set()
        self.servers: list[asyncio.Server] = []
        self.read_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="nbd-read")
        self.shutting_down = False
        self.requests = 0
        self.throttled = 0  # writes held back because the log was filling up

    # -- exports ----------------------------------------------------------------------

    def volume(self, name: str) -> Volume | None:
        """The volume an export name refers to; "" is the default export."""
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.engine.volumes.get(name)

    def lookup(self, name: str) -> ExportInfo | None:
        vol = self.volume(name)
        if vol is None:
            return None
        return ExportInfo(vol.name, vol.size, f"sgw volume {vol.name}")

    def connections_to(self, name: str) -> int:
        """How many open connections serve the volume (it cannot be removed meanwhile)."""
        vol = self.engine.volumes.get(name)
        return sum(1 for c in self.connections if vol is not None and c.volume is vol)

    def listing(self) -> list[ExportInfo]:
        return [
            ExportInfo(v.name, v.size, f"sgw volume {v.name}") for v in self.engine.volumes.values()
        ]

    # -- listeners --------------------------------------------------------------------

    async def listen_unix(self, path: str) -> None:
        """Listens on a unix socket (replacing a stale socket file)."""
        if os.path.exists(path):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: NbdConnection(self), path)
        os.chmod(path, 0o660)
        self.servers.append(server)
        LOG.info("nbd listening", extra={"address": f"unix:{path}"})

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listens on TCP; returns the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: NbdConnection(self), host, port)
        self.servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        LOG.info("nbd listening", extra={"address": f"tcp:{host}:{bound}"})
        return bound

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting, lets every connection finish the requests it received, closes."""
        self.shutting_down = True
        for server in self.servers:
            server.close()
        conns = list(self.connections)
        for conn in conns:
            conn.drain_and_close()
        waiters = [conn.closed for conn in conns]
        if waiters:
            _, _pending = await asyncio.wait(waiters, timeout=timeout)
            for conn in conns:
                if not conn.closed.done():
                    conn.abort("shutdown timeout")
        for server in self.servers:
            await server.wait_closed()
        self.read_pool.shutdown(wait=True)
