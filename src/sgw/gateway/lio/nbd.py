"""The gateway's volumes on kernel NBD devices (``/dev/nbdN``), set up over netlink.

Each device is connected to one end of a socket pair; the daemon serves the other end
(``serve``: the NBD server's kernel connections, which skip the handshake). The device is
made with an I/O timeout, a dead-connection timeout and a backend identifier, so that when
the daemon dies the kernel holds the device's requests instead of failing them, and the
daemon restarted by systemd gives the device a new socket (``reattach``, netlink
RECONFIGURE with the same identifier): the initiators see a pause, not an error. A
blue-green swap hands the daemon's ends over like any connection: the kernel notices
nothing. All device work is here, behind ``NbdAttacher`` (the privileged helper of the
security work wraps exactly these calls).

The kernel's rules (drivers/block/nbd.c, Linux 6.1) that set the numbers:

- a request already sent on a socket that died is requeued only when its own timer fires
  (``IO_TIMEOUT_S``), then waits for a reattach like every new request;
- with every connection dead, requests wait up to ``DEAD_CONN_TIMEOUT_S`` for a reattach;
  past it the device fails them all (I/O errors) and must be set up again;
- a request slower than ``IO_TIMEOUT_S`` on a live socket makes the kernel declare the
  socket dead too: the daemon sees its end close and reattaches at once.

The budget (docs/appliance.md, "Crash reattach"): a Linux initiator aborts a command after
about 15 s; a request on the dead socket is sent again at the later of its ``IO_TIMEOUT_S``
(8 s) timer and the daemon's return, so a daemon back within about 14 s shows no error;
between that and ``DEAD_CONN_TIMEOUT_S`` the initiator may abort and retry commands
(nothing acknowledged is lost, the requests wait); beyond it the devices fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable

from sgw.common.errors import IscsiExportError
from sgw.gateway.lio.netlink import DeviceSettings, NbdNetlink

LOG = logging.getLogger(__name__)

# The I/O timeout of every device (seconds): see the module doc.
IO_TIMEOUT_S = 8
# How long a device with its daemon gone waits for a reattach before failing I/O (s).
DEAD_CONN_TIMEOUT_S = 120
# How long a disconnected device may take to show as free (seconds).
DETACH_SETTLE = 5.0
_NBD = re.compile(r"nbd(\d+)")  # fullmatch

# Serves the daemon's end of a device's socket pair: (volume, device, socket).
Serve = Callable[[str, str, socket.socket], Awaitable[None]]


def backend_id(gateway_key_hex: str, volume: str) -> str:
    """The identifier a device is made with: a reattach must name the same one."""
    return f"sgw:{gateway_key_hex[:16]}:{volume}"


class NbdAttacher:
    """Connects volumes of the gateway's NBD server to kernel NBD devices."""

    def __init__(
        self,
        serve: Serve | None,
        gateway_key_hex: str,
        *,
        size_of: Callable[[str], int] = lambda _volume: 0,
        server_flags: int = 0,
        block_size: int = 512,
        max_sectors_kb: int = 1024,
        netlink: NbdNetlink | None = None,
        sys_block: str = "/sys/block",
        dev_dir: str = "/dev",
    ) -> None:
        self.serve = serve
        self.key_hex = gateway_key_hex
        self.size_of = size_of
        self.server_flags = server_flags
        self.block_size = block_size
        self.max_sectors_kb = max_sectors_kb
        self.netlink = netlink or NbdNetlink()
        self.sys_block = sys_block
        self.dev_dir = dev_dir
        self._detaching: set[str] = set()

    def devices(self) -> list[str]:
        """The NBD devices the kernel has, in number order."""
        try:
            names = os.listdir(self.sys_block)
        except FileNotFoundError:
            return []
        found = sorted((int(m.group(1)), n) for n in names if (m := _NBD.fullmatch(n)))
        return [os.path.join(self.dev_dir, name) for _, name in found]

    def connected(self, device: str) -> bool:
        """True while the device is set up (connected, or waiting for a reattach)."""
        return os.path.exists(os.path.join(self._sys(device), "pid"))

    def backend_of(self, device: str) -> str | None:
        """The device's backend identifier (None if it has none)."""
        try:
            with open(os.path.join(self._sys(device), "backend")) as f:
                return f.read().strip()
        except OSError:
            return None

    async def attach(self, volume: str, taken: set[str]) -> str:
        """Attaches the volume to a free device (none of ``taken``); returns it."""
        devices = self.devices()
        if not devices:
            raise IscsiExportError(
                "no /dev/nbdN devices: the nbd kernel module is not loaded (modprobe nbd)"
            )
        free = [d for d in devices if d not in taken and not self.connected(d)]
        if not free:
            raise IscsiExportError(
                f"all {len(devices)} NBD devices are in use; raise nbds_max "
                "(/etc/modprobe.d/sgw-nbd.conf) to export more volumes"
            )
        device = free[0]
        settings = DeviceSettings(
            size=self.size_of(volume),
            block_size=self.block_size,
            io_timeout=IO_TIMEOUT_S,
            dead_conn_timeout=DEAD_CONN_TIMEOUT_S,
            server_flags=self.server_flags,
            backend=backend_id(self.key_hex, volume),
        )
        await self._with_socket(
            volume, device, lambda fd: self.netlink.connect(_index(device), fd, settings)
        )
        self._tune(device)
        LOG.info("volume attached", extra={"volume": volume, "device": device})
        return device

    async def reattach(self, volume: str, device: str) -> bool:
        """Gives the device a new connection to this daemon (after a restart, or after the
        kernel gave up on the old one). False if the device is not the volume's, or not
        set up any more (then it must be attached afresh)."""
        backend = backend_id(self.key_hex, volume)
        if not self.connected(device) or self.backend_of(device) != backend:
            return False
        try:
            await self._with_socket(
                volume, device, lambda fd: self.netlink.reconfigure(_index(device), fd, backend)
            )
        except IscsiExportError as exc:
            LOG.warning("reattach refused: %s", exc, extra={"volume": volume, "device": device})
            return False
        LOG.info("volume reattached", extra={"volume": volume, "device": device})
        return True

    async def detach(self, device: str) -> None:
        """Disconnects the device (its requests finish first) and waits until it is free."""
        if not self.connected(device):
            return
        self._detaching.add(device)
        try:
            await asyncio.to_thread(self.netlink.disconnect, _index(device))
            deadline = time.monotonic() + DETACH_SETTLE
            while self.connected(device) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            self._detaching.discard(device)
        if self.connected(device):
            raise IscsiExportError(f"{device} still connected {DETACH_SETTLE} s after detaching")
        LOG.info("device detached", extra={"device": device})

    def detaching(self, device: str) -> bool:
        """True while the device is being detached on purpose (its connection ends)."""
        return device in self._detaching

    async def _with_socket(self, volume: str, device: str, setup: Callable[[int], None]) -> None:
        """A new socket pair: the daemon serves one end (before the kernel may send on the
        other: a new device's partition scan reads at once), the kernel gets the other."""
        if self.serve is None:
            raise IscsiExportError("this process serves no NBD connections: it cannot attach")
        mine, kernels = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.serve(volume, device, mine)
            await asyncio.to_thread(setup, kernels.fileno())
        finally:
            kernels.close()  # the kernel holds its own reference

    def _sys(self, device: str) -> str:
        return os.path.join(self.sys_block, os.path.basename(device))

    def _tune(self, device: str) -> None:
        """Lets LIO pass requests of up to ``max_sectors_kb`` to the device in one piece
        (the NBD driver's default is 128 KiB)."""
        queue = os.path.join(self._sys(device), "queue")
        try:
            with open(os.path.join(queue, "max_hw_sectors_kb")) as f:
                hw_max = int(f.read())
            value = min(self.max_sectors_kb, hw_max)
            with open(os.path.join(queue, "max_sectors_kb"), "w") as f:
                f.write(str(value))
        except (OSError, ValueError) as exc:
            raise IscsiExportError(f"cannot set max_sectors_kb of {device}: {exc}") from exc


def _index(device: str) -> int:
    m = _NBD.fullmatch(os.path.basename(device))
    if m is None:
        raise IscsiExportError(f"{device} is not an NBD device")
    return int(m.group(1))
