"""The health package as the daemon sees it: one ``HealthMonitor`` per daemon builds the
sampler, the event detector, the report buffer, the reporter and the optional /metrics
endpoint, and starts and stops them with the daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from collections.abc import Callable

import httpx

from sgw import version
from sgw.common.errors import ConfigError
from sgw.gateway.config import GatewayConfig
from sgw.gateway.health.buffer import ReportBuffer
from sgw.gateway.health.events import EventDetector, check_previous_run, clean_stop
from sgw.gateway.health.exporter import MetricsServer
from sgw.gateway.health.metrics import Sampler, Sources, build_registry
from sgw.gateway.health.reporter import HealthReporter

LOG = logging.getLogger(__name__)


def hypervisor() -> str:
    """What the gateway runs on, as the firmware names it ("" on bare hosts unknown)."""
    for name in ("sys_vendor", "product_name"):
        try:
            with open(f"/sys/class/dmi/id/{name}") as f:
                value = f.read().strip()
        except OSError:
            continue
        value = "".join(c for c in value if c.isprintable())
        if value:
            return value[:100]
    return ""


class HealthMonitor:
    """Metrics, events and reports of one daemon."""

    def __init__(
        self,
        config: GatewayConfig,
        sources: Sources,
        *,
        client: Callable[[], httpx.AsyncClient] | None,
        standby: bool = False,
        ready: asyncio.Event | None = None,
    ) -> None:
        """``ready``: set once the gateway is activated (reports are uploaded from then)."""
        self.config = config
        self._ready = ready
        self.standby = standby
        self.detector = EventDetector()
        if sources.clock_skew() is None:
            sources.clock_skew = lambda: self.detector.clock_skew
        self.sampler = Sampler(sources)
        self.labels = {
            "version": version(),
            "kernel": "".join(c for c in platform.release() if c.isprintable())[:100],
            "hypervisor": hypervisor(),
        }
        self.registry = build_registry(self.sampler, lambda: dict(self.labels))
        self.buffer: ReportBuffer | None = None
        self.reporter: HealthReporter | None = None
        self._client = client
        self.metrics: MetricsServer | None = None
        self._running = False
        self._marked = False

    async def start(self) -> None:
        """Opens the buffer (a standby opens nothing before it serves), starts reporting
        and, if configured, the /metrics endpoint."""
        if self._running:
            return
        self._running = True
        data_dir = self.config.data_dir
        # Files off the event loop: a swap's successor starts this while it serves.
        if not self._marked:  # once per process: a resumed swap is not a restart
            await asyncio.to_thread(
                check_previous_run, data_dir, self.detector, standby=self.standby
            )
            self.detector.note("started", "info", f"sgw {version()} started (pid {os.getpid()})")
            self._marked = True
        if self.buffer is None:
            self.buffer = await asyncio.to_thread(ReportBuffer, data_dir)
        self.reporter = HealthReporter(
            self.sampler,
            self.detector,
            self.buffer,
            interval=self.config.health.interval,
            labels=self.labels,
            client=self._client,
            remote=self.config.remote is not None,
            ready=self._ready,
        )
        await self.reporter.start()
        m = self.config.metrics
        if m.host is not None and self.metrics is None:
            try:
                server = MetricsServer(m, self.registry)
                await server.start()
            except (ConfigError, OSError) as exc:
                LOG.error("metrics endpoint not started: %s", exc)
            else:
                self.metrics = server

    def event_now(self, kind: str, severity: str, detail: str) -> None:
        """Records an event and has it reported at once, not at the next interval."""
        self.detector.note(kind, severity, detail)
        if self.reporter is not None and self._running:
            self.reporter.report_soon()

    async def pause(self) -> None:
        """Stops reporting and /metrics (the swap: the successor binds the port and
        reports from now on; ``start`` again if the swap is called off)."""
        self._running = False
        if self.reporter is not None:
            await self.reporter.stop()
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None

    async def stop(self) -> None:
        """Stops everything and marks the stop clean (no ``restart_after_crash`` next)."""
        await self.pause()
        if self._marked:
            clean_stop(self.config.data_dir)
