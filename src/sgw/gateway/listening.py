"""A listening socket that the blue-green swap can pause and hand over.

The event loop's server is given a duplicate of the socket and owns (and closes) that one;
this object keeps the original. Pausing closes the server only: the socket stays open and
bound, new clients wait in its backlog, and the successor serves the same socket (its
descriptor travels in the handover message). The unix socket's path is never unlinked on
the way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

LOG = logging.getLogger(__name__)

# Serves a listening socket: e.g. ``lambda s: loop.create_unix_server(factory, sock=s)``.
Serve = Callable[[socket.socket], Awaitable[asyncio.AbstractServer]]


class Listener:
    """One listening socket (``address`` as configured) and the server accepting on it."""

    def __init__(self, address: str, sock: socket.socket, serve: Serve) -> None:
        self.address = address
        self.sock = sock
        self._serve = serve
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def unix(cls, path: str, serve: Serve, *, mode: int = 0o660) -> Listener:
        """Binds ``path`` (replacing a socket file left by a crash) with ``mode``."""
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(1024)
        return cls(f"unix:{path}", sock, serve)

    @classmethod
    def tcp(cls, host: str, port: int, serve: Serve, *, address: str | None = None) -> Listener:
        """Binds ``host:port`` (port 0: any free port)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
        return cls(address or f"tcp:{host}:{port}", sock, serve)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.sock.getsockname()[1])

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Accepts on the socket (again, after ``pause``)."""
        if self._server is None:
            dup = socket.socket(self.sock.family, self.sock.type, fileno=os.dup(self.sock.fileno()))
            dup.setblocking(False)
            self._server = await self._serve(dup)

    def pause(self) -> None:
        """Stops accepting; the socket stays open and queues new clients."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        """Stops accepting and closes the socket (a unix socket's file stays)."""
        self.pause()
        self.sock.close()
