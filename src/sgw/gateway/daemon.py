"""The gateway daemon: wiring, lifecycle and shutdown.

Start: open the engine (recovering the log), start the destager, listen; cached volumes
load their remote maps in the background (status BOOTSTRAPPING, reads of their base wait)
and a small monitor keeps every volume's status current. SIGTERM or SIGINT:
stop accepting, let every connection finish what it received, flush the log, stop the
destager after its current batch, close. The pieces are kept apart so that the blue-green
handover can later flush the log and pass the listening sockets and connections on.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import fcntl
import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from typing import Any

import httpx

from sgw.common.errors import ConfigError, HandoverError, SgwError
from sgw.common.iscsi import NOT_EXPORTED
from sgw.gateway.admin_socket import AdminOps, AdminServer, socket_path
from sgw.gateway.config import GatewayConfig, RemoteConfig
from sgw.gateway.handover.record import VERSION as RECORD_VERSION
from sgw.gateway.handover.record import HandoverRecord, SnapshotRecord
from sgw.gateway.health.metrics import Sources
from sgw.gateway.health.monitor import HealthMonitor
from sgw.gateway.link.activation import Activation, tls_verify
from sgw.gateway.link.channel import ControlChannel
from sgw.gateway.link.command_runner import CommandRunner
from sgw.gateway.link.identity import load_or_create_key
from sgw.gateway.link.request_signing import GatewayAuth
from sgw.gateway.lio.chap import ChapStore
from sgw.gateway.lio.exporter import LioExporter
from sgw.gateway.listening import Listener
from sgw.gateway.nbd.negotiation import transmission_flags
from sgw.gateway.nbd.server import NbdServer
from sgw.gateway.nbd.state import ListenerState
from sgw.gateway.volume.chunk_cache import ChunkCache
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import RegistryEntry, VolumeEngine, VolumeSpec
from sgw.gateway.volume.remote import BlockApiClient, RetryPolicy
from sgw.gateway.volume.snapshot_restore import VolumeRestore
from sgw.gateway.volume.snapshots import SnapshotRequest, SnapshotState
from sgw.gateway.volume.upload import TokenBucket, Uploader
from sgw.gateway.volume.volume import LOADING_MAP, Volume, VolumeStatus

LOG = logging.getLogger(__name__)

# Seconds between status checks: a stall shows within this, and the check is a few
# attribute reads per volume.
STATUS_INTERVAL = 0.25
# Loading a cached volume's map is retried after this long, doubling up to the maximum
# (seconds, jittered) while the provider is unreachable.
BOOTSTRAP_RETRY_FIRST = 0.5
BOOTSTRAP_RETRY_MAX = 15.0
# A cache miss is a read the initiator waits for: fail it within seconds (it aborts a
# command after about 15 s) rather than retry as long as an upload may.
READ_RETRY = RetryPolicy(attempts=3, initial=0.2, max_wait=1.0)

_PR_SET_IO_FLUSHER = 57
# The data directory's lock file: one daemon serves a data directory at a time.
LOCK_FILE = "gateway.lock"


def set_io_flusher() -> bool:
    """Marks the process as an I/O flusher (PR_SET_IO_FLUSHER) so that memory reclaim does
    not wait on the writeback this process itself must serve; needs CAP_SYS_RESOURCE."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0)


class Gateway:
    """One running gateway: engine, destager and NBD server.

    ``standby``: the successor of a running daemon in the blue-green swap. It opens the
    same files without writing (the write log is indexed, the cache not cleaned) and is
    started by ``adopt`` with what the running one hands over (sgw.gateway.handover)."""

    def __init__(self, config: GatewayConfig, *, standby: bool = False) -> None:
        self.config = config
        self.standby = standby
        self.lock_fd: int | None = None
        # What a standby adopted from its predecessor until ``go`` serves it.
        self._adopted_side: dict[str, socket.socket] = {}
        self._adopted_devices: dict[str, str] = {}
        self._quieted = False
        if not standby:  # before anything is opened: a second daemon must touch nothing
            self.take_lock()
        # Identity and activation (sgw.gateway.link.activation): every provider request is
        # signed once the gateway has its credentials.
        self.auth = GatewayAuth(load_or_create_key(config.data_dir))
        self.activation = Activation(config.data_dir, config.remote, config.activation, self.auth)
        self.cache: ChunkCache | None = None
        read_ahead = 0
        if config.cache is not None:
            self.cache = ChunkCache.open(config.cache.path, config.cache.size, cleanup=not standby)
            read_ahead = config.cache.read_ahead
        self.engine = VolumeEngine.open(
            config.data_dir,
            config.log_path,
            config.log_size,
            config.volumes,
            cache=self.cache,
            read_ahead=read_ahead,
            standby=standby,
        )
        self.cached = [v for v in self.engine.volumes.values() if v.cached is not None]
        self.restores = [
            VolumeRestore(self.engine, v, self.engine.registry[v.name])
            for v in self.engine.volumes.values()
            if v.cached is None and self.engine.registry[v.name].restoring
        ]
        self.read_client: BlockApiClient | None = None
        # Limits chunk downloads (cached volumes, restores); set from the console.
        self.download_bucket = TokenBucket(None)
        self._tasks: list[asyncio.Task[None]] = []
        self._bootstrap_errors: dict[str, str] = {}
        self.uploader: Uploader | None = None
        if config.remote is None:
            if not standby:
                _mark_unsynced(self.engine)
        else:
            r = config.remote
            client = BlockApiClient(
                r.url, max_connections=r.concurrency + 2, auth=self.auth, verify=tls_verify(r)
            )
            self.uploader = Uploader(
                self.engine,
                client,
                concurrency=r.concurrency,
                bandwidth=r.bandwidth,
                pack_chunks=r.pack_chunks,
            )
        d = config.destage
        self.destager = Destager(
            self.engine,
            batch_bytes=d.batch_bytes,
            start_fill=d.start_fill,
            idle_seconds=d.idle_seconds,
            upload=self.uploader,
            pass_through_after=d.pass_through_after,
        )
        self.server = NbdServer(self.engine, on_write=self.destager.kick)
        self.admin = AdminServer(
            AdminOps(
                self.engine,
                self.destager,
                self._volume_status,
                writes_throttled=lambda: self.server.throttled,
                uploads_held=lambda: 0 if self.uploader is None else self.uploader.bucket.held,
            ),
            socket_path(config.data_dir),
        )
        # The control channel: commands from the provider's console (once activated).
        self.commands = CommandRunner(
            GatewayCommandHost(self), update_socket=self.config.updates.socket
        )
        self.control = self._control_channel()
        # Metrics, events and the health reporter (sgw.gateway.health).
        self.health = HealthMonitor(
            config,
            Sources(
                engine=self.engine,
                destager=self.destager,
                server=self.server,
                uploader=self.uploader,
                cache=self.cache,
                downloads=lambda: [] if self.read_client is None else [self.read_client],
                control_connected=lambda: None if self.control is None else self.control.connected,
                swap_pause=self._swap_pause,
                disk_paths=self._disk_paths,
            ),
            client=None if config.remote is None else self._health_client,
            standby=standby,
            ready=self.activation.activated,
        )
        # iSCSI through LIO (the appliance): each volume on /dev/nbdN, one target each.
        self.lio = LioExporter.from_config(
            config,
            self.auth.key,
            self.server.serve_kernel,
            lambda name: self.engine.volumes[name].size,
            transmission_flags(structured=False),
        )
        if self.lio is not None:
            self.server.on_kernel_lost = self.lio.kernel_lost

    def _control_channel(self) -> ControlChannel | None:
        """The control channel: commands from the provider's console (once activated)."""
        config = self.config
        if config.remote is None:
            return None
        return ControlChannel(
            config.data_dir,
            [config.remote.url, *config.control.urls],
            self.commands,
            auth=self.auth,
            verify=tls_verify(config.remote),
            insecure_http=config.remote.insecure_http,
            wait=config.control.wait,
            ready=self.activation.activated,
        )

    def _health_client(self) -> httpx.AsyncClient:
        """The health reporter's signed client to the provider."""
        r = self.config.remote
        assert r is not None
        return httpx.AsyncClient(
            base_url=r.url,
            auth=self.auth,
            verify=tls_verify(r),
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    def _swap_pause(self) -> float | None:
        """The I/O pause of the swap that made this daemon serve (None: not a swap)."""
        took_over = self.admin.ops.daemon.get("took_over")
        return None if not took_over else float(took_over["pause_s"])

    def _disk_paths(self) -> list[str]:
        """The files whose disks' I/O wait the metrics report."""
        c = self.config
        paths = [c.data_dir, c.log_path, *(s.path for s in c.volumes if s.path)]
        return paths if c.cache is None else [*paths, c.cache.path]

    def take_lock(self) -> None:
        """Takes the data directory's lock: one daemon serves it. A swap's successor
        inherits its predecessor's lock (the same open file) instead."""
        os.makedirs(self.config.data_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.config.data_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another gateway daemon serves {self.config.data_dir} (it holds {path}); "
                "stop it first, or give this one another --data-dir"
            ) from None
        self.lock_fd = fd

    async def start(self) -> None:
        """Starts the destager, the cached volumes' bootstrap, the status monitor and the
        listeners. Kernel NBD devices a crashed predecessor left are reattached first."""
        if self.lio is not None:
            await self.lio.reattach(self.engine)
        await self._start_services()
        for listener in self.config.listeners:
            if listener.kind == "unix":
                os.makedirs(os.path.dirname(os.path.abspath(listener.path)), exist_ok=True)
                await self.server.listen_unix(listener.path)
            else:
                await self.server.listen_tcp(listener.host, listener.port)
        if self.lio is not None:
            await self.lio.start(self.engine)

    async def _start_services(
        self,
        *,
        page_socket: socket.socket | None = None,
        admin_socket: socket.socket | None = None,
    ) -> None:
        """Everything but the NBD listeners and the iSCSI export: the background tasks,
        the activation page, the destager, the admin socket and the control channel."""
        self._start_background()
        await self.activation.start(page_socket)
        self.destager.start()
        await self.admin.start(admin_socket)
        self.commands.install()
        if self.control is not None:
            await self.control.start()
        await self.health.start()

    def _start_background(self) -> None:
        """The restores, the cached volumes' map loads and the status monitor."""
        if self.cached or self.restores:
            assert self.config.remote is not None and self.uploader is not None
            reader = self._reader()
            loop = asyncio.get_running_loop()
            for restore in self.restores:
                name = f"restore:{restore.vol.name}"
                self._tasks.append(loop.create_task(self._restore(restore), name=name))
            for vol in self.cached:
                assert vol.cached is not None
                vol.cached.attach(reader)
                name = f"bootstrap:{vol.name}"
                self._tasks.append(loop.create_task(self._bootstrap(vol), name=name))
        self._tasks.append(asyncio.get_running_loop().create_task(self._monitor(), name="status"))

    # -- the blue-green swap (sgw.gateway.handover drives these) ------------------------

    async def quiet(self, grace: float) -> None:
        """Blue, once green has indexed the log: stops what changes state outside the
        write log (the destager at a safe point, the control channel, restores and map
        loads) and saves the registry; the NBD path goes on serving."""
        self._quieted = True
        await self.health.pause()
        await self.destager.pause(grace)
        if self.control is not None:
            await self.control.stop(grace)
        await self.commands.close()
        await self._stop_background()
        await asyncio.to_thread(self.engine.save_registry)

    async def resume(self) -> None:
        """Blue, the swap called off at any point before green took over: serves again as
        before (what ``quiet`` and ``fence`` stopped starts again)."""
        await self.server.unfence()
        for listener in self._side_listeners():
            await listener.start()
        if not self._quieted:
            return
        self._quieted = False
        self._start_background()
        self.destager.resume()
        self.commands = CommandRunner(
            GatewayCommandHost(self), update_socket=self.config.updates.socket
        )
        self.commands.install()
        self.control = self._control_channel()
        if self.control is not None:
            await self.control.start()
        await self.health.start()

    async def fence(self, deadline: float) -> float:
        """Blue, green ready: makes the log durable while still serving, then stops
        reading (nothing is refused: requests wait in the sockets), answers what was
        read and makes the rest durable. Returns when it stopped reading (monotonic)."""
        await self.engine.flush()
        self.server.fence()
        for listener in self._side_listeners():
            listener.pause()
        fenced_at = time.monotonic()
        await self.server.quiesce(deadline)
        await self.engine.flush()
        return fenced_at

    def _side_listeners(self) -> list[Listener]:
        """The activation page's and the admin socket's listening sockets."""
        return [x for x in (self.activation.listener, self.admin.listener) if x is not None]

    def handover_record(self, fenced_at: float, version: str) -> tuple[HandoverRecord, list[int]]:
        """What green needs (blue, fenced), and the descriptors the record refers to."""
        assert self.lock_fd is not None
        fds: list[int] = [self.lock_fd]
        listeners, conns = self.server.handover_state(fds)
        for role, listener in (
            ("activation", self.activation.listener),
            ("admin", self.admin.listener),
        ):
            if listener is not None:
                fds.append(listener.sock.fileno())
                listeners.append(ListenerState(len(fds) - 1, role, listener.address))
        snapshots = [
            SnapshotRecord(r.id, r.volume, r.description, r.seq, str(r.state), r.error or None)
            for r in self.engine.snapshots.values()
        ]
        record = HandoverRecord(
            version=RECORD_VERSION,
            blue_pid=os.getpid(),
            blue_version=version,
            fenced_at=fenced_at,
            log=self.engine.log.state(),
            connections=conns,
            listeners=listeners,
            snapshots=snapshots,
            lock_fd=0,
            devices=dict(self.lio.devices) if self.lio is not None else {},
        )
        return record, fds

    async def prepare_standby(self, timeout: float) -> None:
        """Green, once blue is quiet: takes the registry as blue left it, loads the cached
        volumes' maps (blue commits nothing meanwhile). HandoverError if blue's volumes
        changed or the provider does not answer in time."""
        await asyncio.to_thread(self.engine.reload_registry)
        if not self.cached:
            return
        assert self.uploader is not None
        reader = self._reader()
        try:
            async with asyncio.timeout(timeout):
                for vol in self.cached:
                    assert vol.cached is not None
                    vol.cached.attach(reader)
                    await self.uploader.bind_cached(vol)
        except (TimeoutError, SgwError, OSError) as exc:
            raise HandoverError(
                "the cached volumes' maps could not be loaded from the provider: "
                f"{exc or 'timeout'}"
            ) from exc

    async def adopt(self, record: HandoverRecord, fds: list[int]) -> int:
        """Green: takes blue's state and sockets (the log caught up, every socket adopted
        fenced), without a visible effect yet: until ``go`` nothing is read, sent or
        written, so blue can still resume. Returns the log records caught up."""
        caught_up = self.engine.catch_up(
            record.log,
            [
                SnapshotRequest(
                    s.snapshot_id,
                    s.volume,
                    s.description,
                    s.seq,
                    SnapshotState(s.state),
                    s.error or "",
                )
                for s in record.snapshots
            ],
        )
        self.lock_fd = fds[record.lock_fd]
        nbd_listeners = []
        self._adopted_side = {}
        for lstate in record.listeners:
            sock = socket.socket(fileno=fds[lstate.fd])
            if lstate.role == "nbd":
                nbd_listeners.append((lstate, sock))
            else:
                self._adopted_side[lstate.role] = sock
        conns = [(c, socket.socket(fileno=fds[c.fd])) for c in record.connections]
        await self.server.adopt(nbd_listeners, conns)
        self._adopted_devices = dict(record.devices)
        return caught_up

    async def go(self) -> None:
        """Green, blue committed to the swap: serves (reading resumes where blue stopped),
        then starts everything else."""
        self.standby = False
        await self.server.unfence()
        side = self._adopted_side
        await self._start_services(
            page_socket=side.pop("activation", None), admin_socket=side.pop("admin", None)
        )
        if self.lio is not None:
            await self.lio.adopt(self.engine, self._adopted_devices)

    async def _stop_background(self) -> None:
        """Cancels the restores, the map loads and the status monitor."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def stop(self) -> None:
        """Drains the connections, flushes the log, stops the destager, closes files."""
        if self.lio is not None:  # LIO's targets, then /dev/nbdN, before the server drains
            await self.lio.stop()
        if self.control is not None:
            await self.control.stop()
        await self.health.stop()
        await self.commands.close()
        await self.admin.stop()
        await self.server.shutdown()
        await self.engine.flush()
        await self._stop_background()
        await self.activation.stop()
        await self.destager.stop()
        for vol in self.cached:
            assert vol.cached is not None
            await vol.cached.aclose()
        for restore in self.restores:
            await restore.aclose()
        if self.uploader is not None:
            await self.uploader.close()
        if self.read_client is not None:
            await self.read_client.aclose()
        self.engine.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        for listener in self.config.listeners:
            if listener.kind == "unix" and os.path.exists(listener.path):
                os.unlink(listener.path)

    def _reader(self) -> BlockApiClient:
        """The client that fetches chunks (cached volumes, restores), made on first use."""
        if self.read_client is None:
            r = self.config.remote
            assert r is not None
            self.read_client = BlockApiClient(
                r.url, retry=READ_RETRY, auth=self.auth, verify=tls_verify(r)
            )
            self.read_client.read_throttle = self.download_bucket.acquire
        return self.read_client

    def serve_new_volume(self, vol: Volume) -> None:
        """Starts what a volume created at runtime needs: a cached volume's map load, a
        stored volume's restore from its snapshot."""
        loop = asyncio.get_running_loop()
        entry = self.engine.registry[vol.name]
        if vol.cached is not None:
            vol.cached.attach(self._reader())
            self.cached.append(vol)
            task = loop.create_task(self._bootstrap(vol), name=f"bootstrap:{vol.name}")
            self._tasks.append(task)
        elif entry.restoring:
            self._reader()
            restore = VolumeRestore(self.engine, vol, entry)
            self.restores.append(restore)
            task = loop.create_task(self._restore(restore), name=f"restore:{vol.name}")
            self._tasks.append(task)

    async def retire_volume(self, vol: Volume) -> None:
        """Stops what serves a volume about to be removed (its map load, its restore)."""
        if self.lio is not None:
            await self.lio.unexport(vol.name)
        names = {f"bootstrap:{vol.name}", f"restore:{vol.name}"}
        tasks = [t for t in self._tasks if t.get_name() in names]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks = [t for t in self._tasks if t not in tasks]
        for restore in [r for r in self.restores if r.vol is vol]:
            await restore.aclose()
            self.restores.remove(restore)
        if vol in self.cached:
            self.cached.remove(vol)
            assert vol.cached is not None
            await vol.cached.aclose()
        if self.uploader is not None:
            self.uploader.forget(vol.id)

    async def _restore(self, restore: VolumeRestore) -> None:
        """Binds a stored volume created from a snapshot, then restores it in the
        background, retrying while the provider is away."""
        assert self.uploader is not None and self.read_client is not None
        failures = 0
        while True:
            try:
                if restore.tree is None:
                    remote_id, chunk_size, chunks = await self.uploader.bind_restore(restore.vol)
                    await restore.start(self.read_client, remote_id, chunk_size, chunks)
                await restore.run()
                return
            except (SgwError, OSError) as exc:
                failures += 1
                delay = min(BOOTSTRAP_RETRY_MAX, BOOTSTRAP_RETRY_FIRST * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                LOG.warning(
                    "restore from snapshot: %s",
                    exc,
                    extra={"volume": restore.vol.name, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    def _volume_status(self, name: str) -> dict[str, object]:
        """A volume's extra status: who may log in over iSCSI; a restore's progress."""
        access = NOT_EXPORTED if self.lio is None else self.lio.access_of(name)
        extra: dict[str, object] = {"iscsi_access": access}
        for restore in self.restores:
            if restore.vol.name == name and restore.vol.restore is not None:
                return {**extra, **restore.progress}
        return extra

    async def _bootstrap(self, vol: Volume) -> None:
        """Loads a cached volume's remote map, retrying while the provider is away."""
        assert self.uploader is not None
        failures = 0
        while True:
            try:
                await self.uploader.bind_cached(vol)
                break
            except (SgwError, OSError) as exc:
                failures += 1
                delay = min(BOOTSTRAP_RETRY_MAX, BOOTSTRAP_RETRY_FIRST * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                self._bootstrap_errors[vol.name] = str(exc)
                vol.set_status(VolumeStatus.BOOTSTRAPPING, f"cannot load the remote map: {exc}")
                LOG.warning(
                    "cached volume: loading the remote map failed: %s",
                    exc,
                    extra={"volume": vol.name, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)
        self._bootstrap_errors.pop(vol.name, None)
        assert vol.cached is not None
        LOG.info(
            "cached volume ready",
            extra={
                "volume": vol.name,
                "remote_id": vol.cached.remote_id,
                "chunks": len(vol.cached.chunks),
                "chunk_size": vol.cached.chunk_size,
            },
        )
        self._update_status()

    async def _monitor(self) -> None:
        while True:
            self._update_status()
            await asyncio.sleep(STATUS_INTERVAL)

    def _update_status(self) -> None:
        """Cached volumes: writes are stalled (not failed) when the log is full and cannot
        drain because uploads fail; reads of cached chunks go on meanwhile."""
        log = self.engine.log
        full = bool(log.space_waiters) or not log.fits(Volume.log_bytes_for_write(0, 1 << 20))
        for vol in self.engine.volumes.values():
            if vol.cached is not None:
                continue
            if self.destager.pass_through:
                why = self.destager.last_error or "uploads are failing"
                vol.set_status(
                    VolumeStatus.PASS_THROUGH,
                    f"provider unreachable and the write log full: {why}; changes are kept "
                    "on the local disk and uploaded when it is back",
                )
            elif vol.status == VolumeStatus.PASS_THROUGH:
                restoring = vol.restore is not None
                vol.set_status(VolumeStatus.RESTORING if restoring else VolumeStatus.AVAILABLE)
        for vol in self.cached:
            assert vol.cached is not None
            error = self._bootstrap_errors.get(vol.name)
            if full and (self.destager.failures or error):
                why = self.destager.last_error or error or "uploads are failing"
                vol.set_status(
                    VolumeStatus.WRITES_STALLED,
                    f"write log full and it cannot drain to the provider: {why}",
                )
            elif not vol.cached.is_ready:
                reason = f"cannot load the remote map: {error}" if error else LOADING_MAP
                vol.set_status(VolumeStatus.BOOTSTRAPPING, reason)
            else:
                vol.set_status(VolumeStatus.AVAILABLE)


class GatewayCommandHost:
    """The gateway as console commands see it (``CommandHost``): a narrow view of its
    engine, destager, NBD server, LIO exporter, uploader and control channel."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._chap = ChapStore(gateway.config.data_dir)

    @property
    def data_dir(self) -> str:
        return self._gw.config.data_dir

    @property
    def remote(self) -> RemoteConfig | None:
        return self._gw.config.remote

    @property
    def provider_auth(self) -> httpx.Auth:
        return self._gw.auth

    def configuration(self) -> dict[str, Any]:
        return dataclasses.asdict(self._gw.config)

    def status(self) -> dict[str, Any]:
        return self._gw.admin.ops.status()

    async def snapshot(self, volume: str, description: str | None, wait: bool) -> dict[str, Any]:
        return await self._gw.admin.ops.snapshot(volume, description, wait)

    def control_info(self) -> dict[str, Any]:
        control = self._gw.control
        return {} if control is None else control.info()

    async def health_report(self) -> dict[str, Any]:
        reporter = self._gw.health.reporter
        if reporter is None:
            raise SgwError("the health reporter is not running (the daemon is starting)")
        report = await reporter.report_now()
        return {"seq": report.seq, "report": report.to_json()}

    @property
    def registry(self) -> Mapping[str, RegistryEntry]:
        return self._gw.engine.registry

    def volume(self, name: str) -> Volume | None:
        return self._gw.engine.volumes.get(name)

    async def create_volume(self, spec: VolumeSpec, remote_id: str) -> None:
        gw = self._gw
        read_ahead = gw.config.cache.read_ahead if gw.config.cache else 0
        await gw.engine.create_volume(
            spec, cache=gw.cache, read_ahead=read_ahead, remote_id=remote_id
        )

    async def bind_volume(self, name: str) -> None:
        assert self._gw.uploader is not None
        await self._gw.uploader.bind(self._gw.engine.volumes[name])

    def serve_new_volume(self, name: str) -> None:
        self._gw.serve_new_volume(self._gw.engine.volumes[name])

    async def retire_volume(self, name: str) -> None:
        await self._gw.retire_volume(self._gw.engine.volumes[name])

    async def remove_volume(self, name: str) -> None:
        gw = self._gw
        if gw.uploader is not None:  # its id may be given to a new volume later
            gw.uploader.forget(gw.engine.volumes[name].id)
        await gw.engine.remove_volume(name)

    def connections_to(self, name: str) -> int:
        return self._gw.server.connections_to(name)

    @property
    def iscsi(self) -> bool:
        return self._gw.lio is not None

    async def unexport(self, name: str) -> None:
        if self._gw.lio is not None:
            await self._gw.lio.unexport(name)

    async def reexport(self) -> None:
        if self._gw.lio is not None:
            await self._gw.lio.reexport()

    @property
    def chap(self) -> ChapStore:
        return self._chap

    async def end_legacy_open(self, name: str) -> None:
        engine = self._gw.engine
        entry = engine.registry[name]
        if entry.iscsi_legacy_open is not False:
            entry.iscsi_legacy_open = False
            await asyncio.to_thread(engine.save_registry)
            LOG.info(
                "volume no longer legacy open: its access is the console's", extra={"volume": name}
            )

    def holds_log_data(self, name: str) -> bool:
        return self._gw.engine.holds_log_data(name)

    def hurry_destager(self) -> None:
        self._gw.destager.hurry()

    @property
    def destage_error(self) -> str:
        return self._gw.destager.last_error

    @property
    def upload_bucket(self) -> TokenBucket | None:
        uploader = self._gw.uploader
        return None if uploader is None else uploader.bucket

    @property
    def download_bucket(self) -> TokenBucket:
        return self._gw.download_bucket


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
