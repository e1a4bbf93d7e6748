"""Chunk packs on the provider (docs/adr/0005-chunk-packs.md).

``POST /v1/volumes/{id}/chunk-packs`` through a real ``sgw provider serve`` on each
object store (a directory, S3 on the moto server; SQLite), and once on each database;
``get_range`` of each store; garbage collection of packed chunks and packs on each
database and store, in process as tests/integration/test_gc.py does, including the
races between a pass and an upload; and the master key guard of a store holding packs
only.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.chunk_packs import MAX_PACK_CHUNKS, MEDIA_TYPE, PackedChunk, encode_pack
from sgw.common.chunks import HEADER_SIZE, NONCE_SIZE, TAG_SIZE, check_chunk, decode_chunk
from sgw.common.errors import (
    MissingChunksError,
    NotFoundError,
    ObjectNotFoundError,
    ObjectStoreError,
)
from sgw.provider.api.blocks import MAX_PACK_BODY
from sgw.provider.blockstore import service
from sgw.provider.blockstore.keys import derive_key
from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.blockstore.objects import DirectoryStore, ObjectStore
from sgw.provider.blockstore.packs import Location, PackIndex, new_pack_id, pack_key, read_index
from sgw.provider.blockstore.service import MAX_PACK_DATA, BlockService, PackStored
from sgw.provider.db.models import ChunkLocation, ChunkPack, Volume, utcnow
from sgw.provider.db.schema import bound_engine, make_engine, session_factory
from tests.fixtures.block_api import SMALL, Api, start_provider_on
from tests.fixtures.block_service import ACCOUNT, Env, put_pack, race_with_collector
from tests.fixtures.chunk_data import content, sha256_hex
from tests.fixtures.daemons import ProviderProcess
from tests.fixtures.s3 import s3_store

MIB = 1 << 20
# What encode_chunk adds around an encrypted payload.
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
PACK_KEY = re.compile(r"packs/(?P<scope>[^/]+)/(?P<pack>[0-9a-f]{32})")


def plain(data: bytes) -> PackedChunk:
    return PackedChunk(sha256_hex(data), data, False)


def one_frame(data: bytes) -> PackedChunk:
    """The chunk as one zstd frame declaring its size (stored as sent)."""
    return PackedChunk(sha256_hex(data), zstandard.ZstdCompressor(level=3).compress(data), True)


def two_frames(data: bytes) -> PackedChunk:
    """The chunk as two concatenated zstd frames (inflated, then compressed again)."""
    zc = zstandard.ZstdCompressor(level=1)
    half = len(data) // 2
    return PackedChunk(sha256_hex(data), zc.compress(data[:half]) + zc.compress(data[half:]), True)


def incompressible(tag: object, size: int = SMALL) -> bytes:
    return random.Random(repr(tag)).randbytes(size)


# Over HTTP, against a provider process


class PackApi(Api):
    """``Api`` with chunk pack calls and a view of the provider's pack rows."""

    sessions: sessionmaker[Session]

    def post_pack(
        self, volume_id: str, chunks: list[PackedChunk] | bytes, **headers: str
    ) -> httpx.Response:
        body = chunks if isinstance(chunks, bytes) else encode_pack(chunks)
        return self.client.post(
            f"/v1/volumes/{volume_id}/chunk-packs",
            content=body,
            headers={"content-type": MEDIA_TYPE, **headers},
        )

    def scope(self, volume_id: str) -> str:
        """The volume's key scope (made by the provider, not its id)."""
        with self.sessions() as s:
            scope = s.scalar(select(Volume.key_scope).where(Volume.id == volume_id))
            assert scope is not None, f"no volume {volume_id}"
            return scope

    def packs(self, volume_id: str) -> dict[str, tuple[int, bool]]:
        """The pack rows of the volume's scope: id -> (size, written)."""
        scope = self.scope(volume_id)
        with self.sessions() as s:
            rows = s.execute(
                select(ChunkPack.id, ChunkPack.size, ChunkPack.written).where(
                    ChunkPack.key_scope == scope
                )
            )
            return {i: (n, w) for i, n, w in rows}

    def locations(self, volume_id: str) -> dict[str, tuple[str, int, int]]:
        """The chunk locations of the volume's scope: chunk id -> (pack id, offset, length)."""
        scope = self.scope(volume_id)
        with self.sessions() as s:
            rows = s.execute(
                select(
                    ChunkLocation.chunk_id,
                    ChunkLocation.pack_id,
                    ChunkLocation.offset,
                    ChunkLocation.length,
                ).where(ChunkLocation.key_scope == scope)
            )
            return {c: (p, o, n) for c, p, o, n in rows}

    def pack_keys(self, volume_id: str) -> set[str]:
        """The pack objects of the volume's scope."""
        scope = self.scope(volume_id)
        return {k for k in self.keys() if k.startswith(f"packs/{scope}/")}

    def read(self, volume_id: str, chunk_id: str) -> httpx.Response:
        return self.client.get(f"/v1/volumes/{volume_id}/chunks/{chunk_id}")


def _pack_api(process: ProviderProcess, client: httpx.Client, store: str, **extra: Any) -> PackApi:
    api = PackApi(process, client, store, **extra)
    url = process.db_url or f"sqlite:///{process.data_dir / 'provider.db'}"
    api.sessions = session_factory(make_engine(url))
    return api


def _dispose(api: PackApi) -> None:
    engine = bound_engine(api.sessions)
    if engine is not None:
        engine.dispose()


@pytest.fixture(scope="module", params=["dir", "s3"])
def api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PackApi]:
    """One provider per object store (SQLite) for the module; tests make their own volumes."""
    store = request.param
    process, extra = start_provider_on(
        tmp_path_factory.mktemp(f"packs-{store}") / "provider", store, request
    )
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            packs = _pack_api(process, client, store, **extra)
            yield packs
            _dispose(packs)
        assert process.stop() == 0
    finally:
        process.kill()


def test_a_pack_is_one_object_and_each_chunk_reads_back(api: PackApi) -> None:
    vid = api.volume()["id"]  # 64 chunks of 4 KiB
    compressible, framed, multi = content("p-plain"), content("p-frame"), content("p-frames")
    short, noise = content("p-short", 100), incompressible("p-noise")
    sent = [plain(compressible), one_frame(framed), two_frames(multi), plain(short), plain(noise)]
    datas = [compressible, framed, multi, short, noise]
    ids = [sha256_hex(d) for d in datas]
    before = api.keys()

    r = api.post_pack(vid, sent)
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": ids, "present": []}
    after = api.keys()
    (key,) = after - before
    match = PACK_KEY.fullmatch(key)
    assert match is not None, key
    scope = match["scope"]
    # The provider named the volume's scope: its account and random, not the volume's id.
    assert scope != vid and re.fullmatch(r"[0-9a-z-]+\.[0-9a-f]{32}", scope), scope
    assert not any(k.startswith("chunks/") for k in after - before)  # nothing loose

    # The object: the chunks in request order, each encrypted under the scope's key; a
    # plaintext chunk stored raw even where zstd would shrink it, a one-frame zstd chunk
    # stored as that frame, a multi-frame one inflated and compressed again (one frame).
    obj = api.raw(key)
    index = read_index(obj)
    assert [n for n, _, _ in index] == [api.name(scope, c) for c in ids]  # keyed names
    recompressed = zstandard.ZstdCompressor(level=3).compress(multi)
    assert [n for _, _, n in index] == [
        OVERHEAD + len(compressible),
        OVERHEAD + len(sent[1].body),
        OVERHEAD + len(recompressed),
        OVERHEAD + len(short),
        OVERHEAD + len(noise),
    ]
    scope_key = derive_key((api.data_dir / "master.key").read_bytes(), scope)
    for (_, offset, length), cid, data in zip(index, ids, datas, strict=True):
        info = check_chunk(obj[offset : offset + length])
        assert info.encrypted and info.plaintext_length == len(data)
        assert info.compressed == (cid in (sha256_hex(framed), sha256_hex(multi)))
        assert decode_chunk(obj[offset : offset + length], scope_key, expected_id=cid) == data
    assert compressible[:32] not in obj and noise[:32] not in obj
    # The rows: one written pack of the object's size, a location per chunk as indexed.
    pack_id = match["pack"]
    assert api.packs(vid) == {pack_id: (len(obj), True)}
    assert api.locations(vid) == {
        c: (pack_id, o, n) for c, (_, o, n) in zip(ids, index, strict=True)
    }

    for cid, data in zip(ids, datas, strict=True):
        got = api.read(vid, cid)
        assert got.status_code == 200 and got.content == data, cid
        assert got.headers["x-sgw-sha256"] == cid

    # A commit naming packed chunks goes through, and the map and snapshots read them.
    changes = {0: ids[0], 1: ids[1], 2: ids[2], 63: ids[3], 7: ids[4], 8: ids[0]}
    done = api.commit(vid, 0, changes)
    assert done.status_code == 200 and done.json() == {"version": 1}, done.text
    assert api.map(vid) == (1, changes)
    snap = api.client.post(f"/v1/volumes/{vid}/snapshots").json()
    for index_, cid in changes.items():
        block = api.client.get(f"/v1/snapshots/{snap['id']}/blocks/{index_}")
        assert block.status_code == 200 and block.content == datas[ids.index(cid)]
    # A volume made from the snapshot reads them, and packs what it uploads in the
    # lineage's scope.
    copy = api.volume(from_snapshot_id=snap["id"])["id"]
    assert api.read(copy, ids[2]).content == multi
    more = content("p-copy")
    assert api.post_pack(copy, [plain(more)]).json() == {
        "stored": [sha256_hex(more)],
        "present": [],
    }
    assert api.scope(copy) == api.scope(vid)
    assert len(api.pack_keys(vid)) == 2 and sha256_hex(more) in api.locations(vid)
    assert api.read(copy, sha256_hex(more)).content == more


def test_sending_a_pack_again_answers_present_and_writes_nothing(api: PackApi) -> None:
    vid = api.volume()["id"]
    a, b, c = content("again-a"), content("again-b"), content("again-c")
    first = api.post_pack(vid, [plain(a), one_frame(b)])
    assert first.json() == {"stored": [sha256_hex(a), sha256_hex(b)], "present": []}, first.text
    keys, packs, locations = api.keys(), api.packs(vid), api.locations(vid)

    again = api.post_pack(vid, [plain(a), one_frame(b)])
    assert again.status_code == 200 and again.json() == {
        "stored": [],
        "present": [sha256_hex(a), sha256_hex(b)],
    }
    assert (api.keys(), api.packs(vid), api.locations(vid)) == (keys, packs, locations)
    # Whatever the encoding it is sent in this time.
    assert api.post_pack(vid, [one_frame(a)]).json() == {"stored": [], "present": [sha256_hex(a)]}
    assert api.keys() == keys

    # Only the new chunk of a partly known pack is stored, in a pack of its own.
    mixed = api.post_pack(vid, [plain(b), plain(c), plain(a)])
    assert mixed.json() == {"stored": [sha256_hex(c)], "present": [sha256_hex(b), sha256_hex(a)]}, (
        mixed.text
    )
    (new,) = api.keys() - keys
    assert [n for n, _, _ in read_index(api.raw(new))] == [
        api.name(new.split("/")[1], sha256_hex(c))
    ]
    located = api.locations(vid)
    assert (
        located[sha256_hex(a)] == locations[sha256_hex(a)]
        and located[sha256_hex(b)] == locations[sha256_hex(b)]
    )
    assert located[sha256_hex(c)][0] == PACK_KEY.fullmatch(new)["pack"]  # type: ignore[index]
    assert [api.read(vid, sha256_hex(d)).content for d in (a, b, c)] == [a, b, c]

    # Another volume is another key scope: it stores its own copy.
    other = api.volume()["id"]
    assert api.post_pack(other, [plain(a)]).json() == {"stored": [sha256_hex(a)], "present": []}
    assert len(api.pack_keys(other)) == 1 and set(api.locations(other)) == {sha256_hex(a)}


def test_refused_packs_store_nothing(api: PackApi) -> None:
    vid = api.volume()["id"]
    big = api.volume(size=128 * MIB, chunk_size=64 * MIB)["id"]
    good, other = content("r-good"), content("r-other")
    forged = sha256_hex(b"not this data")
    huge = [content(("r-huge", i), 40 * MIB) for i in range(2)]
    zc = zstandard.ZstdCompressor(level=1)
    before = api.keys()
    cases: list[tuple[str, httpx.Response, int, str, str]] = [
        (
            "wrong SHA-256",
            api.post_pack(vid, [plain(good), PackedChunk(forged, other, False)]),
            400,
            "checksum_mismatch",
            f"chunk 1 of the pack ({forged}): the data's SHA-256 is {sha256_hex(other)}",
        ),
        (
            "zstd chunk of other data",
            api.post_pack(vid, [plain(good), PackedChunk(forged, zc.compress(other), True)]),
            400,
            "checksum_mismatch",
            f"chunk 1 of the pack ({forged})",
        ),
        (
            "larger than the chunk size",
            api.post_pack(vid, [plain(good), plain(content("r-big", SMALL + 1))]),
            413,
            "payload_too_large",
            f"chunk 1 of the pack ({sha256_hex(content('r-big', SMALL + 1))}) "
            f"is larger than {SMALL}",
        ),
        (
            "zstd inflating past the chunk size",
            api.post_pack(vid, [plain(good), one_frame(content("r-bomb", 64 * SMALL))]),
            413,
            "payload_too_large",
            "chunk 1 of the pack",
        ),
        (
            "zstd flag on a body that is not zstd",
            api.post_pack(vid, [plain(good), PackedChunk(sha256_hex(other), other, True)]),
            400,
            "bad_request",
            "not valid zstd",
        ),
        (
            "all-zero chunk",
            api.post_pack(vid, [plain(good), plain(bytes(SMALL))]),
            400,
            "bad_request",
            f"chunk 1 of the pack ({sha256_hex(bytes(SMALL))}) is all zero",
        ),
        (
            "empty chunk",
            api.post_pack(vid, [plain(good), plain(b"")]),
            400,
            "bad_request",
            "is all zero",
        ),
        (
            "the same chunk twice",
            api.post_pack(vid, [plain(good), plain(other), one_frame(good)]),
            400,
            "bad_request",
            f"chunk 2 of the pack ({sha256_hex(good)}) is in the pack twice",
        ),
        (
            "not a pack",
            api.post_pack(vid, b'{"chunks": []}'),
            400,
            "bad_request",
            "chunk pack magic",
        ),
        (
            "bytes after the last chunk",
            api.post_pack(vid, encode_pack([plain(good)]) + b"\x01"),
            400,
            "bad_request",
            "1 bytes after its last chunk",
        ),
        (
            "a body shorter than it declares",
            api.post_pack(vid, encode_pack([plain(good), plain(other)])[:-1]),
            400,
            "bad_request",
            f"chunk 1 of the pack ({sha256_hex(other)}) declares",
        ),
        (
            "too many chunks",
            api.post_pack(
                vid,
                b"SGWK\x01\x00"
                + (MAX_PACK_CHUNKS + 1).to_bytes(2, "big")
                + bytes(37 * (MAX_PACK_CHUNKS + 1)),
            ),
            400,
            "bad_request",
            f"declares {MAX_PACK_CHUNKS + 1} chunks",
        ),
        (
            "zstd on the whole body",
            api.post_pack(
                vid,
                zc.compress(encode_pack([plain(good)])),
                **{"content-encoding": "zstd"},
            ),
            415,
            "unsupported_encoding",
            "the body itself takes no Content-Encoding",
        ),
        (
            "gzip on the whole body",
            api.post_pack(vid, [plain(good)], **{"content-encoding": "gzip"}),
            415,
            "unsupported_encoding",
            "'gzip'",
        ),
        (
            "unknown volume",
            api.post_pack(str(uuid.uuid4()), [plain(good)]),
            404,
            "not_found",
            "not found",
        ),
        (
            "more than MAX_PACK_DATA of data in all",
            api.post_pack(big, [plain(good), *map(one_frame, huge)]),
            413,
            "payload_too_large",
            f"more than {MAX_PACK_DATA} bytes of data; send fewer chunks",
        ),
    ]
    for name, response, status, error, fragment in cases:
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["error"] == error, (name, body)
        assert fragment in body["message"], (name, body)
    # A body declared larger than a pack can be is refused before it is read.
    with socket.create_connection(("127.0.0.1", api.process.port), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/volumes/{vid}/chunk-packs HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {MAX_PACK_BODY + 1}\r\n\r\n".encode()
            + b"SGWK"
        )
        assert conn.recv(65536).startswith(b"HTTP/1.1 413")

    assert api.keys() == before
    for volume in (vid, big):
        assert api.packs(volume) == {} and api.locations(volume) == {}
    for data in (good, other):
        missing = api.read(vid, sha256_hex(data))
        assert missing.status_code == 404, missing.text
    refused = api.commit(vid, 0, {0: sha256_hex(good), 1: sha256_hex(other)})
    assert refused.status_code == 400 and refused.json()["error"] == "missing_chunks"
    assert set(refused.json()["chunk_ids"]) == {sha256_hex(good), sha256_hex(other)}
    assert api.map(vid) == (0, {})
    # The good chunks on their own are fine.
    ok = api.post_pack(vid, [plain(good), plain(other)])
    assert ok.json() == {"stored": [sha256_hex(good), sha256_hex(other)], "present": []}, ok.text
    assert api.commit(vid, 0, {0: sha256_hex(good), 1: sha256_hex(other)}).status_code == 200


def test_a_pack_of_exactly_the_data_limit_is_stored(api: PackApi) -> None:
    big = api.volume(size=128 * MIB, chunk_size=64 * MIB)["id"]
    halves = [content(("limit", i), MAX_PACK_DATA // 2) for i in range(2)]
    r = api.post_pack(big, [one_frame(h) for h in halves])
    assert r.status_code == 200 and r.json()["stored"] == [sha256_hex(h) for h in halves], r.text
    for h in halves:
        got = api.read(big, sha256_hex(h))
        assert got.status_code == 200 and len(got.content) == len(h) and got.content == h


def frames_of(data: bytes, n: int) -> bytes:
    """``data`` as ``n`` concatenated zstd frames."""
    zc = zstandard.ZstdCompressor(level=1)
    step = -(-len(data) // n)
    return b"".join(zc.compress(data[i : i + step]) for i in range(0, len(data), step))


def test_a_pack_of_multi_frame_chunks_is_stored_compressed(api: PackApi) -> None:
    # The amplification attack: 64 chunks of 1 MiB, each a few dozen bytes of zstd in
    # several frames, so a few KB on the wire. Once inflated they were stored raw (64 MiB
    # in the store); now each is compressed again, and the work is bounded by the pack's
    # data limit (MAX_PACK_DATA: exactly reached here, so the pack is accepted).
    vid = api.volume(size=64 * MIB, chunk_size=MIB)["id"]
    datas = [bytes([i + 1]) * MIB for i in range(MAX_PACK_CHUNKS)]
    assert sum(map(len, datas)) == MAX_PACK_DATA
    sent = [PackedChunk(sha256_hex(d), frames_of(d, 4), True) for d in datas]
    body = encode_pack(sent)
    assert len(body) < 16 * 1024  # what the attacker sends
    before = api.keys()

    r = api.post_pack(vid, body)
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": [c.id for c in sent], "present": []}
    (key,) = api.keys() - before
    obj = api.raw(key)
    assert len(obj) < 64 * 1024, len(obj)  # stored compressed: not 64 MiB
    index = read_index(obj)
    scope = key.split("/")[1]
    assert [n for n, _, _ in index] == [api.name(scope, c.id) for c in sent]
    for cid, offset, length in index:
        info = check_chunk(obj[offset : offset + length])
        assert info.compressed and info.plaintext_length == MIB, cid
    for i in (0, MAX_PACK_CHUNKS - 1):  # the read path returns the same bytes
        got = api.read(vid, sha256_hex(datas[i]))
        assert got.status_code == 200 and got.content == datas[i]


def test_frames_inflating_past_the_chunk_size_or_the_pack_limit_are_refused(
    api: PackApi,
) -> None:
    vid = api.volume(size=64 * MIB, chunk_size=MIB)["id"]
    big = api.volume(size=128 * MIB, chunk_size=2 * MIB)["id"]
    ok = content("amp-ok")
    # Frames that each declare little but together inflate past the chunk size.
    bomb = bytes(MIB) + b"\x01"
    bombs = [PackedChunk(sha256_hex(bomb), frames_of(bomb, 8), True)]
    # 33 chunks of 2 MiB: 66 MiB, past the pack's data limit; the last is refused before
    # it is inflated (nothing of the pack's budget is left for it).
    over = [bytes([i + 1]) * (2 * MIB) for i in range(33)]
    before = api.keys()

    r = api.post_pack(vid, [plain(ok), *bombs])
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert f"chunk 1 of the pack ({bombs[0].id}) is larger than {MIB} bytes" in r.json()["message"]
    r = api.post_pack(big, [PackedChunk(sha256_hex(d), frames_of(d, 2), True) for d in over])
    assert r.status_code == 413, r.text
    assert f"more than {MAX_PACK_DATA} bytes of data; send fewer chunks" in r.json()["message"]
    # The same through a single chunk PUT: refused, nothing stored.
    r = api.client.put(
        f"/v1/volumes/{vid}/chunks/{bombs[0].id}",
        content=bytes(bombs[0].body),
        headers={"content-encoding": "zstd", "x-sgw-sha256": bombs[0].id},
    )
    assert r.status_code == 413 and f"larger than {MIB} bytes" in r.json()["message"], r.text
    assert api.keys() == before
    assert api.packs(vid) == {} and api.packs(big) == {}


def test_a_frame_asking_for_a_huge_window_is_refused(api: PackApi) -> None:
    # A frame that declares no content size and a 128 MiB window: the decoder would
    # reserve the window; the provider caps it (docs/block-api.md, "Limits").
    vid = api.volume(size=64 * MIB, chunk_size=MIB)["id"]
    data = content("amp-window")
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=27, write_content_size=False
    )
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    body = stream.compress(data) + stream.flush()
    before = api.keys()
    r = api.post_pack(vid, [PackedChunk(sha256_hex(data), body, True)])
    assert r.status_code == 400 and "not valid zstd" in r.json()["message"], r.text
    assert "too much memory" in r.json()["message"]
    assert api.keys() == before
    # The same data in a frame with an ordinary window is stored (compressed).
    params = zstandard.ZstdCompressionParameters.from_level(3, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    r = api.post_pack(
        vid, [PackedChunk(sha256_hex(data), stream.compress(data) + stream.flush(), True)]
    )
    assert r.status_code == 200 and r.json()["stored"] == [sha256_hex(data)], r.text


@pytest.mark.parametrize("store", ["dir", "s3"])
def test_packs_on_each_database(
    store: str, empty_db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    process, extra = start_provider_on(tmp_path / "packs", store, request, db_url=empty_db_url)
    try:
        with httpx.Client(base_url=process.url, timeout=30) as client:
            api = _pack_api(process, client, store, **extra)
            vid = api.volume(size=16 * SMALL)["id"]
            a, b = content("db-a"), incompressible("db-b")
            r = api.post_pack(vid, [one_frame(a), plain(b)])
            assert r.json() == {"stored": [sha256_hex(a), sha256_hex(b)], "present": []}, r.text
            assert api.post_pack(vid, [plain(a)]).json() == {
                "stored": [],
                "present": [sha256_hex(a)],
            }
            (pack_id,) = api.packs(vid)
            assert {p for p, _, _ in api.locations(vid).values()} == {pack_id}
            assert api.commit(vid, 0, {0: sha256_hex(a), 15: sha256_hex(b)}).json() == {
                "version": 1
            }
            assert api.map(vid) == (1, {0: sha256_hex(a), 15: sha256_hex(b)})
            assert (
                api.read(vid, sha256_hex(a)).content == a
                and api.read(vid, sha256_hex(b)).content == b
            )
            ghost = api.commit(vid, 1, {3: sha256_hex(content("db-never"))})
            assert ghost.status_code == 400 and ghost.json()["error"] == "missing_chunks"
            _dispose(api)
        assert process.stop() == 0
    finally:
        process.kill()


def test_a_lost_master_key_is_not_remade_when_the_store_holds_only_packs(
    provider: ProviderProcess, provider_factory: type[ProviderProcess]
) -> None:
    key_file = provider.data_dir / "master.key"
    master = key_file.read_bytes()
    data = content("keep-packed")
    with httpx.Client(base_url=provider.url, timeout=30) as client:
        vid = client.post("/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"}).json()[
            "id"
        ]
        r = client.post(
            f"/v1/volumes/{vid}/chunk-packs",
            content=encode_pack([plain(data)]),
            headers={"content-type": MEDIA_TYPE},
        )
        assert r.status_code == 200, r.text
    assert provider.stop() == 0
    objects = provider.data_dir / "objects"
    stored = [p.relative_to(objects) for p in objects.rglob("*") if p.is_file()]
    assert [p.parts[0] for p in stored] == ["packs"]  # one pack, no loose chunk

    key_file.unlink()
    again = provider_factory(provider.data_dir)
    with pytest.raises(RuntimeError, match="exited 2") as refused:
        again.start()
    assert "restore" in str(refused.value)
    assert not key_file.exists()  # no new key that could not read the packed chunk
    key_file.write_bytes(master)
    key_file.chmod(0o600)
    restored = provider_factory(provider.data_dir).start()
    got = httpx.get(f"{restored.url}/v1/volumes/{vid}/chunks/{sha256_hex(data)}")
    assert got.status_code == 200 and got.content == data
    assert restored.stop() == 0


# Ranged reads of each store (MemoryStore: tests/unit/test_chunk_packs.py)


@pytest.fixture(params=["directory", "s3", "s3-prefixed"])
def ranged(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "directory":
        return DirectoryStore(tmp_path / "objects")
    return s3_store(
        request.getfixturevalue("s3_endpoint"),
        request.getfixturevalue("s3_bucket"),
        prefix="tenant/1" if request.param == "s3-prefixed" else "",
    )


def test_get_range(ranged: ObjectStore) -> None:
    data = random.Random(3).randbytes(10_000)
    key = f"packs/scope/{new_pack_id()}"
    ranged.put(key, data, durable=True)
    for offset, length in ((0, 1), (0, 10_000), (1234, 4321), (9_990, 10), (0, 0), (5, 0)):
        assert ranged.get_range(key, offset, length) == data[offset : offset + length]
    # Fewer bytes where the object ends sooner, none past its end.
    assert ranged.get_range(key, 9_990, 100) == data[9_990:]
    assert ranged.get_range(key, 0, 1 << 30) == data
    assert ranged.get_range(key, 10_000, 1) == b""
    assert ranged.get_range(key, 50_000, 10) == b""
    ranged.put("packs/scope/empty", b"")
    assert ranged.get_range("packs/scope/empty", 0, 16) == b""
    # Many ranges at once, as parallel reads of packed chunks do.
    spans = [(i * 97 % 9_000, 1 + i * 31 % 1_000) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda span: ranged.get_range(key, *span), spans))
    assert got == [data[o : o + n] for o, n in spans]
    for missing in ("packs/scope/nope", "packs/other/x"):
        with pytest.raises(ObjectNotFoundError, match=re.escape(missing)):
            ranged.get_range(missing, 0, 10)
    with pytest.raises(ObjectStoreError, match="must be >= 0"):
        ranged.get_range(key, -1, 10)
    ranged.delete(key)
    with pytest.raises(ObjectNotFoundError):
        ranged.get_range(key, 0, 10)


# Garbage collection of packs, in process on each database and store


def pack_of(env: Env, scope: str, data: bytes) -> str:
    location = env.maps.packs.locate(scope, sha256_hex(data))
    assert location is not None, f"{sha256_hex(data)} has no location"
    return location.pack_id


def pack_rows(env: Env, scope: str) -> dict[str, bool]:
    """The scope's pack rows: id -> written."""
    with env.sessions() as s:
        rows = s.execute(
            select(ChunkPack.id, ChunkPack.written).where(ChunkPack.key_scope == scope)
        )
        return {i: bool(w) for i, w in rows}


def pack_objects(env: Env, scope: str) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in env.store.list(f"packs/{scope}/")}


def reader(env: Env) -> BlockService:
    """Another provider process on the same database and store (its own caches)."""
    return BlockService(ChunkMaps(env.sessions), env.store, env.blocks.keys)


def test_unreferenced_packed_chunks_lose_their_locations_and_empty_packs_go(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    a, b, c, d, e = (content(("gc", t)) for t in "abcde")
    assert put_pack(env, vol, [a, b, e]).stored == [sha256_hex(a), sha256_hex(b), sha256_hex(e)]
    assert put_pack(env, vol, [c, d]).stored == [sha256_hex(c), sha256_hex(d)]
    kept, doomed = pack_of(env, scope, a), pack_of(env, scope, c)
    assert kept != doomed and pack_of(env, scope, b) == kept and pack_of(env, scope, d) == doomed
    doomed_size = env.store.stat(pack_key(scope, doomed)).size  # type: ignore[union-attr]
    env.commit(vol, {0: sha256_hex(a), 3: sha256_hex(e)})  # two of three live: not rewritten

    report = env.collect()
    assert (report.locations_deleted, report.packs_deleted, report.pack_bytes_deleted) == (
        3,
        1,
        doomed_size,
    )
    assert (report.orphan_packs, report.errors, report.deleted) == (0, 0, 0)
    assert "deleted 3 unreferenced packed chunks' locations and 1 of " in report.summary()
    # The pack with a live chunk stays whole (its dead chunk too); the other is gone.
    assert pack_objects(env, scope) == {kept} and pack_rows(env, scope) == {kept: True}
    assert env.maps.packs.known_packs([kept, doomed]) == {kept}
    assert pack_of(env, scope, a) == kept
    assert [env.maps.packs.locate(scope, sha256_hex(x)) for x in (b, c, d)] == [None] * 3
    assert env.has(scope, sha256_hex(a)) and not any(
        env.has(scope, sha256_hex(x)) for x in (b, c, d)
    )
    other = reader(env)
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(a)) == a
    for x in (b, c):
        with pytest.raises(NotFoundError):
            other.get_chunk(ACCOUNT, vol, sha256_hex(x))
    other.close()
    # A commit naming a collected chunk is refused until it is uploaded again.
    with pytest.raises(MissingChunksError) as refused:
        env.commit(vol, {1: sha256_hex(b), 2: sha256_hex(c)})
    assert sorted(refused.value.chunk_ids) == sorted([sha256_hex(b), sha256_hex(c)])
    assert env.maps.read_map(vol) == {0: sha256_hex(a), 3: sha256_hex(e)}
    assert put_pack(env, vol, [b, c]) == PackStored(
        stored=[sha256_hex(b), sha256_hex(c)], present=[]
    )
    env.commit(vol, {1: sha256_hex(b), 2: sha256_hex(c)})
    again = env.collect()
    assert (again.locations_deleted, again.packs_deleted, again.packs) == (0, 0, 2)
    assert env.dangling() == []

    # With the volume gone, every pack goes.
    env.blocks.delete_volume(ACCOUNT, vol)
    last = env.collect()
    assert (last.locations_deleted, last.packs_deleted) == (4, 2)
    assert pack_objects(env, scope) == set() and pack_rows(env, scope) == {}
    assert list(env.store.list("packs/")) == []


def test_young_packs_and_locations_are_kept_and_a_dry_run_deletes_nothing(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    a, b = content("young-a"), content("young-b")
    put_pack(env, vol, [a, b])
    pack = pack_of(env, scope, a)
    size = env.store.stat(pack_key(scope, pack)).size  # type: ignore[union-attr]

    young = env.collect(grace=3600)
    assert (young.locations_deleted, young.packs_deleted, young.orphan_packs) == (0, 0, 0)
    assert young.packs == 1 and env.has(scope, sha256_hex(a)) and env.has(scope, sha256_hex(b))

    def later() -> float:
        return time.time() + 7200

    dry = env.collect(grace=3600, dry_run=True, clock=later)
    assert dry.dry_run and dry.locations_deleted == 2
    assert "would delete 2 unreferenced packed chunks' locations" in dry.summary()
    assert pack_rows(env, scope) == {pack: True} and pack_objects(env, scope) == {pack}
    assert env.has(scope, sha256_hex(a)) and env.has(scope, sha256_hex(b))

    real = env.collect(grace=3600, clock=later)
    assert (real.locations_deleted, real.packs_deleted, real.pack_bytes_deleted) == (2, 1, size)
    assert pack_rows(env, scope) == {} and pack_objects(env, scope) == set()
    assert not env.has(scope, sha256_hex(a)) and not env.has(scope, sha256_hex(b))


def test_a_dry_run_reports_the_packs_a_pass_would_delete(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    put_pack(env, vol, [content("dry-a"), content("dry-b")])
    size = env.store.stat(pack_key(scope, pack_of(env, scope, content("dry-a")))).size  # type: ignore[union-attr]
    dry = env.collect(dry_run=True)
    real = env.collect()
    assert (real.packs_deleted, real.pack_bytes_deleted) == (1, size)
    assert (dry.locations_deleted, dry.packs_deleted, dry.pack_bytes_deleted) == (
        real.locations_deleted,
        real.packs_deleted,
        real.pack_bytes_deleted,
    )


def test_orphan_pack_objects_and_unwritten_pack_rows_go_after_the_grace_period(
    env: Env,
) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    live = content("orphans-live")
    put_pack(env, vol, [live])
    env.commit(vol, {0: sha256_hex(live)})
    live_pack = pack_of(env, scope, live)
    # An object whose row never was (or was collected): garbage whatever its age ...
    orphan = new_pack_id()
    env.store.put(pack_key(scope, orphan), b"left by an upload that died", durable=True)
    # ... rows of uploads that died before finishing, one before and one after its put ...
    fresh_after = utcnow() - timedelta(hours=1)
    lost = content("orphans-lost")
    unwritten, new = env.maps.packs.begin(scope, [sha256_hex(lost)], fresh_after)
    assert unwritten is not None and new == [sha256_hex(lost)]
    crashed, _ = env.maps.packs.begin(scope, [sha256_hex(lost)], fresh_after)
    assert crashed is not None
    env.store.put(pack_key(scope, crashed), b"written, never finished", durable=True)
    # ... and objects under packs/ that are not ours: left alone.
    foreign = ["packs/README", f"packs/{scope}/not-a-pack-id", f"packs/{scope}/{'AB' * 16}"]
    for key in foreign:
        env.store.put(key, b"x")

    young = env.collect(grace=3600)
    assert (young.orphan_packs, young.packs_deleted, young.foreign, young.packs) == (0, 0, 3, 3)
    assert pack_objects(env, scope) >= {orphan, crashed, live_pack}
    assert set(pack_rows(env, scope)) == {live_pack, unwritten, crashed}

    report = env.collect(grace=0)
    assert (report.orphan_packs, report.packs_deleted, report.errors) == (1, 2, 0)
    assert pack_rows(env, scope) == {live_pack: True}
    assert pack_objects(env, scope) == {live_pack, "not-a-pack-id", "AB" * 16}
    assert all(env.store.exists(key) for key in foreign)
    # The upload that lost its row learns it when it finishes, and nothing is recorded.
    assert env.maps.packs.finish(unwritten, 10, scope, [(sha256_hex(lost), 0, 10)]) is False
    assert env.maps.packs.locate(scope, sha256_hex(lost)) is None
    assert env.blocks.get_chunk(ACCOUNT, vol, sha256_hex(live)) == live
    assert env.dangling() == []


def test_a_pack_collected_before_it_was_finished_is_stored_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass between an upload's ``begin`` and ``finish`` (a grace period shorter than the
    upload) takes the unwritten row and the object; ``finish`` says so and the upload
    stores the chunks in a new pack, so its answer and the following commit hold."""
    vol = env.volume()
    scope = env.scope(vol)
    datas = [content(("again", i)) for i in range(3)]
    ids = [sha256_hex(d) for d in datas]
    finish = PackIndex.finish
    tries: list[tuple[str, bool]] = []
    passes: list[Any] = []

    def collected_first(
        self: PackIndex, pack_id: str, size: int, scope_: str, entries: Any
    ) -> bool:
        if not passes:
            assert env.store.exists(pack_key(scope, pack_id))  # written, not finished
            passes.append(env.collect(grace=0))
        done = finish(self, pack_id, size, scope_, entries)
        tries.append((pack_id, done))
        return done

    monkeypatch.setattr(PackIndex, "finish", collected_first)
    assert put_pack(env, vol, datas) == PackStored(stored=ids, present=[])
    (first, lost), (second, kept) = tries
    assert (lost, kept) == (False, True) and first != second
    assert (passes[0].packs_deleted, passes[0].errors) == (1, 0)
    assert pack_objects(env, scope) == {second} and pack_rows(env, scope) == {second: True}
    assert all(pack_of(env, scope, d) == second for d in datas)
    env.commit(vol, dict(enumerate(ids)))
    other = reader(env)
    assert [other.get_chunk(ACCOUNT, vol, c) for c in ids] == datas
    other.close()
    assert [env.blocks.get_chunk(ACCOUNT, vol, c) for c in ids] == datas
    assert env.collect(grace=0).packs_deleted == 0 and env.dangling() == []


def test_an_upload_collected_every_time_fails_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    data = content("unlucky")
    finish = PackIndex.finish
    tries: list[bool] = []

    def always_collected(
        self: PackIndex, pack_id: str, size: int, scope_: str, entries: Any
    ) -> bool:
        env.collect(grace=0)
        tries.append(finish(self, pack_id, size, scope_, entries))
        return tries[-1]

    monkeypatch.setattr(PackIndex, "finish", always_collected)
    with pytest.raises(ObjectStoreError, match="collected 3 times before it was finished"):
        put_pack(env, vol, [data])
    assert tries == [False] * 3
    assert pack_rows(env, scope) == {} and pack_objects(env, scope) == set()
    assert env.maps.packs.locate(scope, sha256_hex(data)) is None
    with pytest.raises(MissingChunksError):
        env.commit(vol, {0: sha256_hex(data)})
    monkeypatch.undo()
    assert put_pack(env, vol, [data]).stored == [sha256_hex(data)]
    env.commit(vol, {0: sha256_hex(data)})
    assert env.blocks.get_chunk(ACCOUNT, vol, sha256_hex(data)) == data


def test_a_read_through_a_stale_cached_location_looks_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that read a chunk caches its location; after the chunk was packed
    again elsewhere and its first pack collected, the cached location leads to a missing
    object, and the read looks the chunk up again instead of failing."""
    vol = env.volume()
    scope = env.scope(vol)
    a, b = content("stale-a"), content("stale-b")
    put_pack(env, vol, [a, b])
    first = pack_of(env, scope, a)
    env.commit(vol, {0: sha256_hex(a)})
    other = reader(env)
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(a)) == a
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(b)) == b

    # Two hours on, a's location is old: an upload of it packs it anew ...
    now = utcnow
    with monkeypatch.context() as m:
        m.setattr(service, "utcnow", lambda: now() + timedelta(hours=2))
        assert put_pack(env, vol, [a, b]).stored == [sha256_hex(a), sha256_hex(b)]
    second = pack_of(env, scope, a)
    assert second != first and pack_of(env, scope, b) == second
    env.commit(vol, {1: sha256_hex(b)})
    # ... so the first pack has no location left and goes.
    report = env.collect()
    assert (report.locations_deleted, report.packs_deleted) == (0, 1)
    assert pack_objects(env, scope) == {second}

    lookups: list[str] = []
    locate = other.maps.packs.locate

    def counted(scope_: str, chunk_id: str) -> Location | None:
        lookups.append(chunk_id)
        return locate(scope_, chunk_id)

    monkeypatch.setattr(other.maps.packs, "locate", counted)
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(a)) == a
    assert lookups == [sha256_hex(a)]
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(a)) == a  # the new location is cached
    assert lookups == [sha256_hex(a)]
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(b)) == b
    # A chunk whose location went with its pack is not found (404), not an error.
    c = content("stale-c")
    put_pack(env, vol, [c])
    assert other.get_chunk(ACCOUNT, vol, sha256_hex(c)) == c
    assert env.collect().packs_deleted == 1
    with pytest.raises(NotFoundError):
        other.get_chunk(ACCOUNT, vol, sha256_hex(c))
    other.close()
    assert env.dangling() == []


@pytest.mark.parametrize("env", ["directory"], indirect=True)
@pytest.mark.parametrize("empty_db_url", ["postgresql"], indirect=True)
def test_a_pass_deleting_an_unwritten_pack_while_its_upload_finishes_keeps_moved_chunks(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk a map names, packed over an hour ago, is uploaded again: it goes into a
    new pack, and ``finish`` moves its location there. A pass with a grace period shorter
    than that upload selects the new pack as empty (unwritten, no location yet); if the
    upload finishes before the pass deletes the rows it selected, the pass must not take
    the moved location with the pack: the map names the chunk."""
    vol = env.volume()
    scope = env.scope(vol)
    data = content("moved")
    put_pack(env, vol, [data])
    old_pack = pack_of(env, scope, data)
    env.commit(vol, {0: sha256_hex(data)})
    with env.sessions.begin() as s:
        s.execute(update(ChunkLocation).values(created=utcnow() - timedelta(hours=2)))

    engine = bound_engine(env.sessions)
    assert engine is not None
    finish = PackIndex.finish
    held: list[Callable[[], bool]] = []
    finished: list[bool] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if held and statement.lstrip().upper().startswith("DELETE FROM CHUNK_PACKS"):
            finished.append(held.pop()())  # the upload finishes as the pass deletes

    def finish_during_a_pass(
        self: PackIndex, pack_id: str, size: int, scope_: str, entries: Any
    ) -> bool:
        rows = list(entries)
        held.append(lambda: finish(self, pack_id, size, scope_, rows))
        env.collect(grace=0)  # selects the upload's pack as empty, then deletes it
        if held:  # the pass deleted nothing: finish now
            finished.append(held.pop()())
        return finished[-1]

    event.listen(engine, "before_cursor_execute", hook)
    monkeypatch.setattr(PackIndex, "finish", finish_during_a_pass)
    try:
        assert put_pack(env, vol, [data]).stored == [sha256_hex(data)]
    finally:
        event.remove(engine, "before_cursor_execute", hook)
        monkeypatch.undo()
    assert env.dangling() == []
    assert pack_of(env, scope, data) != old_pack
    env.collect(grace=0)
    assert env.dangling() == []
    assert reader(env).get_chunk(ACCOUNT, vol, sha256_hex(data)) == data


@pytest.mark.timeout(60)
def test_pack_uploads_racing_with_zero_grace_collection_never_lose_a_referenced_chunk(
    env: Env,
) -> None:
    """Writers upload in packs (some chunks present already, some loose), commit
    (re-uploading what a refused commit names), take and delete snapshots, while passes
    with no grace period run again and again. After every pass every chunk a map names
    can be read, and at the end every map reads back right."""
    pool = [content(("pack-pool", i)) for i in range(10)]
    counts = {"restored": 0, "packs": 0}
    lock = threading.Lock()

    def upload(vol: str, datas: list[bytes], rng: random.Random) -> None:
        if rng.random() < 0.2:  # now and then one by one, as old gateways do
            for d in datas:
                env.put(vol, d)
            return
        for _ in range(20):
            try:
                put_pack(env, vol, datas)
                with lock:
                    counts["packs"] += 1
                return
            except ObjectStoreError as e:  # collected 3 times before finishing
                assert "collected" in str(e)
                with lock:
                    counts["restored"] += 1
        raise AssertionError("a pack upload was collected 20 times in a row")

    race = race_with_collector(env, pool, upload, seeds=[11, 12], duration=3.0, max_changes=5)
    models, frozen, passes = race.models, race.frozen, race.passes
    final = env.collect(grace=0)
    assert final.errors == 0 and env.dangling() == []
    check = reader(env)  # no cached locations: every read looks its chunk up
    for vol, model in models.items():
        assert env.maps.read_map(vol) == {i: sha256_hex(pool[n]) for i, n in model.items()}
        for n in set(model.values()):
            assert check.get_chunk(ACCOUNT, vol, sha256_hex(pool[n])) == pool[n]
    for snap, model in frozen.items():
        assert env.maps.read_map(None, snapshot_id=snap) == {
            i: sha256_hex(pool[n]) for i, n in model.items()
        }
        for i, n in model.items():
            assert check.get_block(ACCOUNT, snap, i)[1] == pool[n]
    check.close()
    print(
        f"{len(passes)} passes deleted {sum(p.locations_deleted for p in passes)} locations "
        f"and {sum(p.packs_deleted for p in passes)} packs; {race.refused} commits refused; "
        f"{counts}"
    )
    assert len(passes) >= 2 and counts["packs"] > 0
    # With every map gone, one pass leaves no pack, row or location behind: the race left
    # nothing that a pass cannot find.
    for snap in frozen:
        env.blocks.delete_snapshot(ACCOUNT, snap)
    for vol in models:
        env.blocks.delete_volume(ACCOUNT, vol)
    last = env.collect(grace=0)
    assert last.errors == 0 and last.packs_deleted > 0
    assert list(env.store.list("packs/")) == []
    with env.sessions() as s:
        assert s.scalars(select(ChunkPack.id)).all() == []
        assert s.scalars(select(ChunkLocation.chunk_id)).all() == []
