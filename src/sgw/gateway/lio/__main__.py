"""``python -m sgw.gateway.lio cleanup|status --config FILE``.

``cleanup`` removes the gateway's LIO objects and detaches its NBD devices: the
appliance runs it at shutdown, after the gateway's unit stopped (sgw-lio-cleanup.service),
so that a daemon that died leaves nothing behind that would hang the shutdown; never when
the daemon merely exits (a swap's successor, or the restarted daemon, serves the same
devices). ``status`` prints the gateway's live LIO targets as JSON (each with its access:
``closed``, ``chap N``, ``acl N`` or ``OPEN``; LIO does not know why a target is open,
``sgw gateway status`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys

from sgw.common.errors import SgwError
from sgw.common.logs import setup_logging
from sgw.gateway.lio.settings import LioConfig

LOG = logging.getLogger("sgw.gateway.lio")


def _settings(config_file: str | None) -> LioConfig:
    """The ``[lio]`` settings of the configuration, or the defaults if it cannot be read
    (a clean-up must work even then)."""
    if config_file:
        from sgw.gateway import config as cfg

        try:
            lio = cfg.load(config_file).lio
        except SgwError as exc:
            LOG.warning("configuration unreadable (%s): default [lio] settings", exc)
        else:
            if lio is not None:
                return lio
    return LioConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgw.gateway.lio")
    parser.add_argument("command", choices=["cleanup", "status"])
    parser.add_argument("--config", metavar="FILE", help="the gateway's TOML configuration")
    args = parser.parse_args(argv)
    setup_logging("info")
    settings = _settings(args.config)
    try:
        if args.command == "cleanup":
            from sgw.gateway.lio.exporter import LioExporter

            exporter = LioExporter(settings, "", "0" * 12)
            asyncio.run(exporter.clear(devices_first=True))  # no daemon serves them
            return 0
        from sgw.gateway.lio.kernel import RtslibLio

        live = RtslibLio().live()
        out = [
            {
                **{k: v for k, v in dataclasses.asdict(spec).items() if k != "access"},
                "access": spec.access.label(),
                "open": spec.access.open,
                "initiators": [
                    {
                        "initiator": a.initiator,
                        "chap": a.chap,
                        "mutual": bool(a.target_secret),
                    }
                    for a in spec.access.initiators
                ],
                "tpg_attributes": dict(spec.tpg_attributes),
                "parameters": dict(spec.parameters),
                "backstore_attributes": dict(spec.backstore_attributes),
            }
            for spec in live.values()
        ]
        json.dump({"targets": out}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    except SgwError as exc:
        print(f"sgw.gateway.lio {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
