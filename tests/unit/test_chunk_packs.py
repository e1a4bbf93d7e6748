"""Chunk packs without a server: the request body format (``sgw.common.chunk_packs``),
every way a body can be malformed, the stored pack object format and its damage
detection (``sgw.provider.blockstore.packs``), and ``MemoryStore.get_range``."""

from __future__ import annotations

import hashlib
import struct

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common.chunk_packs import (
    ENCODING_IDENTITY,
    ENCODING_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    MAX_PACK_CHUNKS,
    PackedChunk,
    decode_pack,
    encode_pack,
)
from sgw.common.chunks import check_chunk, decode_chunk, encode_chunk
from sgw.common.errors import (
    BadRequestError,
    ChunkCorruptError,
    ObjectNotFoundError,
    ObjectStoreError,
)
from sgw.provider.blockstore.keys import object_name
from sgw.provider.blockstore.objects import MemoryStore
from sgw.provider.blockstore.packs import (
    build_pack,
    index_bytes,
    new_pack_id,
    pack_format,
    pack_key,
    read_index,
)
from tests.fixtures.chunk_data import sha256_hex

KEY = bytes(range(32))
NAME_KEY = bytes(range(32, 64))


def name_of(chunk_id: str) -> str:
    return object_name(NAME_KEY, chunk_id)


def named(entries: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """What a pack's index says of ``entries`` (chunk id, offset, length): object names."""
    return [(name_of(c), off, n) for c, off, n in entries]


HEADER = struct.Struct(">4sBBH")
ENTRY = struct.Struct(">32sBI")
PACK_ENTRY = struct.Struct(">32sQI")
PACK_TRAILER = 16


def header(
    count: int, *, magic: bytes = MAGIC, version: int = FORMAT_VERSION, reserved: int = 0
) -> bytes:
    return HEADER.pack(magic, version, reserved, count)


def entry(data: bytes, encoding: int = ENCODING_IDENTITY, length: int | None = None) -> bytes:
    return ENTRY.pack(
        hashlib.sha256(data).digest(), encoding, len(data) if length is None else length
    )


def as_tuples(chunks: list[PackedChunk]) -> list[tuple[str, bytes, bool]]:
    return [(c.id, bytes(c.body), c.zstd) for c in chunks]


# The request body: round trips

chunk_bodies = st.lists(st.tuples(st.binary(max_size=300), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(chunk_bodies)
def test_encode_decode_round_trip(bodies: list[tuple[bytes, bool]]) -> None:
    chunks = [PackedChunk(sha256_hex(b + bytes([i])), b, z) for i, (b, z) in enumerate(bodies)]
    wire = encode_pack(chunks)
    assert len(wire) == 8 + 37 * len(chunks) + sum(len(b) for b, _ in bodies)
    assert wire[:4] == MAGIC and wire[4] == FORMAT_VERSION and wire[5] == 0
    assert as_tuples(decode_pack(wire)) == [(c.id, bytes(c.body), c.zstd) for c in chunks]


def test_layout_is_the_documented_one() -> None:
    a, b = b"first body", b"\x00\x01second"
    wire = encode_pack(
        [PackedChunk(sha256_hex(a), a, False), PackedChunk(sha256_hex(b), memoryview(b), True)]
    )
    expected = header(2) + entry(a) + entry(b, ENCODING_ZSTD) + a + b
    assert wire == expected
    decoded = decode_pack(expected)
    assert as_tuples(decoded) == [(sha256_hex(a), a, False), (sha256_hex(b), b, True)]
    # The bodies are views into the request body, not copies.
    assert all(isinstance(c.body, memoryview) and c.body.obj is expected for c in decoded)


def test_the_largest_pack_and_empty_bodies_decode() -> None:
    bodies = [bytes([i + 1]) * (i % 3) for i in range(MAX_PACK_CHUNKS)]
    chunks = [PackedChunk(sha256_hex(bytes([i])), b, i % 2 == 1) for i, b in enumerate(bodies)]
    decoded = decode_pack(encode_pack(chunks))
    assert len(decoded) == MAX_PACK_CHUNKS
    assert as_tuples(decoded) == [(c.id, bytes(c.body), c.zstd) for c in chunks]


@pytest.mark.parametrize("count", [0, MAX_PACK_CHUNKS + 1])
def test_encode_refuses_a_pack_of_no_or_too_many_chunks(count: int) -> None:
    chunks = [PackedChunk(sha256_hex(bytes([i])), b"x", False) for i in range(count)]
    with pytest.raises(ValueError, match=f"1 to {MAX_PACK_CHUNKS} chunks, not {count}"):
        encode_pack(chunks)


# The request body: every malformation is a 400 naming it

A = b"chunk a data"
B = b"chunk b, a little longer"
GOOD = header(2) + entry(A) + entry(B) + A + B

MALFORMED = {
    "empty": (b"", "chunk pack of 0 bytes is shorter than its 8-byte header"),
    "short header": (GOOD[:7], "chunk pack of 7 bytes is shorter than its 8-byte header"),
    "bad magic": (b"SGWP" + GOOD[4:], "does not start with the chunk pack magic b'SGWK'"),
    "json": (b'{"chunks": []}', "(got b'{\"ch')"),
    "version 0": (header(2, version=0) + GOOD[8:], "format version 0 (reserved byte 0)"),
    "version 2": (header(2, version=2) + GOOD[8:], "format version 2 (reserved byte 0)"),
    "reserved byte": (header(2, reserved=1) + GOOD[8:], "format version 1 (reserved byte 1)"),
    "count 0": (header(0), "declares 0 chunks; send 1 to 64 per request"),
    "count 0 with data": (header(0) + entry(A) + A, "declares 0 chunks"),
    "count 65": (
        header(65) + b"".join(entry(bytes([i + 1])) for i in range(65)),
        "declares 65 chunks; send 1 to 64",
    ),
    "count 65535": (header(65535), "declares 65535 chunks"),
    "no entries": (header(1), "declares 1 chunks but ends inside their entries (8 bytes, "),
    "truncated entries": (
        GOOD[: 8 + 37 + 20],
        "ends inside their entries (65 bytes, entries end at 82)",
    ),
    "entries only": (GOOD[: 8 + 2 * 37], None),  # bodies missing: chunk 0 is short
    "encoding 2": (header(1) + entry(A, 2) + A, "chunk 0 of the pack has encoding 2; use 0"),
    "encoding 255 second": (
        header(2) + entry(A) + entry(B, 255) + A + B,
        "chunk 1 of the pack has encoding 255",
    ),
    "first body short": (
        header(1) + entry(A, length=len(A) + 3) + A,
        f"chunk 0 of the pack ({sha256_hex(A)}) declares {len(A) + 3} bytes "
        "but the body ends 3 bytes",
    ),
    "last body short": (
        GOOD[:-1],
        f"chunk 1 of the pack ({sha256_hex(B)}) declares {len(B)} bytes",
    ),
    "length 2**32-1": (
        header(1) + entry(A, length=(1 << 32) - 1) + A,
        "declares 4294967295 bytes",
    ),
    "trailing byte": (GOOD + b"\x00", "chunk pack has 1 bytes after its last chunk"),
    "trailing chunk": (GOOD + A, f"chunk pack has {len(A)} bytes after its last chunk"),
}


@pytest.mark.parametrize(("body", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_are_bad_requests_naming_the_fault(
    body: bytes, fragment: str | None
) -> None:
    with pytest.raises(BadRequestError) as refused:
        decode_pack(body)
    if fragment is not None:
        assert fragment in str(refused.value)


def test_entries_only_names_the_first_missing_body() -> None:
    with pytest.raises(BadRequestError, match=f"chunk 0 of the pack \\({sha256_hex(A)}\\)"):
        decode_pack(GOOD[: 8 + 2 * 37])


@settings(max_examples=100, deadline=None)
@given(chunk_bodies, st.data())
def test_every_cut_or_extension_of_a_body_is_refused(
    bodies: list[tuple[bytes, bool]], data: st.DataObject
) -> None:
    """No prefix of a valid body and nothing with bytes appended decodes; each is a 400
    (never another exception, never a silently shorter pack)."""
    chunks = [PackedChunk(sha256_hex(b + bytes([i])), b, z) for i, (b, z) in enumerate(bodies)]
    wire = encode_pack(chunks)
    cut = data.draw(st.integers(0, len(wire) - 1), label="cut")
    with pytest.raises(BadRequestError):
        decode_pack(wire[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=40), label="extra")
    with pytest.raises(BadRequestError, match=f"{len(extra)} bytes after its last chunk"):
        decode_pack(wire + extra)


# The stored pack object


def blob(tag: object, size: int = 200) -> bytearray:
    data = (hashlib.sha256(repr(tag).encode()).digest() * (size // 32 + 1))[:size]
    return encode_chunk(data, KEY, compress=False)


def sample(n: int = 3) -> tuple[bytes, list[tuple[str, int, int]], list[bytearray]]:
    blobs = [blob(i, 100 + 50 * i) for i in range(n)]
    obj, entries = build_pack(
        [(sha256_hex(bytes([i])), b) for i, b in enumerate(blobs)], name_of=name_of
    )
    return obj, entries, blobs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_build_pack_and_read_index_round_trip(payloads: list[bytes]) -> None:
    chunks = [(sha256_hex(p + bytes([i])), p) for i, p in enumerate(payloads)]
    obj, entries = build_pack(chunks, name_of=name_of)
    assert [c for c, _, _ in entries] == [c for c, _ in chunks]
    offset = 0
    for (_, off, length), (_, payload) in zip(entries, chunks, strict=True):
        assert (off, length) == (offset, len(payload))
        assert obj[off : off + length] == payload
        offset += length
    assert len(obj) == offset + len(chunks) * PACK_ENTRY.size + PACK_TRAILER
    assert read_index(bytes(obj)) == named(entries)


def test_pack_of_encrypted_chunks_reads_back_by_range() -> None:
    obj, entries, blobs = sample()
    assert obj[-8:-4] == b"SGWP" and obj[-4:] == b"\x02\x00\x00\x00"
    assert read_index(bytes(obj)) == named(entries)
    for (_, off, length), original in zip(entries, blobs, strict=True):
        piece = obj[off : off + length]
        assert piece == original
        check_chunk(piece)
        assert decode_chunk(piece, KEY) == decode_chunk(original, KEY)


def test_pack_keys_and_ids() -> None:
    ids = {new_pack_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert pack_key("scope-1", "ab" * 16) == f"packs/scope-1/{'ab' * 16}"


def reindex(obj: bytes, entries: list[tuple[bytes, int, int]], count: int | None = None) -> bytes:
    """The object with its index replaced by ``entries`` and a matching CRC and trailer."""
    old_count = struct.unpack_from(">I", obj, len(obj) - PACK_TRAILER)[0]
    body = obj[: len(obj) - PACK_TRAILER - old_count * PACK_ENTRY.size]
    index = b"".join(PACK_ENTRY.pack(*e) for e in entries)
    n = len(entries) if count is None else count
    return bytes(body + index + struct.pack(">II4sB3x", n, crc32c(index), b"SGWP", 2))


def test_damage_to_the_index_or_trailer_is_detected() -> None:
    obj, entries, _ = sample()
    first = bytes.fromhex(entries[0][0])
    cases = {
        "empty": (b"", "0 bytes is shorter than its trailer"),
        "shorter than trailer": (bytes(obj[-15:]), "15 bytes is shorter than its trailer"),
        "bad magic": (bytes(obj[:-8]) + b"SGWK" + bytes(obj[-4:]), "magic b'SGWK'"),
        "bad version": (bytes(obj[:-4]) + b"\x03\x00\x00\x00", "version 3"),
        "count too large": (reindex(obj, [], count=10**6), "1000000 entries does not fit"),
        "entry past the chunks": (
            reindex(obj, [(first, 0, len(obj))]),
            "pack index entry 0 points past the chunks",
        ),
        "second entry past the chunks": (
            reindex(obj, [(first, 0, 10), (first, (1 << 64) - 1, 1)]),
            "pack index entry 1 points past",
        ),
        "truncated": (bytes(obj[:-1]), None),
        "cut in the middle": (bytes(obj[: len(obj) // 2]), None),
        "chunk bytes dropped": (bytes(obj[10:]), None),
    }
    for name, (data, fragment) in cases.items():
        with pytest.raises(ChunkCorruptError) as caught:
            read_index(data)
        if fragment is not None:
            assert fragment in str(caught.value), name


def test_every_bit_flip_in_the_index_and_trailer_fields_is_detected() -> None:
    obj, entries, _ = sample()
    index_start = len(obj) - PACK_TRAILER - len(entries) * PACK_ENTRY.size
    checked_end = len(obj) - 3  # the last three bytes are reserved padding
    for byte in range(index_start, checked_end):
        for bit in range(8):
            damaged = bytearray(obj)
            damaged[byte] ^= 1 << bit
            with pytest.raises(ChunkCorruptError):
                read_index(bytes(damaged))


def test_damage_to_a_packed_chunk_is_left_to_its_own_checksum() -> None:
    obj, entries, _ = sample()
    _, off, length = entries[1]
    damaged = bytearray(obj)
    damaged[off + length // 2] ^= 0x10
    assert read_index(bytes(damaged)) == named(entries)  # the index is intact ...
    with pytest.raises(ChunkCorruptError):  # ... the chunk's own CRC32C catches it
        check_chunk(damaged[off : off + length])
    check_chunk(damaged[entries[0][1] : entries[0][1] + entries[0][2]])


def test_an_empty_pack_has_an_empty_index() -> None:
    obj, entries = build_pack([], name_of=name_of)
    assert entries == [] and len(obj) == PACK_TRAILER
    assert read_index(bytes(obj)) == []


# MemoryStore.get_range (the directory and S3 stores: tests/integration/test_chunk_packs.py)


def test_memory_store_get_range() -> None:
    store = MemoryStore()
    data = bytes(range(256)) * 4
    store.put("packs/s/p", data)
    assert store.get_range("packs/s/p", 0, 10) == data[:10]
    assert store.get_range("packs/s/p", 500, 24) == data[500:524]
    assert store.get_range("packs/s/p", 0, len(data)) == data
    assert store.get_range("packs/s/p", 1020, 10) == data[1020:]  # fewer where it ends
    assert store.get_range("packs/s/p", 1024, 10) == b""
    assert store.get_range("packs/s/p", 5000, 10) == b""
    assert store.get_range("packs/s/p", 7, 0) == b""
    store.put("packs/s/empty", b"")
    assert store.get_range("packs/s/empty", 0, 10) == b""
    with pytest.raises(ObjectNotFoundError, match="packs/s/missing"):
        store.get_range("packs/s/missing", 0, 1)
    for offset, length in ((-1, 1), (0, -1)):
        with pytest.raises(ObjectStoreError, match="must be >= 0"):
            store.get_range("packs/s/p", offset, length)


def test_a_pack_index_names_no_chunk_id() -> None:
    """The attack: whoever reads a pack object looks for the SHA-256 of content they know
    (raw or hex) in it; the index holds keyed names instead, which only the name key
    maps back (format 2)."""
    obj, entries, _ = sample()
    assert pack_format(bytes(obj)) == 2
    for chunk_id, _, _ in entries:
        assert bytes.fromhex(chunk_id) not in obj
        assert chunk_id.encode() not in obj
    assert [n for n, _, _ in read_index(bytes(obj))] == [name_of(c) for c, _, _ in entries]


def test_a_format_1_pack_still_reads() -> None:
    """Packs written before keyed names list chunk ids (format 1): still a valid index."""
    obj, entries, _ = sample()
    legacy = bytes(obj[: len(obj) - len(index_bytes(entries))]) + index_bytes(entries, 1)
    assert pack_format(legacy) == 1
    assert read_index(legacy) == entries
