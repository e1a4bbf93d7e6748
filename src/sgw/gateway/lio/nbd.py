"""Attaching the gateway's own NBD exports to ``/dev/nbdN`` with nbd-client.

``nbd-client -u SOCKET DEVICE -N VOLUME -b BLOCK_SIZE`` connects to the gateway's unix
socket and hands the connection to the kernel (netlink), so the daemon's event loop must
keep running while it negotiates: the commands run as asyncio subprocesses. A device is
free when ``/sys/block/nbdN/pid`` is absent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

from sgw.common.errors import IscsiExportError

LOG = logging.getLogger(__name__)

# Seconds nbd-client may take to connect or disconnect (it answers in milliseconds; a
# stuck one must not hold the daemon's start or stop).
COMMAND_TIMEOUT = 30.0
# How long a disconnected device may take to show as free (seconds).
DETACH_SETTLE = 5.0
_NBD = re.compile(r"^nbd(\d+)$")


class NbdAttacher:
    """Connects volumes of the gateway's NBD server to kernel NBD devices."""

    def __init__(
        self,
        socket_path: str,
        *,
        block_size: int = 512,
        max_sectors_kb: int = 1024,
        nbd_client: str = "nbd-client",
        sys_block: str = "/sys/block",
        dev_dir: str = "/dev",
    ) -> None:
        self.socket_path = socket_path
        self.block_size = block_size
        self.max_sectors_kb = max_sectors_kb
        self.nbd_client = nbd_client
        self.sys_block = sys_block
        self.dev_dir = dev_dir

    def devices(self) -> list[str]:
        """The NBD devices the kernel has, in number order."""
        try:
            names = os.listdir(self.sys_block)
        except FileNotFoundError:
            return []
        found = sorted((int(m.group(1)), n) for n in names if (m := _NBD.match(n)))
        return [os.path.join(self.dev_dir, name) for _, name in found]

    def connected(self, device: str) -> bool:
        """True while a connection is attached to the device."""
        return os.path.exists(os.path.join(self._sys(device), "pid"))

    async def attach(self, volume: str, taken: set[str]) -> str:
        """Attaches the volume's export to a free device (none of ``taken``); returns it."""
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
        await self._run(
            [
                *(self.nbd_client, "-u", self.socket_path, device),
                *("-N", volume, "-b", str(self.block_size)),
            ],
            f"attaching volume {volume} to {device}",
        )
        if not self.connected(device):
            raise IscsiExportError(f"nbd-client reported {device} attached but it is not")
        self._tune(device)
        LOG.info("volume attached", extra={"volume": volume, "device": device})
        return device

    async def detach(self, device: str) -> None:
        """Disconnects the device (its requests finish first) and waits until it is free."""
        if not self.connected(device):
            return
        await self._run([self.nbd_client, "-d", device], f"detaching {device}")
        deadline = time.monotonic() + DETACH_SETTLE
        while self.connected(device) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.connected(device):
            raise IscsiExportError(
                f"{device} still connected {DETACH_SETTLE} s after nbd-client -d"
            )
        LOG.info("device detached", extra={"device": device})

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

    async def _run(self, argv: list[str], what: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise IscsiExportError(
                f"{what}: cannot run {argv[0]}: {exc.strerror} (apt-get install nbd-client)"
            ) from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise IscsiExportError(f"{what}: nbd-client took over {COMMAND_TIMEOUT} s") from None
        if proc.returncode != 0:
            text = out.decode(errors="replace").strip().replace("\n", "; ")
            raise IscsiExportError(f"{what}: nbd-client exited {proc.returncode}: {text}")
