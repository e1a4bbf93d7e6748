"""The appliance's firewall for the optional /metrics endpoint, from the configuration.

The image's nftables ruleset (appliance/etc/nftables.conf.j2) has three empty named
sets, ``metrics_port``, ``metrics_v4`` and ``metrics_v6``, and accepts TCP to a port in
the first from a source in the others. Before each start of the gateway
(sgw-gateway.service, ``ExecStartPre``) this module fills them from ``[metrics]``:
``listen``'s port and the ``allow`` networks; with [metrics] off (or no networks) they
stay empty and nothing is opened. Run as
``python -m sgw.gateway.health.firewall --config /run/sgw/gateway.toml`` (``--print``
only prints the nft script).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import subprocess
import sys

from sgw.common.errors import ConfigError
from sgw.gateway import config as gateway_config
from sgw.gateway.config import MetricsConfig

LOG = logging.getLogger(__name__)

TABLE = "inet filter"


def nft_script(metrics: MetricsConfig) -> str:
    """The nft commands that make the sets say exactly what ``metrics`` allows."""
    lines = [f"flush set {TABLE} {name}" for name in ("metrics_port", "metrics_v4", "metrics_v6")]
    if metrics.host is None or not metrics.allow:
        return "\n".join(lines) + "\n"
    v4 = [n for n in metrics.allow if ipaddress.ip_network(n).version == 4]
    v6 = [n for n in metrics.allow if ipaddress.ip_network(n).version == 6]
    lines.append(f"add element {TABLE} metrics_port {{ {metrics.port} }}")
    if v4:
        lines.append(f"add element {TABLE} metrics_v4 {{ {', '.join(v4)} }}")
    if v6:
        lines.append(f"add element {TABLE} metrics_v6 {{ {', '.join(v6)} }}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="open the gateway's /metrics port to [metrics] allow")
    ap.add_argument("--config", required=True, help="the gateway's TOML configuration")
    ap.add_argument("--print", action="store_true", help="print the nft script, change nothing")
    args = ap.parse_args(argv)
    try:
        cfg = gateway_config.load(args.config)
    except ConfigError as exc:
        print(f"sgw metrics firewall: {exc}", file=sys.stderr)
        return 2
    script = nft_script(cfg.metrics)
    if args.print:
        sys.stdout.write(script)
        return 0
    nft = shutil.which("nft") or "/usr/sbin/nft"
    res = subprocess.run([nft, "-f", "-"], input=script, text=True, check=False)
    if res.returncode != 0:
        print("sgw metrics firewall: nft refused the rules (see above)", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
