"""The fleet's newest samples as Prometheus metrics (``GET /metrics``).

A custom collector reads every active gateway's newest report from the database at each
scrape (one indexed read of ``health_gateways``, no per-sample state in the process, so
every provider process serves the same answer). Names are ``sgw_<metric>`` (the module doc
of ``sgw.common.health``); ``_total`` metrics are counters, the rest gauges. Labels:
``gateway`` (its id), ``gateway_name``, ``version`` and, on a volume's samples,
``volume`` (the gateway's name for it): a family's samples without ``volume`` are the
gateway's own. Their values are bounded: the metric names are the wire format's fixed
sets, a gateway reports at most 256 volumes, labels are at most 100 characters.
``sgw_health_last_report_timestamp_seconds`` is when the provider received the newest
report (alert on ``time() - it``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from sgw.common.health import GATEWAY_METRICS, VOLUME_METRICS
from sgw.provider.health.store import HealthStore

LOG = logging.getLogger(__name__)

PREFIX = "sgw_"
LAST_REPORT = "sgw_health_last_report_timestamp_seconds"


class FleetCollector(Collector):
    """Every active gateway's newest sample, read from the health store at each scrape."""

    def __init__(self, store: HealthStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name in sorted(GATEWAY_METRICS | VOLUME_METRICS):
            counter = name.endswith("_total")
            family = PREFIX + (name.removesuffix("_total") if counter else name)
            families[name] = Metric(
                family,
                f"the gateways' {name} (sgw.common.health)",
                "counter" if counter else "gauge",
            )
        last = Metric(
            LAST_REPORT, "when the provider received the gateway's newest report", "gauge"
        )
        for gateway_name, latest in self.store.latest_all():
            labels = {
                "gateway": latest.gateway_id,
                "gateway_name": gateway_name,
                "version": latest.labels["version"],
            }
            last.add_sample(LAST_REPORT, labels, latest.received.timestamp())
            for name, value in latest.gateway.items():
                if name in families:
                    families[name].add_sample(PREFIX + name, labels, value)
            for volume, metrics in latest.volumes.items():
                for name, value in metrics.items():
                    if name in families:
                        families[name].add_sample(
                            PREFIX + name, {**labels, "volume": volume}, value
                        )
        yield last
        yield from (f for f in families.values() if f.samples)


def registry(store: HealthStore) -> CollectorRegistry:
    """A registry of the fleet's metrics alone (not this process's own)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(store))
    return reg
