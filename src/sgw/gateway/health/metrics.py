"""The gateway's metrics: read from the objects that already count them, when sampled.

The data path only increments plain counters it owns (a volume's ``IoStats``, the NBD
server's ``disk_errors``, the uploader's ``bytes_sent``, the block API client's
``downloaded_bytes``); nothing here runs per request. ``Sampler.sample`` turns them into
the wire metrics of ``sgw.common.health`` (names in ``GATEWAY_METRICS`` and
``VOLUME_METRICS``): running totals as they are, means and percentages over the interval
since the caller's previous sample (each consumer keeps its own ``Baseline``: the reporter
and a Prometheus scraper do not steal each other's intervals). ``HealthCollector``
exposes the same on a per-daemon prometheus-client ``CollectorRegistry`` as ``sgw_<name>``
(per volume ``sgw_volume_<name>{volume=...}``), with the raw counters behind the means.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from sgw.common.health import MAX_VOLUMES_PER_REPORT
from sgw.gateway.nbd.server import NbdServer
from sgw.gateway.volume.chunk_cache import ChunkCache
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import VolumeEngine
from sgw.gateway.volume.remote import BlockApiClient
from sgw.gateway.volume.upload import Uploader
from sgw.gateway.volume.volume import VolumeStatus

LOG = logging.getLogger(__name__)

# Queue ages are known to this resolution (seconds): ``Sampler.tick`` notes the log's head
# this often (a few attribute reads, off the data path).
TICK_S = 1.0
# Most head positions remembered while the log does not drain (a day of ticks, ~2 MiB).
MAX_TICKS = 86_400
_COUNTERS = frozenset(
    {
        "read_bytes_total",
        "write_bytes_total",
        "cloud_uploaded_bytes_total",
        "cloud_downloaded_bytes_total",
        "upload_errors_total",
        "destage_errors_total",
        "disk_errors_total",
        "io_wait_seconds_total",
    }
)
_HELP = {
    "cache_hit_percent": "chunk reads served from the local cache, over the interval",
    "cache_used_percent": "chunk cache bytes held, of its size",
    "cache_dirty_percent": "cached volumes' bytes not yet uploaded, of the cache size",
    "log_used_percent": "write log (upload buffer) used, of its size",
    "log_used_bytes": "write log (upload buffer) bytes used",
    "queued_write_bytes": "bytes written locally, not yet committed to the provider",
    "queued_write_oldest_seconds": "age of the oldest write not yet committed",
    "cloud_uploaded_bytes_total": "chunk bytes uploaded to the provider",
    "cloud_downloaded_bytes_total": "chunk bytes downloaded from the provider",
    "cloud_download_latency_seconds": "mean chunk download time over the interval",
    "upload_errors_total": "chunk uploads and map commits that failed",
    "destage_errors_total": "destage passes that failed",
    "read_bytes_total": "bytes read by NBD clients",
    "write_bytes_total": "bytes written by NBD clients",
    "read_latency_seconds": "mean read latency over the interval",
    "write_latency_seconds": "mean write latency (to the log) over the interval",
    "recovery_point_age_seconds": "seconds since the last committed upload (0: all committed)",
    "io_wait_seconds_total": "time the local disks under the gateway's files spent on I/O",
    "nbd_connections": "open NBD connections",
    "nbd_requests_in_flight": "NBD requests taken and not answered",
    "control_channel_connected": "1 while the control channel to the provider is up",
    "swap_pause_seconds": "the I/O pause of the swap that started this daemon",
    "clock_skew_seconds": "this gateway's clock minus the provider's",
    "disk_errors_total": "I/O errors of the write log, volume disks and cache files",
    "uptime_seconds": "seconds since this daemon started",
    "passthrough": "1 while the volume writes through to its disk (log unusable)",
    "restore_in_progress": "1 while a lazy restore fills the volume",
    "size_bytes": "the volume's size",
}


@dataclass
class Sources:
    """Where the metrics are read from: the daemon's own objects (getters where they
    change while it runs)."""

    engine: VolumeEngine
    destager: Destager
    server: NbdServer
    uploader: Uploader | None = None
    cache: ChunkCache | None = None
    downloads: Callable[[], list[BlockApiClient]] = list
    control_connected: Callable[[], bool | None] = lambda: None
    swap_pause: Callable[[], float | None] = lambda: None
    disk_paths: Callable[[], list[str]] = list
    clock_skew: Callable[[], float | None] = lambda: None


@dataclass
class Baseline:
    """A consumer's previous sample of the counters behind the interval means."""

    counts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """Wire metrics: per gateway and per volume (``sgw.common.health``'s names)."""

    gateway: dict[str, float]
    volumes: dict[str, dict[str, float]]
    raw: dict[str, float]  # the counters behind the means (Prometheus exposes them too)


class Sampler:
    """Reads ``Sources`` into ``Sample``s; ``tick`` keeps the queue-age bookkeeping."""

    def __init__(self, sources: Sources, *, clock: Callable[[], float] = time.time) -> None:
        self.src = sources
        self._clock = clock
        self.started = time.monotonic()
        log = sources.engine.log
        now = clock()
        # (log.next_seq, wall time): the log's head as seen at each tick.
        self._ticks: deque[tuple[int, float]] = deque([(log.tail_seq, now)], maxlen=MAX_TICKS)
        self._clean_at: dict[str, float] = {}  # when each volume last had nothing queued
        self._disks: list[str] | None = None

    def tick(self) -> None:
        """Notes the log's head and which volumes hold nothing in it (every TICK_S)."""
        engine = self.src.engine
        now = self._clock()
        if self._ticks[-1][0] != engine.log.next_seq:
            self._ticks.append((engine.log.next_seq, now))
        for name in engine.volumes:
            if not engine.holds_log_data(name):
                self._clean_at[name] = now

    def oldest_queued(self) -> float:
        """Seconds the oldest record in the log has waited (to TICK_S; 0: log empty)."""
        log = self.src.engine.log
        if log.tail_seq >= log.next_seq:
            return 0.0
        ticks = self._ticks
        while len(ticks) >= 2 and ticks[1][0] <= log.tail_seq:
            ticks.popleft()
        return max(0.0, self._clock() - ticks[0][1])

    def counters(self) -> dict[str, float]:
        """The raw running totals (gateway-wide)."""
        src = self.src
        vols = list(src.engine.volumes.values())
        clients = src.downloads()
        raw: dict[str, float] = {
            "reads": sum(v.io.reads for v in vols),
            "read_seconds": sum(v.io.read_ns for v in vols) / 1e9,
            "writes": sum(v.io.writes for v in vols),
            "write_seconds": sum(v.io.write_ns for v in vols) / 1e9,
            "read_bytes_total": sum(v.io.read_bytes for v in vols),
            "write_bytes_total": sum(v.io.write_bytes for v in vols),
            "cloud_downloads": sum(c.downloads for c in clients),
            "cloud_download_seconds": sum(c.download_seconds for c in clients),
            "cloud_downloaded_bytes_total": sum(c.downloaded_bytes for c in clients),
            "cloud_uploaded_bytes_total": 0 if src.uploader is None else src.uploader.bytes_sent,
            "upload_errors_total": 0 if src.uploader is None else src.uploader.errors,
            "destage_errors_total": src.destager.errors_total,
            "disk_errors_total": src.server.disk_errors,
            "io_wait_seconds_total": self._io_wait(),
        }
        if src.cache is not None:
            stats = src.cache.stats()
            raw["cache_hits"] = stats.hits
            raw["cache_misses"] = stats.misses
            raw["disk_errors_total"] += stats.corrupt
        return raw

    def sample(self, baseline: Baseline) -> Sample:
        """Every metric now; the means over the interval since ``baseline`` (updated)."""
        src = self.src
        engine = src.engine
        log = engine.log
        now = self._clock()
        raw = self.counters()
        prev, baseline.counts = baseline.counts, dict(raw)

        def delta(key: str) -> float:
            return raw.get(key, 0.0) - prev.get(key, 0.0)

        g: dict[str, float] = {k: raw[k] for k in _COUNTERS}
        g["read_latency_seconds"] = _mean(delta("read_seconds"), delta("reads"))
        g["write_latency_seconds"] = _mean(delta("write_seconds"), delta("writes"))
        g["cloud_download_latency_seconds"] = _mean(
            delta("cloud_download_seconds"), delta("cloud_downloads")
        )
        g["log_used_bytes"] = log.used
        g["log_used_percent"] = 100.0 * log.used / log.data_size
        vols = list(engine.volumes.values())
        g["queued_write_bytes"] = sum(v.dirty_bytes for v in vols)
        g["queued_write_oldest_seconds"] = self.oldest_queued()
        if src.cache is not None:
            hits, misses = delta("cache_hits"), delta("cache_misses")
            g["cache_hit_percent"] = 100.0 * hits / (hits + misses) if hits + misses else 100.0
            cap = src.cache.capacity
            g["cache_used_percent"] = 100.0 * src.cache.clean_bytes / cap
            dirty = sum(v.dirty_bytes for v in vols if v.cached is not None)
            g["cache_dirty_percent"] = min(100.0, 100.0 * dirty / cap)
        g["nbd_connections"] = len(src.server.connections)
        g["nbd_requests_in_flight"] = sum(c.in_flight for c in src.server.connections)
        connected = src.control_connected()
        if connected is not None:
            g["control_channel_connected"] = 1.0 if connected else 0.0
        pause = src.swap_pause()
        if pause is not None:
            g["swap_pause_seconds"] = pause
        skew = src.clock_skew()
        if skew is not None:
            g["clock_skew_seconds"] = skew
        g["uptime_seconds"] = time.monotonic() - self.started

        committed = {} if src.uploader is None else src.uploader.committed_at
        volumes: dict[str, dict[str, float]] = {}
        worst_rpo = 0.0
        for vol in sorted(vols, key=lambda v: v.name)[:MAX_VOLUMES_PER_REPORT]:
            io = vol.io
            key = f"volume:{vol.name}:"
            vraw = {
                "reads": io.reads,
                "read_seconds": io.read_ns / 1e9,
                "writes": io.writes,
                "write_seconds": io.write_ns / 1e9,
            }
            for k, v in vraw.items():
                baseline.counts[key + k] = v
            clean_at = self._clean_at.get(vol.name, self._start_wall(now))
            holds = engine.holds_log_data(vol.name)
            queued_age = max(0.0, now - clean_at) if holds else 0.0
            rpo = max(0.0, now - max(clean_at, committed.get(vol.name, 0.0))) if holds else 0.0
            worst_rpo = max(worst_rpo, rpo)
            m: dict[str, float] = {
                "read_bytes_total": io.read_bytes,
                "write_bytes_total": io.write_bytes,
                "read_latency_seconds": _mean(
                    vraw["read_seconds"] - prev.get(key + "read_seconds", 0.0),
                    vraw["reads"] - prev.get(key + "reads", 0.0),
                ),
                "write_latency_seconds": _mean(
                    vraw["write_seconds"] - prev.get(key + "write_seconds", 0.0),
                    vraw["writes"] - prev.get(key + "writes", 0.0),
                ),
                "queued_write_bytes": vol.dirty_bytes,
                "queued_write_oldest_seconds": queued_age,
                "recovery_point_age_seconds": rpo,
                "passthrough": 1.0 if vol.status == VolumeStatus.PASS_THROUGH else 0.0,
                "restore_in_progress": 1.0 if vol.restore is not None else 0.0,
                "size_bytes": vol.size,
            }
            if vol.cached is not None:
                m["cloud_downloaded_bytes_total"] = vol.cached.fetched_bytes
            volumes[vol.name] = {k: float(v) for k, v in m.items()}
        g["recovery_point_age_seconds"] = worst_rpo
        return Sample({k: float(v) for k, v in g.items()}, volumes, raw)

    def _start_wall(self, now: float) -> float:
        return now - (time.monotonic() - self.started)

    def _io_wait(self) -> float:
        """Seconds the disks under the gateway's files spent doing I/O (/proc/diskstats)."""
        if self._disks is None:
            self._disks = _block_devices(self.src.disk_paths())
        if not self._disks:
            return 0.0
        total_ms = 0
        try:
            with open("/proc/diskstats") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 12 and parts[2] in self._disks:
                        total_ms += int(parts[12])
        except OSError:
            return 0.0
        return total_ms / 1000.0


def _mean(total: float, count: float) -> float:
    return total / count if count > 0 else 0.0


def _block_devices(paths: list[str]) -> list[str]:
    """The kernel names (as in /proc/diskstats) of the block devices under ``paths``."""
    names: set[str] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        dev = st.st_rdev if st.st_rdev and not os.path.isdir(path) else st.st_dev
        try:
            with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") as f:
                for line in f:
                    if line.startswith("DEVNAME="):
                        names.add(line.strip().split("=", 1)[1])
        except OSError:
            continue  # not a block device (tmpfs, overlay): no I/O wait to read
    return sorted(names)


class HealthCollector(Collector):
    """Exposes a ``Sampler`` to prometheus-client: read at each scrape, the means over
    the interval since the previous scrape."""

    def __init__(self, sampler: Sampler, labels: Callable[[], dict[str, str]]) -> None:
        self.sampler = sampler
        self.labels = labels  # build info: version, kernel, hypervisor
        self._baseline = Baseline()

    def collect(self) -> Iterator[Metric]:
        sample = self.sampler.sample(self._baseline)
        info = self.labels()
        build = GaugeMetricFamily(
            "sgw_build_info", "the gateway's software and platform", labels=sorted(info)
        )
        build.add_metric([info[k] for k in sorted(info)], 1.0)
        yield build
        for name, value in sorted(sample.gateway.items()):
            yield _family(f"sgw_{name}", name, value)
        for name, help_text in (
            ("reads", "NBD reads answered"),
            ("read_seconds", "summed NBD read latency"),
            ("writes", "NBD writes in the log"),
            ("write_seconds", "summed NBD write latency"),
            ("cloud_downloads", "chunks downloaded"),
            ("cloud_download_seconds", "summed chunk download time"),
            ("cache_hits", "chunk cache hits"),
            ("cache_misses", "chunk cache misses"),
        ):
            if name in sample.raw:
                c = CounterMetricFamily(f"sgw_{name}", help_text)
                c.add_metric([], sample.raw[name])
                yield c
        per: dict[str, list[tuple[str, float]]] = {}
        for vol, metrics in sample.volumes.items():
            for name, value in metrics.items():
                per.setdefault(name, []).append((vol, value))
        for name, rows in sorted(per.items()):
            fam: GaugeMetricFamily | CounterMetricFamily
            help_text = _HELP.get(name, name)
            if name.endswith("_total"):
                fam = CounterMetricFamily(f"sgw_volume_{name}", help_text, labels=["volume"])
            else:
                fam = GaugeMetricFamily(f"sgw_volume_{name}", help_text, labels=["volume"])
            for vol, value in rows:
                fam.add_metric([vol], value)
            yield fam


def _family(full: str, name: str, value: float) -> Metric:
    help_text = _HELP.get(name, name)
    fam: GaugeMetricFamily | CounterMetricFamily
    if name.endswith("_total"):
        fam = CounterMetricFamily(full, help_text)
    else:
        fam = GaugeMetricFamily(full, help_text)
    fam.add_metric([], value)
    return fam


def build_registry(sampler: Sampler, labels: Callable[[], dict[str, str]]) -> CollectorRegistry:
    """A registry of its own for this daemon (never prometheus-client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(sampler, labels))
    return registry
