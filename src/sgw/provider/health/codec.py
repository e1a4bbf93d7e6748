"""The stored form of a sample's or an hour's metrics: one small compressed document.

A row holds ``FORMAT`` (one byte) and then the document as compact JSON, deflated with a
preset dictionary of the metric names (``_ZDICT``): a report's names cost a few bytes
instead of some 600 (measured: 1,983 bytes of JSON for 25 gateway and 3 x 14 volume
metrics deflate to 600 bytes alone, 350 with the dictionary). The dictionary is part of
the format: a new one needs a new format byte, and decoding keeps the old ones.

A sample's document is ``{"g": {metric: value}, "v": {volume: {metric: value}}}``; an
hour's has ``[min, max, mean, last]`` in place of each value.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from sgw.common.errors import SgwError

FORMAT = 1
# Every metric name known when format 1 was fixed, and the document's own keys.
_NAMES_V1 = (
    "cache_hit_percent",
    "cache_used_percent",
    "cache_dirty_percent",
    "log_used_percent",
    "log_used_bytes",
    "queued_write_bytes",
    "queued_write_oldest_seconds",
    "cloud_uploaded_bytes_total",
    "cloud_downloaded_bytes_total",
    "cloud_download_latency_seconds",
    "upload_errors_total",
    "destage_errors_total",
    "read_bytes_total",
    "write_bytes_total",
    "read_latency_seconds",
    "write_latency_seconds",
    "recovery_point_age_seconds",
    "io_wait_seconds_total",
    "nbd_connections",
    "nbd_requests_in_flight",
    "control_channel_connected",
    "swap_pause_seconds",
    "clock_skew_seconds",
    "disk_errors_total",
    "uptime_seconds",
    "passthrough",
    "restore_in_progress",
    "size_bytes",
)
_ZDICT = {FORMAT: ('{"g":{' + ",".join(f'"{n}":0' for n in _NAMES_V1) + '},"v":{"vol0":{').encode()}
_LEVEL = 6


class CorruptHealthDataError(SgwError):
    """A stored health row that does not decode (written by a newer provider?)."""


def encode(doc: dict[str, Any]) -> bytes:
    """The stored form of ``doc`` (whole floats written as integers)."""
    text = json.dumps(_compact(doc), separators=(",", ":")).encode()
    z = zlib.compressobj(_LEVEL, zdict=_ZDICT[FORMAT])
    return bytes([FORMAT]) + z.compress(text) + z.flush()


def decode(data: bytes) -> dict[str, Any]:
    """The document ``encode`` stored."""
    if not data or data[0] not in _ZDICT:
        raise CorruptHealthDataError(
            f"health data in format {data[0] if data else None}, this provider reads "
            f"{sorted(_ZDICT)}: upgrade it"
        )
    z = zlib.decompressobj(zdict=_ZDICT[data[0]])
    doc: dict[str, Any] = json.loads(z.decompress(data[1:]) + z.flush())
    return doc


def _compact(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_compact(v) for v in value]
    return value
