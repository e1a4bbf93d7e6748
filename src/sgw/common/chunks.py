"""The chunk format that the gateway writes and the provider stores.

A volume is cut into chunks (``CHUNK_SIZE`` bytes by default). A chunk is named by the
SHA-256 of its plaintext (``chunk_id``), so equal data is stored once and a reader can
check that it got what it asked for. All-zero chunks are never stored (``is_zero``).

Stored layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"SGWC"
    4       1     format version (1)
    5       1     flags: 0x01 zstd-compressed, 0x02 AES-256-GCM-encrypted
    6       2     reserved, zero
    8       4     plaintext length
    12      4     CRC32C of bytes [0, 12) followed by bytes [16, end)
    16      12    nonce                         (encrypted chunks only)
    ..      n     payload: the plaintext, or its zstd frame when that is smaller
    ..      16    GCM tag                       (encrypted chunks only)

The payload is compressed first, then encrypted with the volume's 32-byte key under a
fresh random nonce; the first 12 header bytes (magic, version, flags, length) are the
associated data, so they cannot be changed without the key. The CRC32C covers the whole
blob and needs no key: anyone (the provider scrubbing its store, too) can tell damaged
bytes from a wrong key, and decode reports them as ``ChunkCorruptError`` and
``ChunkKeyError`` respectively. Empty data is a valid chunk (it round-trips), though an
empty chunk counts as all-zero and is never stored in practice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass

import zstandard
from crc32c import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sgw.common.errors import ChunkCorruptError, ChunkKeyError

LOG = logging.getLogger(__name__)

# 1 MiB: large enough that per-object overhead (requests, map entries) stays small, small
# enough that a 4 KiB write re-uploads little and a cache miss fetches little.
CHUNK_SIZE = 1024 * 1024
# Bounds what a hostile or damaged header can make decode allocate (bytes of plaintext).
MAX_CHUNK_SIZE = 64 * 1024 * 1024
# zstd's own default: near level 1 in speed on block data, a few percent smaller output.
ZSTD_LEVEL = 3

MAGIC = b"SGWC"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
FLAG_AES_GCM = 0x02
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_AES_GCM

KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # GCM's standard nonce; random nonces are safe for ~2**32 chunks per key
TAG_SIZE = 16

# magic, version, flags, reserved, plaintext length; these 12 bytes are the GCM AAD.
_FIELDS = struct.Struct("<4sBBHI")
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size

_ZEROS = bytes(CHUNK_SIZE)

# What the functions below read: any contiguous byte buffer, so callers can pass slices of
# a larger buffer (memoryview) without copying.
BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ChunkInfo:
    """What the header of a stored chunk says, after its checksum was verified."""

    version: int
    compressed: bool
    encrypted: bool
    plaintext_length: int
    stored_length: int


class _Codecs(threading.local):
    """One zstd compressor and decompressor per thread: they are not thread-safe, and
    creating them per call costs more than compressing a small chunk."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=False, write_content_size=True
        )
        self.decompressor = zstandard.ZstdDecompressor()


_codecs = _Codecs()


def chunk_id(data: BytesLike) -> str:
    """The content address of a chunk: the hex SHA-256 of its plaintext."""
    return hashlib.sha256(data).hexdigest()


def is_zero(data: BytesLike) -> bool:
    """True if every byte is zero (an empty buffer too): such chunks are never stored."""
    # bytes.startswith compares with memcmp and takes any buffer, without a copy (a
    # memoryview == bytes comparison goes item by item).
    with memoryview(data) as view, view.cast("B") as octets:
        return all(
            _ZEROS.startswith(octets[i : i + CHUNK_SIZE]) for i in range(0, len(octets), CHUNK_SIZE)
        )


@dataclass(frozen=True, slots=True)
class Payload:
    """What a chunk will store: its payload (the plaintext, or a zstd frame of it) and
    the plaintext's length (``prepare_payload``)."""

    data: BytesLike
    compressed: bool
    length: int

    def encoded_size(self, encrypted: bool) -> int:
        """The size of the stored chunk (``encode_into`` fills exactly that many bytes)."""
        return HEADER_SIZE + len(self.data) + (NONCE_SIZE + TAG_SIZE if encrypted else 0)


def prepare_payload(
    data: BytesLike, *, frame: BytesLike | None = None, compress: bool = True
) -> Payload:
    """The payload of a chunk of ``data``: compressed if that helps.

    ``frame``: a zstd frame of ``data`` that ``inflate_frame`` accepted (the upload's own
    wire frame). It becomes the payload as it is when it is smaller than ``data``, which
    saves compressing again; a frame that is not smaller means ``data`` is stored raw.
    ``compress=False`` (and no frame) stores ``data`` raw without trying: the sender
    found it incompressible already.
    """
    length = len(data)
    if length > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk of {length} bytes exceeds the maximum of {MAX_CHUNK_SIZE}")
    payload, compressed = _compress(data, frame) if compress or frame else (data, False)
    return Payload(payload, compressed, length)


def encode_into(view: memoryview, payload: Payload, key: BytesLike | None) -> None:
    """Writes the stored chunk of ``payload`` into ``view`` (exactly
    ``payload.encoded_size(key is not None)`` bytes): encrypted with ``key`` (32 bytes,
    AES-256-GCM) if one is given, always checksummed."""
    if key is not None and len(key) != KEY_SIZE:
        raise ValueError(f"chunk key must be {KEY_SIZE} bytes (AES-256), got {len(key)}")
    if len(view) != payload.encoded_size(key is not None):
        raise ValueError(f"chunk of {len(view)} bytes cannot hold this payload")
    flags = (FLAG_ZSTD if payload.compressed else 0) | (FLAG_AES_GCM if key is not None else 0)
    fields = _FIELDS.pack(MAGIC, FORMAT_VERSION, flags, 0, payload.length)
    body_start = HEADER_SIZE + (NONCE_SIZE if key is not None else 0)
    view[: _FIELDS.size] = fields
    if key is None:
        view[body_start:] = payload.data
    else:
        nonce = os.urandom(NONCE_SIZE)
        view[HEADER_SIZE:body_start] = nonce
        AESGCM(key).encrypt_into(nonce, payload.data, fields, view[body_start:])
    _CRC.pack_into(view, _FIELDS.size, crc32c(view[HEADER_SIZE:], crc32c(fields)))


def encode_chunk(
    data: BytesLike,
    key: BytesLike | None,
    *,
    frame: BytesLike | None = None,
    compress: bool = True,
) -> bytearray:
    """Turns plaintext into a stored chunk: compressed if that helps (see
    ``prepare_payload`` for ``frame`` and ``compress``), encrypted with ``key`` (32
    bytes, AES-256-GCM) if one is given, always checksummed. The blob is built in one
    buffer, without intermediate copies of the data.
    """
    if key is not None and len(key) != KEY_SIZE:
        raise ValueError(f"chunk key must be {KEY_SIZE} bytes (AES-256), got {len(key)}")
    payload = prepare_payload(data, frame=frame, compress=compress)
    blob = bytearray(payload.encoded_size(key is not None))
    with memoryview(blob) as view:
        encode_into(view, payload, key)
    return blob


def inflate_frame(body: BytesLike, limit: int) -> bytes | None:
    """The plaintext of ``body`` if it is exactly one zstd frame that declares its content
    size (at most ``limit`` bytes) and inflates to exactly that many; else None.

    Such a frame can be stored as a chunk's payload as it is (``encode_chunk(frame=...)``):
    ``decode_chunk`` inflates it to the same bytes. None covers everything else (several
    frames, trailing bytes, no declared size, more than ``limit``, damage), for the caller
    to inflate the general way and report; nothing here raises for bad input.
    """
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        return None
    if not 0 <= declared <= limit:  # -1: the frame does not declare its size
        return None
    try:
        # The output buffer is the declared size, so a frame cannot inflate past it.
        data = _codecs.decompressor.decompress(body, allow_extra_data=False)
    except zstandard.ZstdError:
        return None
    return data if len(data) == declared else None


def _compress(data: BytesLike, frame: BytesLike | None) -> tuple[BytesLike, bool]:
    """The payload for ``data`` and whether it is compressed."""
    length = len(data)
    if not length:
        return data, False
    if frame is not None:
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError:
            declared = -1
        if declared != length:
            raise ValueError(f"zstd frame declares {declared} bytes, the chunk has {length}")
        packed: BytesLike = frame
    else:
        packed = _codecs.compressor.compress(data)
    if len(packed) < length:
        return packed, True
    return data, False


def check_chunk(blob: BytesLike) -> ChunkInfo:
    """Verifies a stored chunk's header, structure and checksum; needs no key.

    Raises ChunkCorruptError naming what is wrong. Decryption and decompression are left
    to ``decode_chunk``, which calls this first.
    """
    size = len(blob)
    if size < HEADER_SIZE:
        raise ChunkCorruptError(
            f"chunk is truncated: {size} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    view = memoryview(blob)
    magic, version, flags, reserved, length = _FIELDS.unpack_from(view)
    if magic != MAGIC:
        raise ChunkCorruptError(f"not a chunk: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ChunkCorruptError(
            f"chunk format version {version} is not supported (this release reads "
            f"version {FORMAT_VERSION}); upgrade, or the chunk is damaged"
        )
    if flags & ~_KNOWN_FLAGS or reserved:
        raise ChunkCorruptError(f"chunk header has unknown flags {flags:#x}/{reserved:#x}")
    if length > MAX_CHUNK_SIZE:
        raise ChunkCorruptError(
            f"chunk header claims {length} bytes of data, more than the maximum {MAX_CHUNK_SIZE}"
        )
    (stored_crc,) = _CRC.unpack_from(view, _FIELDS.size)
    crc = crc32c(view[HEADER_SIZE:], crc32c(view[: _FIELDS.size]))
    if crc != stored_crc:
        raise ChunkCorruptError(
            f"chunk checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x}): "
            f"the chunk's {size} bytes are damaged or truncated"
        )
    encrypted = bool(flags & FLAG_AES_GCM)
    compressed = bool(flags & FLAG_ZSTD)
    payload = size - HEADER_SIZE - (NONCE_SIZE + TAG_SIZE if encrypted else 0)
    if payload < 0:
        raise ChunkCorruptError(f"encrypted chunk is truncated: {size} bytes")
    if not compressed and payload != length:
        raise ChunkCorruptError(
            f"uncompressed chunk holds {payload} bytes of data, its header says {length}"
        )
    return ChunkInfo(FORMAT_VERSION, compressed, encrypted, length, size)


def decode_chunk(blob: BytesLike, key: BytesLike | None, expected_id: str | None = None) -> bytes:
    """Turns a stored chunk back into its plaintext, verifying everything on the way.

    ``key`` must be given exactly when the chunk is encrypted: a plain chunk read with a
    key is refused (ChunkKeyError), so that whoever controls the store cannot swap in
    unauthenticated data for an encrypted volume. If ``expected_id`` is given, the
    plaintext's SHA-256 must match it. Damaged bytes raise ChunkCorruptError; a missing,
    wrong or unexpected key raises ChunkKeyError.
    """
    info = check_chunk(blob)
    view = memoryview(blob)
    payload: bytes | memoryview
    if info.encrypted:
        if key is None:
            raise ChunkKeyError("chunk is encrypted and no key was given: configure the volume key")
        if len(key) != KEY_SIZE:
            raise ChunkKeyError(f"chunk key must be {KEY_SIZE} bytes (AES-256), got {len(key)}")
        nonce = view[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        try:
            payload = AESGCM(key).decrypt(
                nonce, view[HEADER_SIZE + NONCE_SIZE :], view[: _FIELDS.size]
            )
        except InvalidTag:
            raise ChunkKeyError(
                "chunk authentication failed although its checksum is intact: the key is "
                "wrong (or the chunk was altered deliberately)"
            ) from None
    else:
        if key is not None:
            raise ChunkKeyError(
                "chunk is not encrypted but a key was given: refusing unauthenticated data "
                "for an encrypted volume"
            )
        payload = view[HEADER_SIZE:]
    data = _decompress(payload, info.plaintext_length) if info.compressed else bytes(payload)
    if expected_id is not None:
        actual = chunk_id(data)
        if actual != expected_id:
            raise ChunkCorruptError(
                f"chunk content does not match its id: expected {expected_id}, got {actual}"
            )
    return data


def _decompress(payload: BytesLike, length: int) -> bytes:
    """Inflates one zstd frame that must hold exactly ``length`` bytes."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise ChunkCorruptError(f"chunk's compressed payload is not a zstd frame: {e}") from None
    if declared != length:
        raise ChunkCorruptError(
            f"chunk's zstd frame declares {declared} bytes, its header says {length}"
        )
    try:
        data = _codecs.decompressor.decompress(payload, max_output_size=length)
    except zstandard.ZstdError as e:
        raise ChunkCorruptError(f"chunk's compressed payload is damaged: {e}") from None
    if len(data) != length:
        raise ChunkCorruptError(f"chunk inflated to {len(data)} bytes, its header says {length}")
    return data
