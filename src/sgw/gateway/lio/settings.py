"""The ``[lio]`` section of the gateway configuration: iSCSI export of the volumes.

Off unless ``enabled = true`` (the appliance's configuration turns it on)::

    [lio]
    enabled = true
    iqn_base = "iqn.2024-01.com.example:gw1"  # default: iqn.2024-01.org.sgw:<identity id>
    portal = "0.0.0.0:3260"                   # where initiators connect
    block_size = 512                          # the LUNs' logical block size: 512 or 4096
    max_sectors_kb = 1024                     # largest request passed to /dev/nbdN (KiB)
    cmdsn_depth = 128                         # commands an initiator may have queued
    max_recv_data_segment_length = 262144     # iSCSI login parameters (bytes)
    max_xmit_data_segment_length = 262144
    max_burst_length = 1048576
    first_burst_length = 262144
    runtime_dir = "/run/sgw"                  # where the /dev/nbdN attachments are recorded

Initiator ACLs and CHAP secrets come from ``DATA_DIR/chap.json`` (see
:mod:`sgw.gateway.lio.access`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from sgw.common.errors import ConfigError

# An iSCSI qualified name as RFC 3720 and rtslib-fb accept it (lower case, no '_').
# Checked with fullmatch: ``$`` would also accept a trailing newline.
IQN = re.compile(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9][a-z0-9.-]*(:[a-z0-9][a-z0-9.:-]*)?")
# RFC 3720 bounds of the data segment and burst lengths (bytes).
_MIN_LENGTH = 512
_MAX_LENGTH = (1 << 24) - 1
# LIO accepts a command-sequence depth of 1 to 512 (TA_DEFAULT_CMDSN_DEPTH is 64).
_MAX_CMDSN_DEPTH = 512
# The NBD driver's largest request is 32 MiB; the floor for throughput is 512 KiB.
_MIN_SECTORS_KB = 512
_MAX_SECTORS_KB = 32768

LIO_KEYS = {
    "enabled",
    "iqn_base",
    "portal",
    "block_size",
    "max_sectors_kb",
    "cmdsn_depth",
    "max_recv_data_segment_length",
    "max_xmit_data_segment_length",
    "max_burst_length",
    "first_burst_length",
    "runtime_dir",
}


@dataclass(frozen=True)
class LioConfig:
    """How the gateway exports its volumes through LIO (see the module docstring)."""

    enabled: bool = False
    iqn_base: str | None = None  # None: derived from the gateway's identity key
    portal_host: str = "0.0.0.0"
    portal_port: int = 3260
    block_size: int = 512  # bytes; the LUN's logical block size (the NBD device's block size)
    max_sectors_kb: int = 1024  # KiB; /sys/block/nbdN/queue/max_sectors_kb
    cmdsn_depth: int = 128  # the TPG's default_cmdsn_depth
    max_recv_data_segment_length: int = 262144  # bytes
    max_xmit_data_segment_length: int = 262144  # bytes
    max_burst_length: int = 1048576  # bytes
    first_burst_length: int = 262144  # bytes
    runtime_dir: str = "/run/sgw"


def parse_lio(table: dict[str, Any]) -> LioConfig | None:
    """``[lio]`` as a LioConfig; None when the section is absent."""
    if not table:
        return None
    extra = set(table) - LIO_KEYS
    if extra:
        raise ConfigError(f"config: [lio] has unknown key(s) {sorted(extra)}")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("lio.enabled: must be true or false")
    base = table.get("iqn_base")
    if base is not None and (not isinstance(base, str) or not IQN.fullmatch(base)):
        raise ConfigError(
            f"lio.iqn_base: {base!r} is not an iSCSI qualified name in lower case, "
            'e.g. "iqn.2024-01.com.example:gw1"'
        )
    host, port = _portal(table.get("portal", "0.0.0.0:3260"))
    block_size = table.get("block_size", 512)
    if block_size not in (512, 4096) or isinstance(block_size, bool):
        raise ConfigError(f"lio.block_size: {block_size!r} must be 512 or 4096")
    first = _int(table, "first_burst_length", 262144, _MIN_LENGTH, _MAX_LENGTH)
    burst = _int(table, "max_burst_length", 1048576, _MIN_LENGTH, _MAX_LENGTH)
    if first > burst:
        raise ConfigError(
            f"lio.first_burst_length ({first}) must not exceed lio.max_burst_length ({burst})"
        )
    runtime_dir = table.get("runtime_dir", "/run/sgw")
    if not isinstance(runtime_dir, str) or not runtime_dir.startswith("/"):
        raise ConfigError(f"lio.runtime_dir: {runtime_dir!r} must be an absolute path")
    return LioConfig(
        enabled=enabled,
        iqn_base=base,
        portal_host=host,
        portal_port=port,
        block_size=block_size,
        max_sectors_kb=_int(table, "max_sectors_kb", 1024, _MIN_SECTORS_KB, _MAX_SECTORS_KB),
        cmdsn_depth=_int(table, "cmdsn_depth", 128, 1, _MAX_CMDSN_DEPTH),
        max_recv_data_segment_length=_int(
            table, "max_recv_data_segment_length", 262144, _MIN_LENGTH, _MAX_LENGTH
        ),
        max_xmit_data_segment_length=_int(
            table, "max_xmit_data_segment_length", 262144, _MIN_LENGTH, _MAX_LENGTH
        ),
        max_burst_length=burst,
        first_burst_length=first,
        runtime_dir=runtime_dir,
    )


def _portal(text: object) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"lio.portal: {text!r} must be IP:PORT, e.g. 0.0.0.0:3260 (all addresses)"
        )
    return host, int(port)


def _int(table: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"lio.{key}: {value!r} must be a whole number from {lo} to {hi}")
    return value
