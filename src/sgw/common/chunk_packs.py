"""Chunk packs: several chunks in one upload request and in one stored object.

The gateway sends the new chunks of a destage batch a few at a time in one request,
``POST /v1/volumes/{id}/chunk-packs``, instead of one ``PUT`` each: fewer requests on
every leg of an upload (gateway to provider, provider to object store), which is what
an upload's CPU goes into once the bytes themselves are cheap (docs/adr/0005).

Request body (integers big-endian)::

    offset  size    field
    0       4       magic b"SGWK"
    4       1       format version (1)
    5       1       reserved, zero
    6       2       number of chunks n (1 to MAX_PACK_CHUNKS)
    8       37 * n  per chunk: SHA-256 of its plaintext (32 bytes, the chunk id),
                    encoding (1 byte: 0 plaintext, stored as sent; 1 zstd,
                    stored as sent if it is one frame declaring its size),
                    body length (4 bytes)
    ..      ...     the bodies, in the order of the entries, nothing after them

Every chunk is checked by the provider as a single ``PUT`` would be (size, SHA-256, not
all zero); one bad chunk refuses the whole request. A plaintext chunk is stored
uncompressed: send every chunk that zstd shrinks compressed (the gateway does).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from sgw.common.errors import BadRequestError

MAGIC = b"SGWK"
FORMAT_VERSION = 1
MEDIA_TYPE = "application/vnd.sgw.chunk-pack"
# At most this many chunks in one request (the gateway sends 4 by default).
MAX_PACK_CHUNKS = 64
ENCODING_IDENTITY = 0
ENCODING_ZSTD = 1

_HEADER = struct.Struct(">4sBBH")
_ENTRY = struct.Struct(">32sBI")


@dataclass(frozen=True, slots=True)
class PackedChunk:
    """One chunk of a pack request: its id, its body as sent, and whether that is zstd."""

    id: str
    body: bytes | bytearray | memoryview
    zstd: bool


def encode_pack(chunks: Sequence[PackedChunk]) -> bytes:
    """The request body carrying ``chunks`` (1 to MAX_PACK_CHUNKS of them)."""
    if not 1 <= len(chunks) <= MAX_PACK_CHUNKS:
        raise ValueError(f"a chunk pack holds 1 to {MAX_PACK_CHUNKS} chunks, not {len(chunks)}")
    parts: list[bytes | bytearray | memoryview] = [
        _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(chunks))
    ]
    for chunk in chunks:
        encoding = ENCODING_ZSTD if chunk.zstd else ENCODING_IDENTITY
        parts.append(_ENTRY.pack(bytes.fromhex(chunk.id), encoding, len(chunk.body)))
    parts.extend(chunk.body for chunk in chunks)
    return b"".join(parts)


def decode_pack(body: bytes) -> list[PackedChunk]:
    """The chunks of a pack request body (views into ``body``); BadRequestError naming
    what is wrong with a malformed one."""
    if len(body) < _HEADER.size:
        raise BadRequestError(
            f"chunk pack of {len(body)} bytes is shorter than its {_HEADER.size}-byte header"
        )
    magic, version, reserved, count = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise BadRequestError(
            f"the body does not start with the chunk pack magic {MAGIC!r} (got {magic!r}); "
            f"send a chunk pack ({MEDIA_TYPE})"
        )
    if version != FORMAT_VERSION or reserved:
        raise BadRequestError(
            f"chunk pack format version {version} (reserved byte {reserved}): this provider "
            f"reads version {FORMAT_VERSION} with the reserved byte zero"
        )
    if not 1 <= count <= MAX_PACK_CHUNKS:
        raise BadRequestError(
            f"chunk pack declares {count} chunks; send 1 to {MAX_PACK_CHUNKS} per request"
        )
    entries_end = _HEADER.size + count * _ENTRY.size
    if len(body) < entries_end:
        raise BadRequestError(
            f"chunk pack declares {count} chunks but ends inside their entries "
            f"({len(body)} bytes, entries end at {entries_end})"
        )
    view = memoryview(body)
    out: list[PackedChunk] = []
    pos = entries_end
    for i in range(count):
        digest, encoding, length = _ENTRY.unpack_from(body, _HEADER.size + i * _ENTRY.size)
        if encoding not in (ENCODING_IDENTITY, ENCODING_ZSTD):
            raise BadRequestError(
                f"chunk {i} of the pack has encoding {encoding}; use 0 (plaintext) or 1 (zstd)"
            )
        if pos + length > len(body):
            raise BadRequestError(
                f"chunk {i} of the pack ({digest.hex()}) declares {length} bytes but the body "
                f"ends {pos + length - len(body)} bytes short"
            )
        out.append(PackedChunk(digest.hex(), view[pos : pos + length], encoding == ENCODING_ZSTD))
        pos += length
    if pos != len(body):
        raise BadRequestError(
            f"chunk pack has {len(body) - pos} bytes after its last chunk; the entries' "
            "lengths must add up to the body"
        )
    return out
