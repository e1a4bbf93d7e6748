"""The stored forms of health data: a sample's metrics as one small compressed document
(the recent raw rows and each gateway's newest report), and blocks of many samples or
aggregates, column by column (``encode_block``).

A row holds ``FORMAT`` (one byte) and then the document as compact JSON, deflated with a
preset dictionary of the metric names (``_ZDICT``): a report's names cost a few bytes
instead of some 600 (measured: 1,983 bytes of JSON for 25 gateway and 3 x 14 volume
metrics deflate to 600 bytes alone, 350 with the dictionary). The dictionary is part of
the format: a new one needs a new format byte, and decoding keeps the old ones.

A sample's document is ``{"g": {metric: value}, "v": {volume: {metric: value}}}``.

A block (``Block``, format ``BLOCK_FORMAT``) is a table: one row per sample or per
bucket of time, a column per (scope, metric, statistic) plus whole-number columns of its
own (``seq``, ``samples``, ...). Stored as one zstd frame of varints: each column's
values are scaled to whole numbers at the fewest decimals that hold them exactly (a
gateway's 0.1 % or whole bytes cost a scale of 1 or 0; a value no scale holds makes the
column 8-byte floats), divided by their steps' greatest common divisor (bytes moved in
4 KiB blocks), delta-coded down the rows and zigzag-varint written, so steady
gauges and steadily growing counters cost about a byte a value before zstd. Metric and
statistic names are numbers (``_NAMES_V1``, ``STATS``): both tuples only ever grow at the
end.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard

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


BLOCK_FORMAT = 2
# The statistics a column can hold; a raw sample's value is "v".
STATS = ("v", "min", "max", "sum", "n", "first", "last", "inc")
_FLOAT = 255  # the scale byte of a column of 8-byte floats
_MAX_SCALE = 6
_ZSTD_LEVEL = 9
_METRIC_IDS = {name: i for i, name in enumerate(_NAMES_V1)}
_STAT_IDS = {name: i for i, name in enumerate(STATS)}

Key = tuple[str, str, str]  # (scope: "" for the gateway or a volume name, metric, stat)


@dataclass(slots=True)
class Block:
    """Rows of samples or buckets: ``at`` (epoch seconds) per row, whole-number columns
    ``ints`` and value columns ``cols`` (None where a row lacks the value)."""

    at: list[int] = field(default_factory=list)
    ints: dict[str, list[int]] = field(default_factory=dict)
    cols: dict[Key, list[float | None]] = field(default_factory=dict)


def encode_block(block: Block) -> bytes:
    """The stored form of ``block`` (see the module doc)."""
    n = len(block.at)
    out = bytearray()
    _uvarint(out, n)
    _ints(out, block.at)
    _uvarint(out, len(block.ints))
    for name, ints in sorted(block.ints.items()):
        _text(out, name)
        _ints(out, ints)
    scopes = sorted({scope for scope, _m, _s in block.cols})
    _uvarint(out, len(scopes))
    for scope in scopes:
        _text(out, scope)
    index = {scope: i for i, scope in enumerate(scopes)}
    _uvarint(out, len(block.cols))
    for (scope, metric, stat), values in sorted(block.cols.items()):
        _uvarint(out, index[scope])
        _uvarint(out, _METRIC_IDS[metric])
        _uvarint(out, _STAT_IDS[stat])
        _values(out, values, n)
    return bytes([BLOCK_FORMAT]) + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(out)


def decode_block(data: bytes) -> Block:
    """The block ``encode_block`` stored."""
    if not data or data[0] != BLOCK_FORMAT:
        raise CorruptHealthDataError(
            f"health block in format {data[0] if data else None}, this provider reads "
            f"{BLOCK_FORMAT}: upgrade it"
        )
    buf = zstandard.ZstdDecompressor().decompress(data[1:])
    r = _Reader(buf)
    n = r.uvarint()
    block = Block(at=r.ints(n))
    for _ in range(r.uvarint()):
        name = r.text()
        block.ints[name] = r.ints(n)
    scopes = [r.text() for _ in range(r.uvarint())]
    for _ in range(r.uvarint()):
        scope, metric, stat = scopes[r.uvarint()], _NAMES_V1[r.uvarint()], STATS[r.uvarint()]
        block.cols[(scope, metric, stat)] = r.values(n)
    return block


def _scale(values: Sequence[float]) -> int:
    """The fewest decimals that hold every value exactly as a 63-bit whole number."""
    for k in range(_MAX_SCALE + 1):
        m = 10**k
        if all(abs(v) * m < 2**62 and float(round(v * m)) / m == v for v in values):
            return k
    return _FLOAT


def _values(out: bytearray, values: Sequence[float | None], n: int) -> None:
    present = [v for v in values if v is not None]
    if len(present) == n:
        out.append(0)
    else:
        out.append(1)
        bits = bytearray((n + 7) // 8)
        for i, v in enumerate(values):
            if v is not None:
                bits[i // 8] |= 1 << (i % 8)
        out += bits
    k = _scale(present)
    out.append(k)
    if k == _FLOAT:
        out += struct.pack(f"<{len(present)}d", *present)
    else:
        ints = [round(v * 10**k) for v in present]
        step = math.gcd(*(b - a for a, b in zip([0, *ints], ints, strict=False))) or 1
        _uvarint(out, step)
        _ints(out, [v // step for v in ints])


def _ints(out: bytearray, values: Sequence[int]) -> None:
    prev = 0
    for v in values:
        d = v - prev
        _uvarint(out, (d << 1) ^ (d >> 63) if -(2**63) <= d < 2**63 else _too_big(d))
        prev = v


def _too_big(d: int) -> int:
    raise ValueError(f"a health block delta of {d} does not fit 64 bits")


def _uvarint(out: bytearray, v: int) -> None:
    v &= (1 << 64) - 1
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _text(out: bytearray, s: str) -> None:
    b = s.encode()
    _uvarint(out, len(b))
    out += b


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def uvarint(self) -> int:
        shift = v = 0
        while True:
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    def ints(self, n: int) -> list[int]:
        out, prev = [], 0
        for _ in range(n):
            z = self.uvarint()
            prev += (z >> 1) ^ -(z & 1)
            out.append(prev)
        return out

    def text(self) -> str:
        n = self.uvarint()
        s = self.buf[self.pos : self.pos + n].decode()
        self.pos += n
        return s

    def values(self, n: int) -> list[float | None]:
        flag = self.buf[self.pos]
        self.pos += 1
        if flag:
            bits = self.buf[self.pos : self.pos + (n + 7) // 8]
            self.pos += (n + 7) // 8
            mask = [bool(bits[i // 8] >> (i % 8) & 1) for i in range(n)]
        else:
            mask = [True] * n
        count = sum(mask)
        k = self.buf[self.pos]
        self.pos += 1
        present: list[float]
        if k == _FLOAT:
            present = list(struct.unpack_from(f"<{count}d", self.buf, self.pos))
            self.pos += 8 * count
        else:
            m, step = 10**k, self.uvarint()
            present = [v * step / m if k else float(v * step) for v in self.ints(count)]
        it = iter(present)
        return [next(it) if p else None for p in mask]
