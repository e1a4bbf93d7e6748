"""The gateway's local admin socket: status and snapshots for ``sgw gateway ...`` on the
appliance.

A unix socket in the data directory (``admin.sock``, mode 0600: root on the appliance
only; nothing listens on the network). One JSON request per line, one JSON answer per
line: ``{"op": "status"}``, ``{"op": "snapshot", "volume": NAME, "description": TEXT,
"wait": BOOL}``, ``{"op": "snapshot-status", "snapshot_id": ID}``. An answer is
``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``. The control channel from
the provider calls the same operations (``AdminOps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from sgw.common.errors import SgwError, VolumeStateError
from sgw.gateway.listening import Listener
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import VolumeEngine

LOG = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
_MAX_LINE = 64 * 1024


def socket_path(data_dir: str) -> str:
    """Where the admin socket of a gateway with this data directory is."""
    return os.path.join(data_dir, SOCKET_NAME)


class AdminOps:
    """What an administrator may ask of the running gateway."""

    def __init__(
        self,
        engine: VolumeEngine,
        destager: Destager,
        extra_status: Callable[[str], dict[str, Any]] | None = None,
        writes_throttled: Callable[[], int] | None = None,
        uploads_held: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.destager = destager
        self.extra_status = extra_status
        self.writes_throttled = writes_throttled or (lambda: 0)
        self.uploads_held = uploads_held or (lambda: 0)
        # The blue-green swap to a release directory (set by the service that runs the
        # daemon; None where nothing can take over, e.g. in-process tests).
        self.upgrade: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        # The serving process: pid, version and, after a swap, whom it took over from and
        # the pause (set by the service; for the health reporter and the admin).
        self.daemon: dict[str, Any] = {}

    def status(self) -> dict[str, Any]:
        """Volumes, write log, destager and snapshots, as plain data."""
        log = self.engine.log
        volumes = []
        for vol in self.engine.volumes.values():
            entry = self.engine.registry.get(vol.name)
            item: dict[str, Any] = {
                "name": vol.name,
                "mode": vol.mode,
                "size": vol.size,
                "status": str(vol.status),
                "reason": vol.status_reason or None,
                "dirty_bytes": vol.dirty_bytes,
                "remote_id": entry.remote_id if entry else None,
            }
            if self.extra_status is not None:
                item.update(self.extra_status(vol.name))
            volumes.append(item)
        return {
            "daemon": self.daemon or None,
            "volumes": volumes,
            "write_log": {
                "size": log.data_size,
                "used": log.used,
                "writers_waiting": log.space_waiters,
                "writes_throttled": self.writes_throttled(),
            },
            "destager": {
                "batches": self.destager.batches,
                "bytes": self.destager.bytes_destaged,
                "failures": self.destager.failures,
                "last_error": self.destager.last_error or None,
                "uploads_held": self.uploads_held(),
            },
            "snapshots": [r.describe() for r in self.engine.snapshots.values()],
        }

    async def snapshot(
        self, volume: str, description: str | None = None, wait: bool = False
    ) -> dict[str, Any]:
        """Requests a snapshot of the volume as of now; with ``wait``, answers once the
        provider holds it (or it failed)."""
        req = await self.engine.request_snapshot(volume, description)
        self.destager.kick_now()
        if wait:
            await req.wait()
        return req.describe()

    def snapshot_status(self, snapshot_id: str) -> dict[str, Any]:
        """A requested snapshot's state."""
        req = self.engine.snapshots.get(snapshot_id)
        if req is None:
            raise VolumeStateError(f"this gateway has no record of snapshot {snapshot_id}")
        return req.describe()


class AdminServer:
    """Serves ``AdminOps`` on a unix socket."""

    def __init__(self, ops: AdminOps, path: str) -> None:
        self.ops = ops
        self.path = path
        self.listener: Listener | None = None
        # Called once the answer to a request has been sent (the swap's last word).
        self.after_answer: Callable[[], None] | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listens (replacing a socket file left by a crash), or serves ``sock``, handed
        over by the daemon this one replaced."""
        if sock is None:
            self.listener = Listener.unix(self.path, self._serve_socket, mode=0o600)
        else:
            self.listener = Listener(f"unix:{self.path}", sock, self._serve_socket)
        await self.listener.start()

    def _serve_socket(self, sock: socket.socket) -> Awaitable[asyncio.AbstractServer]:
        return asyncio.start_unix_server(self._serve, sock=sock, limit=_MAX_LINE)

    async def stop(self) -> None:
        """Stops listening and removes the socket file."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await self._answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
                after, self.after_answer = self.after_answer, None
                if after is not None:
                    after()
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
            result: dict[str, Any]
            if op == "status":
                result = self.ops.status()
            elif op == "snapshot":
                result = await self.ops.snapshot(
                    str(req["volume"]),
                    None if req.get("description") is None else str(req["description"]),
                    bool(req.get("wait", False)),
                )
            elif op == "snapshot-status":
                result = self.ops.snapshot_status(str(req["snapshot_id"]))
            elif op == "upgrade":
                if self.ops.upgrade is None:
                    raise VolumeStateError("this gateway cannot swap its daemon (no service)")
                result = await self.ops.upgrade(str(req["release"]))
            else:
                raise ValueError(
                    f"unknown op {op!r}; try status, snapshot, snapshot-status, upgrade"
                )
        except SgwError as exc:
            return {"ok": False, "error": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        return {"ok": True, **result}


async def call(path: str, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Sends one request to a gateway's admin socket; returns its answer."""
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=16 * _MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VolumeStateError(
            f"no gateway is running with admin socket {path} (is `sgw gateway serve` "
            "running with this data directory?)"
        ) from exc
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise VolumeStateError("the gateway closed the admin connection without answering")
    answer: dict[str, Any] = json.loads(line)
    if not answer.get("ok"):
        raise VolumeStateError(str(answer.get("error")))
    return answer
