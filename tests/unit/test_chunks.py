"""The chunk format: round trips, compression choice, encryption, and every kind of damage."""

from __future__ import annotations

import os
import random
import struct

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common.chunks import (
    CHUNK_SIZE,
    FLAG_AES_GCM,
    FLAG_ZSTD,
    HEADER_SIZE,
    MAX_CHUNK_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    check_chunk,
    chunk_id,
    decode_chunk,
    encode_chunk,
    inflate_frame,
    is_zero,
)
from sgw.common.errors import ChunkCorruptError, ChunkError, ChunkKeyError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEYS = pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])


def compressible(size: int = CHUNK_SIZE) -> bytes:
    """Text-like data that zstd shrinks about fivefold."""
    rng = random.Random(1)
    words = [rng.randbytes(4).hex() for _ in range(500)]
    return " ".join(rng.choice(words) for _ in range(size // 5 + 1)).encode()[:size]


def reseal(blob: bytes | bytearray) -> bytes:
    """Recomputes the CRC after a deliberate change, so later checks get their turn."""
    crc = crc32c(bytes(blob[HEADER_SIZE:]), crc32c(bytes(blob[:12])))
    return bytes(blob[:12]) + struct.pack("<I", crc) + bytes(blob[HEADER_SIZE:])


def flip(blob: bytes | bytearray, bit: int) -> bytes:
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


# Round trips


@KEYS
@pytest.mark.parametrize(
    "data",
    [b"", b"x", os.urandom(CHUNK_SIZE), compressible(), bytes(CHUNK_SIZE), b"\0" * 4097],
    ids=["empty", "1-byte", "1MiB-random", "1MiB-compressible", "1MiB-zeros", "odd-zeros"],
)
def test_round_trip(data: bytes, key: bytes | None) -> None:
    blob = encode_chunk(data, key)
    assert decode_chunk(blob, key, expected_id=chunk_id(data)) == data
    assert decode_chunk(blob, key) == data
    info = check_chunk(blob)
    assert info.encrypted == (key is not None)
    assert info.plaintext_length == len(data)
    assert info.stored_length == len(blob)


@KEYS
def test_compression_is_used_only_when_it_shrinks(key: bytes | None) -> None:
    overhead = HEADER_SIZE + (NONCE_SIZE + TAG_SIZE if key else 0)
    random_blob = encode_chunk(os.urandom(CHUNK_SIZE), key)
    assert not check_chunk(random_blob).compressed
    assert len(random_blob) == CHUNK_SIZE + overhead
    text_blob = encode_chunk(compressible(), key)
    assert check_chunk(text_blob).compressed
    assert len(text_blob) < CHUNK_SIZE // 3
    assert len(encode_chunk(bytes(CHUNK_SIZE), key)) < 200
    assert not check_chunk(encode_chunk(b"", key)).compressed


def test_encryption_uses_a_fresh_nonce_and_hides_the_data() -> None:
    data = compressible(64 * 1024)
    first, second = encode_chunk(data, KEY), encode_chunk(data, KEY)
    assert first != second
    assert (
        first[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        != second[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
    )
    assert data[:32] not in first
    assert encode_chunk(data, None) == encode_chunk(data, None)  # plain chunks are stable


def test_decode_accepts_buffers() -> None:
    data = compressible(10_000)
    blob = encode_chunk(bytearray(data), KEY)
    assert decode_chunk(memoryview(blob), bytearray(KEY)) == data
    assert chunk_id(memoryview(data)) == chunk_id(data)


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=5000),
        st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=16), st.integers(1, 500)),
    ),
    encrypted=st.booleans(),
)
def test_round_trip_property(data: bytes, encrypted: bool) -> None:
    key = KEY if encrypted else None
    blob = encode_chunk(data, key)
    assert decode_chunk(blob, key, chunk_id(data)) == data


# Ids and zeros


def test_chunk_id_is_hex_sha256() -> None:
    assert chunk_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert chunk_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_is_zero() -> None:
    assert is_zero(bytes(CHUNK_SIZE))
    assert is_zero(b"")
    assert is_zero(bytes(4096))
    assert is_zero(bytearray(CHUNK_SIZE))
    assert is_zero(memoryview(bytes(CHUNK_SIZE + 1))[1:])
    for position in (0, 1, 4095, CHUNK_SIZE - 1):
        data = bytearray(CHUNK_SIZE)
        data[position] = 1
        assert not is_zero(bytes(data)), position
        assert not is_zero(data), position
        assert not is_zero(memoryview(data)), position
    assert not is_zero(b"\0\0\x80")


# Damage: every flipped bit, truncation, foreign bytes


@KEYS
@pytest.mark.parametrize("data", [b"hello chunk", compressible(8192)], ids=["raw", "zstd"])
def test_every_flipped_bit_is_detected(data: bytes, key: bytes | None) -> None:
    """Header, nonce, payload (raw, compressed or ciphertext) and tag alike."""
    blob = encode_chunk(data, key)
    step = 1 if len(blob) < 200 else 7  # every bit of small blobs, a sample of larger ones
    for bit in range(0, len(blob) * 8, step):
        with pytest.raises(ChunkCorruptError):
            decode_chunk(flip(blob, bit), key)


@KEYS
def test_damage_in_each_region_is_named(key: bytes | None) -> None:
    blob = encode_chunk(compressible(8192), key)
    with pytest.raises(ChunkCorruptError, match="not a chunk"):
        decode_chunk(flip(blob, 0), key)
    regions = {"flags": 5, "length": 9, "crc": 13, "body": HEADER_SIZE + 30, "end": len(blob) - 2}
    if key:
        regions["nonce"] = HEADER_SIZE + 3
    for region, offset in regions.items():
        with pytest.raises(ChunkCorruptError, match=r"checksum mismatch.*damaged"):
            decode_chunk(flip(blob, offset * 8), key)
            pytest.fail(f"damage in {region} went unnoticed")


@KEYS
def test_truncation_is_detected(key: bytes | None) -> None:
    blob = encode_chunk(compressible(8192), key)
    for size in (0, 1, 4, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, len(blob) - 1):
        with pytest.raises(ChunkCorruptError):
            decode_chunk(blob[:size], key)
    with pytest.raises(ChunkCorruptError, match="truncated"):
        decode_chunk(blob[:10], key)
    with pytest.raises(ChunkCorruptError):
        decode_chunk(blob + b"\0", key)


def test_foreign_bytes_are_not_a_chunk() -> None:
    with pytest.raises(ChunkCorruptError, match="not a chunk"):
        decode_chunk(b"PK\x03\x04" + bytes(100), None)
    with pytest.raises(ChunkCorruptError, match="not a chunk"):
        decode_chunk(reseal(b"XXXX" + encode_chunk(b"data", None)[4:]), None)


def test_unknown_version_flags_and_huge_length_are_refused() -> None:
    blob = bytearray(encode_chunk(b"data", None))
    newer = bytearray(blob)
    newer[4] = 2
    with pytest.raises(ChunkCorruptError, match="version 2 is not supported"):
        decode_chunk(reseal(newer), None)
    flagged = bytearray(blob)
    flagged[5] |= 0x80
    with pytest.raises(ChunkCorruptError, match="unknown flags"):
        decode_chunk(reseal(flagged), None)
    reserved = bytearray(blob)
    reserved[6] = 1
    with pytest.raises(ChunkCorruptError, match="unknown flags"):
        decode_chunk(reseal(reserved), None)
    huge = bytearray(blob)
    huge[8:12] = struct.pack("<I", MAX_CHUNK_SIZE + 1)
    with pytest.raises(ChunkCorruptError, match="maximum"):
        decode_chunk(reseal(huge), None)


def test_length_mismatches_are_refused_even_with_a_good_checksum() -> None:
    raw = bytearray(encode_chunk(b"data", None))
    raw[8:12] = struct.pack("<I", 5)
    with pytest.raises(ChunkCorruptError, match="header says 5"):
        decode_chunk(reseal(raw), None)
    packed = bytearray(encode_chunk(bytes(8192) + b"x", None))
    packed[8:12] = struct.pack("<I", 100)
    with pytest.raises(ChunkCorruptError, match="header says 100"):
        decode_chunk(reseal(packed), None)


def test_damaged_zstd_frame_with_a_good_checksum() -> None:
    """Deliberate change to a plain compressed chunk: zstd or the id catches it."""
    data = compressible(8192)
    blob = encode_chunk(data, None)
    assert check_chunk(blob).compressed
    garbage = blob[:HEADER_SIZE] + b"\xff" * (len(blob) - HEADER_SIZE)
    with pytest.raises(ChunkCorruptError, match="zstd"):
        decode_chunk(reseal(garbage), None)
    damaged = flip(blob, (len(blob) - 40) * 8)
    with pytest.raises(ChunkCorruptError):
        decode_chunk(reseal(damaged), None, expected_id=chunk_id(data))


# Keys


def test_wrong_key_is_a_key_error() -> None:
    blob = encode_chunk(compressible(8192), KEY)
    with pytest.raises(ChunkKeyError, match="key is wrong"):
        decode_chunk(blob, OTHER_KEY)


def test_missing_key_for_an_encrypted_chunk() -> None:
    blob = encode_chunk(b"secret", KEY)
    with pytest.raises(ChunkKeyError, match="no key was given"):
        decode_chunk(blob, None)


def test_key_of_the_wrong_size() -> None:
    blob = encode_chunk(b"secret", KEY)
    with pytest.raises(ChunkKeyError, match="32 bytes"):
        decode_chunk(blob, KEY[:16])
    with pytest.raises(ValueError, match="32 bytes"):
        encode_chunk(b"secret", KEY[:16])


def test_key_for_a_plain_chunk_is_refused() -> None:
    """An encrypted volume must not accept unauthenticated data from the store."""
    blob = encode_chunk(b"plain", None)
    with pytest.raises(ChunkKeyError, match="not encrypted"):
        decode_chunk(blob, KEY)


def test_header_is_authenticated() -> None:
    """Changing flags or length and fixing up the CRC still fails: the header is GCM AAD."""
    blob = encode_chunk(compressible(8192), KEY)
    longer = bytearray(blob)
    longer[8:12] = struct.pack("<I", 8193)
    with pytest.raises(ChunkKeyError, match="authentication failed"):
        decode_chunk(reseal(longer), KEY)
    downgraded = bytearray(blob)
    downgraded[5] &= ~FLAG_AES_GCM
    with pytest.raises(ChunkError):
        decode_chunk(reseal(downgraded), KEY)
    unpacked = bytearray(blob)
    unpacked[5] &= ~FLAG_ZSTD
    with pytest.raises(ChunkError):
        decode_chunk(reseal(unpacked), KEY)


def test_expected_id_mismatch() -> None:
    blob = encode_chunk(b"one", KEY)
    with pytest.raises(ChunkCorruptError, match="does not match its id"):
        decode_chunk(blob, KEY, expected_id=chunk_id(b"two"))


def test_too_large_to_encode() -> None:
    with pytest.raises(ValueError, match="maximum"):
        encode_chunk(bytes(MAX_CHUNK_SIZE + 1), None)


# Storing the upload's own zstd frame


def zstd1(data: bytes) -> bytes:
    """One zstd frame that declares its content size, as the gateway sends."""
    return zstandard.ZstdCompressor(level=1).compress(data)


def with_declared_size(frame: bytes, size: int) -> bytes:
    """``frame`` with another content size in its header (a frame whose header lies)."""
    descriptor = frame[4]
    field = {0: 1 if descriptor & 0x20 else 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    end = zstandard.frame_header_size(frame)
    value = size - 256 if field == 2 else size
    return frame[: end - field] + value.to_bytes(field, "little") + frame[end:]


@KEYS
def test_a_frame_is_stored_as_it_is(key: bytes | None) -> None:
    data = compressible()
    frame = zstd1(data)
    blob = encode_chunk(data, key, frame=frame)
    assert check_chunk(blob).compressed
    assert decode_chunk(blob, key, expected_id=chunk_id(data)) == data
    extra = NONCE_SIZE + TAG_SIZE if key else 0
    assert len(blob) == HEADER_SIZE + extra + len(frame)
    if key is None:
        assert bytes(blob[HEADER_SIZE:]) == frame


def test_a_frame_that_does_not_shrink_the_data_means_raw_storage() -> None:
    data = os.urandom(8192)
    frame = zstd1(data)
    assert len(frame) >= len(data)
    blob = encode_chunk(data, KEY, frame=frame)
    assert not check_chunk(blob).compressed
    assert decode_chunk(blob, KEY) == data


def test_a_frame_of_another_length_is_refused() -> None:
    data = compressible(8192)
    with pytest.raises(ValueError, match="declares 8191 bytes"):
        encode_chunk(data, KEY, frame=zstd1(data[:-1]))
    with pytest.raises(ValueError, match="declares -1 bytes"):
        encode_chunk(data, KEY, frame=b"not zstd at all")


def test_inflate_frame_takes_exactly_one_frame_of_declared_size() -> None:
    data = compressible(32 * 1024)
    frame = zstd1(data)
    assert inflate_frame(frame, len(data)) == data
    assert inflate_frame(zstd1(b""), 0) == b""
    streamed = zstandard.ZstdCompressor(level=1).compressobj()
    undeclared = streamed.compress(data) + streamed.flush()
    assert zstandard.frame_content_size(undeclared) == -1
    refused = {
        "two frames": frame + zstd1(b"more"),
        "trailing bytes": frame + b"x",
        "truncated": frame[:-3],
        "declares less": with_declared_size(frame, len(data) - 1000),
        "declares more": with_declared_size(frame, len(data) + 1000),
        "no declared size": undeclared,
        "not zstd": data,
        "empty": b"",
    }
    for name, body in refused.items():
        assert inflate_frame(body, len(data) + 4096) is None, name
    assert zstandard.frame_content_size(refused["declares less"]) == len(data) - 1000
    assert inflate_frame(frame, len(data) - 1) is None  # more than the limit
