"""The NBD server: the engine's volumes as exports, listeners on unix and TCP sockets, and
a shutdown that lets every connection answer what it received. Each accepted socket gets
its own protocol object (``connection.NbdConnection``).

For the blue-green swap the server fences (stops accepting and reading, answers what it
read), describes its listeners and connections, and the successor adopts the same sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from sgw.common.errors import HandoverError
from sgw.gateway.listening import Listener
from sgw.gateway.nbd.connection import NbdConnection
from sgw.gateway.nbd.negotiation import ExportInfo
from sgw.gateway.nbd.state import TRANSMISSION, ConnectionState, ListenerState
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
        self.listeners: list[Listener] = []
        self._adopted: list[tuple[ConnectionState, socket.socket]] = []
        # Called with the device when a kernel NBD device's connection ends other than by
        # a shutdown (the kernel gave up on it: the device waits for a reattach).
        self.on_kernel_lost: Callable[[str], None] | None = None
        self.read_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="nbd-read")
        self.shutting_down = False
        self.requests = 0
        self.throttled = 0  # writes held back because the log was filling up
        self.disk_errors = 0  # requests failed by an OSError of the log or a local disk

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
        await self._listen(Listener.unix(path, self._serve_socket))
        LOG.info("nbd listening", extra={"address": f"unix:{path}"})

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listens on TCP; returns the port (useful with port 0)."""
        listener = Listener.tcp(host, port, self._serve_socket)
        await self._listen(listener)
        LOG.info("nbd listening", extra={"address": f"tcp:{host}:{listener.port}"})
        return listener.port

    async def _listen(self, listener: Listener) -> None:
        self.listeners.append(listener)
        await listener.start()

    def _serve_socket(self, sock: socket.socket) -> Awaitable[asyncio.AbstractServer]:
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            return loop.create_unix_server(lambda: NbdConnection(self), sock=sock)
        return loop.create_server(lambda: NbdConnection(self), sock=sock)

    # -- kernel NBD devices -------------------------------------------------------------

    async def serve_kernel(self, volume: str, device: str, sock: socket.socket) -> None:
        """Serves the kernel's NBD device ``device`` on ``sock`` (the daemon's end of the
        socket pair the device was set up with): no handshake, simple replies."""
        state = ConnectionState(-1, TRANSMISSION, f"kernel:{device}", export=volume, device=device)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _transport, conn = await loop.connect_accepted_socket(_adopting(self, state), sock=sock)
        conn.unfence()

    def kernel_connection_lost(self, device: str) -> None:
        if not self.shutting_down and self.on_kernel_lost is not None:
            self.on_kernel_lost(device)

    # -- handover (the blue-green swap) ----------------------------------------------------

    def fence(self) -> None:
        """Stops accepting (new clients wait in the listen backlog) and stops every
        connection reading; requests already read are still answered."""
        for listener in self.listeners:
            listener.pause()
        for conn in self.connections:
            conn.fence()

    async def quiesce(self, deadline: float) -> None:
        """Waits until every connection answered what it read (``time.monotonic()``
        ``deadline``; HandoverError past it, naming a connection still busy)."""
        while True:
            busy = [c for c in self.connections if not c.quiescent]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise HandoverError(
                    f"{len(busy)} NBD connection(s) still busy at the fence "
                    f"(e.g. {busy[0].peer}: requests in flight or waiting for log space)"
                )
            await asyncio.sleep(0.001)

    async def unfence(self) -> None:
        """Accepts and reads again (the swap was called off; or green, at ``go``: the
        adopted sockets are served from here on)."""
        adopted, self._adopted = self._adopted, []
        loop = asyncio.get_running_loop()
        for state, conn_sock in adopted:
            conn_sock.setblocking(False)
            await loop.connect_accepted_socket(_adopting(self, state), sock=conn_sock)
        for listener in self.listeners:
            await listener.start()
        for conn in list(self.connections):
            conn.unfence()

    def handover_state(self, fds: list[int]) -> tuple[list[ListenerState], list[ConnectionState]]:
        """The fenced server's listeners and connections; their descriptors are appended
        to ``fds`` and the states name their index there."""
        listeners = []
        for listener in self.listeners:
            fds.append(listener.sock.fileno())
            listeners.append(ListenerState(len(fds) - 1, "nbd", listener.address))
        conns = []
        for conn in self.connections:
            transport = conn.transport
            if transport is None:
                continue
            fds.append(transport.get_extra_info("socket").fileno())
            conns.append(conn.handover_state(len(fds) - 1))
        return listeners, conns

    async def adopt(
        self,
        listeners: list[tuple[ListenerState, socket.socket]],
        conns: list[tuple[ConnectionState, socket.socket]],
    ) -> None:
        """Takes blue's connections and listeners as they were (green, at the swap),
        untouched: they are accepted, read and answered from ``unfence`` on."""
        self._adopted = list(conns)
        for lstate, sock in listeners:
            self.listeners.append(Listener(lstate.address, sock, self._serve_socket))
            LOG.info("nbd listener handed over", extra={"address": lstate.address})

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting, lets every connection finish the requests it received, closes."""
        self.shutting_down = True
        for listener in self.listeners:
            listener.close()
        conns = list(self.connections)
        for conn in conns:
            conn.drain_and_close()
        waiters = [conn.closed for conn in conns]
        if waiters:
            _, _pending = await asyncio.wait(waiters, timeout=timeout)
            for conn in conns:
                if not conn.closed.done():
                    conn.abort("shutdown timeout")
        self.read_pool.shutdown(wait=True)


def _adopting(server: NbdServer, state: ConnectionState) -> Callable[[], NbdConnection]:
    return lambda: NbdConnection(server, adopt=state)
