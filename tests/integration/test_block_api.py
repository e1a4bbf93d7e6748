"""The block API (docs/block-api.md) through a real `sgw provider serve --insecure-dev`.

Most tests share one server per object store (a directory and S3 on the moto server,
SQLite metadata) and make their own volumes; the end-to-end test runs on each database
(SQLite, PostgreSQL) and each store with a server of its own.
"""

from __future__ import annotations

import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from sgw.common.chunks import decode_chunk
from sgw.provider.blockstore.keys import derive_key
from tests.fixtures.block_api import SMALL, Api, start_provider_on
from tests.fixtures.chunk_data import content, sha256_hex
from tests.fixtures.daemons import ProviderProcess

KIB = 1 << 10
MIB = 1 << 20


@pytest.fixture(scope="module", params=["dir", "s3"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One provider per object store for the whole module (tests make their own volumes)."""
    store = request.param
    process, extra = start_provider_on(
        tmp_path_factory.mktemp(f"api-{store}") / "provider", store, request
    )
    try:
        with httpx.Client(base_url=process.url, timeout=30) as client:
            yield Api(process, client, store, **extra)
        assert process.stop() == 0
    finally:
        process.kill()


def test_volume_create_get_delete(api: Api) -> None:
    vol = api.volume(size=10 * MIB, chunk_size=MIB)
    assert set(vol) == {
        *("id", "name", "size", "chunk_size", "mode", "map_version", "created", "gateway_id")
    }
    assert (vol["size"], vol["chunk_size"], vol["mode"], vol["map_version"]) == (
        10 * MIB,
        MIB,
        "cached",
        0,
    )
    assert api.client.get(f"/v1/volumes/{vol['id']}").json() == vol
    again = api.client.post(
        "/v1/volumes", json={"name": vol["name"], "size": MIB, "mode": "stored"}
    )
    assert again.status_code == 409 and vol["name"] in again.json()["message"]
    default = api.client.post(
        "/v1/volumes", json={"name": f"d-{uuid.uuid4().hex[:6]}", "size": MIB, "mode": "stored"}
    ).json()
    assert (default["chunk_size"], default["mode"]) == (MIB, "stored")
    bad_size = api.client.post("/v1/volumes", json={"name": "x", "size": 0, "mode": "cached"})
    assert bad_size.status_code == 400 and "size" in bad_size.json()["message"]
    bad_chunk = api.client.post(
        "/v1/volumes", json={"name": "x", "size": MIB, "mode": "cached", "chunk_size": 3000}
    )
    assert bad_chunk.status_code == 400 and "power of two" in bad_chunk.json()["message"]
    bad_mode = api.client.post("/v1/volumes", json={"name": "x", "size": MIB, "mode": "hot"})
    assert bad_mode.status_code == 422 and bad_mode.json()["error"] == "invalid_request"
    assert api.client.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    gone = api.client.get(f"/v1/volumes/{vol['id']}")
    assert gone.status_code == 404 and gone.json()["error"] == "not_found"
    assert vol["id"] in gone.json()["message"]
    assert api.client.delete(f"/v1/volumes/{vol['id']}").status_code == 404


def test_chunk_put_is_idempotent_reads_back_and_accepts_zstd(api: Api) -> None:
    vol = api.volume()
    data = content("a")
    before = api.keys()
    first = api.put_chunk(vol["id"], data)
    assert first.status_code == 201 and first.json() == {"chunk_id": sha256_hex(data)}
    assert api.put_chunk(vol["id"], data).status_code == 200
    got = api.client.get(f"/v1/volumes/{vol['id']}/chunks/{sha256_hex(data)}")
    assert got.status_code == 200 and got.content == data
    assert got.headers["x-sgw-sha256"] == sha256_hex(data)
    assert got.headers["content-type"] == "application/octet-stream"
    # A zstd body (here much smaller than the chunk) is stored as its plaintext.
    packed = content("z")
    wire = zstandard.ZstdCompressor().compress(packed)
    assert len(wire) < len(packed)
    zput = api.client.put(
        f"/v1/volumes/{vol['id']}/chunks/{sha256_hex(packed)}",
        content=wire,
        headers={"x-sgw-sha256": sha256_hex(packed), "content-encoding": "zstd"},
    )
    assert zput.status_code == 201, zput.text
    assert api.client.get(f"/v1/volumes/{vol['id']}/chunks/{sha256_hex(packed)}").content == packed
    # So is a body of several zstd frames.
    framed = content("frames")
    half = len(framed) // 2
    zc = zstandard.ZstdCompressor()
    frames = zc.compress(framed[:half]) + zc.compress(framed[half:])
    assert put_zstd(api, vol["id"], sha256_hex(framed), frames).status_code == 201
    assert api.client.get(f"/v1/volumes/{vol['id']}/chunks/{sha256_hex(framed)}").content == framed
    # A short chunk (the end of a volume) is fine.
    short = content("short", 100)
    assert api.put_chunk(vol["id"], short).status_code == 201
    scope = api.scope_of(sha256_hex(data))
    assert scope != vol["id"]
    assert api.keys() - before == {
        api.object_key(scope, c)
        for c in (sha256_hex(data), sha256_hex(packed), sha256_hex(framed), sha256_hex(short))
    }
    missing = api.client.get(f"/v1/volumes/{vol['id']}/chunks/{sha256_hex(b'nope')}")
    assert missing.status_code == 404 and "PUT" in missing.json()["message"]


def test_commit_map_conflicts_retries_and_missing_chunks(api: Api) -> None:
    vol = api.volume()
    vid = vol["id"]
    a, b = content("a"), content("b")
    for data in (a, b):
        assert api.put_chunk(vid, data).status_code in {200, 201}
    assert api.map(vid) == (0, {})
    r = api.commit(vid, 0, {0: sha256_hex(a), 5: sha256_hex(b)}, key="k1")
    assert r.status_code == 200 and r.json() == {"version": 1}
    assert api.map(vid) == (1, {0: sha256_hex(a), 5: sha256_hex(b)})
    assert api.client.get(f"/v1/volumes/{vid}").json()["map_version"] == 1
    # A stale base is refused and changes nothing.
    stale = api.commit(vid, 0, {1: sha256_hex(a)}, key="k2")
    assert stale.status_code == 409 and stale.json()["error"] == "version_conflict"
    assert "version 1" in stale.json()["message"]
    # A retry (same key, same changes) answers the first version and applies nothing.
    retry = api.commit(vid, 0, {0: sha256_hex(a), 5: sha256_hex(b)}, key="k1")
    assert retry.status_code == 200 and retry.json() == {"version": 1}
    reused = api.commit(vid, 1, {0: sha256_hex(b)}, key="k1")
    assert reused.status_code == 409 and reused.json()["error"] == "idempotency_key_reused"
    # Naming a chunk the store does not hold: 400 naming it, nothing changes.
    ghost = sha256_hex(b"never uploaded")
    missing = api.commit(vid, 1, {2: sha256_hex(a), 3: ghost})
    assert missing.status_code == 400, missing.text
    assert missing.json()["error"] == "missing_chunks" and ghost in missing.json()["message"]
    assert missing.json()["chunk_ids"] == [ghost]
    for bad, fragment in (
        ({64: sha256_hex(a)}, "out of range"),
        ({-1: sha256_hex(a)}, "out of range"),
        ({1: "ABC"}, "not a chunk id"),
        ({1: sha256_hex(a).upper()}, "not a chunk id"),
    ):
        r = api.commit(vid, 1, bad)
        assert r.status_code == 400 and fragment in r.json()["message"], r.text
    not_index = api.client.post(
        f"/v1/volumes/{vid}/commits",
        json={"base_version": 1, "idempotency_key": "x", "changes": {"first": sha256_hex(a)}},
    )
    assert not_index.status_code == 400 and "first" in not_index.json()["message"]
    assert api.map(vid) == (1, {0: sha256_hex(a), 5: sha256_hex(b)})
    # null: the chunk is all zero now.
    assert api.commit(vid, 1, {5: None, 1: sha256_hex(b)}).json() == {"version": 2}
    assert api.map(vid) == (2, {0: sha256_hex(a), 1: sha256_hex(b)})
    unknown = api.commit(str(uuid.uuid4()), 0, {})
    assert unknown.status_code == 404


def test_snapshot_of_a_volume_is_immutable_after_later_commits(api: Api) -> None:
    vid = api.volume()["id"]
    old, new = content("old"), content("new")
    api.put_chunk(vid, old)
    api.put_chunk(vid, new)
    assert api.commit(vid, 0, {3: sha256_hex(old), 7: sha256_hex(old)}).status_code == 200
    r = api.client.post(f"/v1/volumes/{vid}/snapshots", json={"description": "before"})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert (snap["status"], snap["volume_id"], snap["description"]) == ("completed", vid, "before")
    assert snap["completed"] is not None and snap["chunk_size"] == SMALL
    assert api.commit(vid, 1, {3: sha256_hex(new), 7: None, 9: sha256_hex(new)}).status_code == 200
    listed = api.pages(f"/v1/snapshots/{snap['id']}/blocks", limit=10)
    assert listed == [(3, sha256_hex(old)), (7, sha256_hex(old))]
    block = api.client.get(f"/v1/snapshots/{snap['id']}/blocks/3")
    assert block.status_code == 200 and block.content == old
    assert block.headers["x-sgw-sha256"] == sha256_hex(old)
    assert api.client.get(f"/v1/snapshots/{snap['id']}/blocks/9").status_code == 404
    sneaky = api.put_block(snap["id"], 3, new)
    assert sneaky.status_code == 409 and sneaky.json()["error"] == "snapshot_state"
    # No body: a snapshot without description.
    bare = api.client.post(f"/v1/volumes/{vid}/snapshots")
    assert bare.status_code == 201 and bare.json()["description"] is None


def test_caller_named_snapshots_and_volumes_are_idempotent(api: Api) -> None:
    """What a gateway relies on to retry after a lost reply: the same snapshot or volume
    again, never a second one; a snapshot at a map version that moved on is refused."""
    vid = api.volume()["id"]
    data = content("idem")
    api.put_chunk(vid, data)
    assert api.commit(vid, 0, {2: sha256_hex(data)}).status_code == 200
    sid = str(uuid.uuid4())
    ask = {"snapshot_id": sid, "map_version": 1}
    first = api.client.post(f"/v1/volumes/{vid}/snapshots", json=ask)
    assert first.status_code == 201, first.text
    assert first.json()["id"] == sid
    again = api.client.post(f"/v1/volumes/{vid}/snapshots", json=ask)
    assert again.status_code == 201 and again.json() == first.json()
    moved = api.client.post(
        f"/v1/volumes/{vid}/snapshots", json={"snapshot_id": str(uuid.uuid4()), "map_version": 0}
    )
    assert moved.status_code == 409, moved.text
    other = api.volume()["id"]
    stolen = api.client.post(f"/v1/volumes/{other}/snapshots", json={"snapshot_id": sid})
    assert stolen.status_code == 409, stolen.text
    bad = api.client.post(f"/v1/volumes/{vid}/snapshots", json={"snapshot_id": "nope"})
    assert bad.status_code == 400, bad.text
    volume_id = str(uuid.uuid4())
    ask_volume = {"id": volume_id, "name": f"v-{volume_id[:8]}", "size": MIB, "mode": "stored"}
    made = api.client.post("/v1/volumes", json=ask_volume)
    assert made.status_code == 201 and made.json()["id"] == volume_id, made.text
    remade = api.client.post("/v1/volumes", json=ask_volume)
    assert remade.status_code == 201 and remade.json() == made.json()
    clash = api.client.post("/v1/volumes", json={**ask_volume, "name": "another"})
    assert clash.status_code == 409, clash.text


def test_block_api_flow_with_changed_blocks_and_volume_from_snapshot(api: Api) -> None:
    size = 40 * SMALL + 1000  # the last block is short
    r = api.client.post(
        "/v1/snapshots", json={"volume_size": size, "chunk_size": SMALL, "description": "base"}
    )
    assert r.status_code == 201, r.text
    base = r.json()
    assert (base["status"], base["volume_id"], base["completed"]) == ("pending", None, None)
    assert api.client.get(f"/v1/snapshots/{base['id']}").json() == base
    blocks = {i: content(("base", i)) for i in (0, 1, 2, 10, 20, 30)}
    blocks[40] = content("last", 1000)
    for i, data in blocks.items():
        put = api.put_block(base["id"], i, data)
        assert put.status_code == 201, put.text
        assert put.json() == {"index": i, "chunk_id": sha256_hex(data)}
    wrong_length = api.put_block(base["id"], 5, content("x", SMALL - 1))
    assert wrong_length.status_code == 400 and "exactly" in wrong_length.json()["message"]
    out_of_range = api.put_block(base["id"], 41, content("x"))
    assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["message"]
    expected = sorted((i, sha256_hex(d)) for i, d in blocks.items())
    assert api.pages(f"/v1/snapshots/{base['id']}/blocks", limit=3) == expected
    assert api.pages(f"/v1/snapshots/{base['id']}/blocks", limit=1000) == expected
    page = api.client.get(f"/v1/snapshots/{base['id']}/blocks", params={"start": 2, "limit": 2})
    assert page.json() == {
        "blocks": [{"index": i, "chunk_id": sha256_hex(blocks[i])} for i in (2, 10)],
        "next": 20,
    }
    done = api.client.post(f"/v1/snapshots/{base['id']}/complete")
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert done.json()["completed"] is not None
    assert api.client.post(f"/v1/snapshots/{base['id']}/complete").status_code == 200
    late = api.put_block(base["id"], 3, content("late"))
    assert late.status_code == 409 and "pending" in late.json()["message"]
    # An incremental child: changes some blocks, zeroes one (a zero block is allowed here).
    child = api.client.post(
        "/v1/snapshots", json={"volume_size": size, "parent_snapshot_id": base["id"]}
    ).json()
    assert child["chunk_size"] == SMALL and child["parent_snapshot_id"] == base["id"]
    changed = {1: content("c1"), 5: content("c5"), 30: content("c30"), 39: content("c39")}
    for i, data in changed.items():
        assert api.put_block(child["id"], i, data).status_code == 201
    zero = api.put_block(child["id"], 10, bytes(SMALL))
    assert zero.status_code == 201 and zero.json() == {"index": 10, "chunk_id": None}
    pending_diff = api.client.get(
        f"/v1/snapshots/{child['id']}/changed-blocks", params={"first_snapshot_id": base["id"]}
    )
    assert pending_diff.status_code == 409
    assert api.client.post(f"/v1/snapshots/{child['id']}/complete").status_code == 200
    diff = api.pages(
        f"/v1/snapshots/{child['id']}/changed-blocks", limit=2, first_snapshot_id=base["id"]
    )
    assert diff == sorted([(i, sha256_hex(d)) for i, d in changed.items()] + [(10, None)])
    everything = api.pages(f"/v1/snapshots/{child['id']}/changed-blocks", limit=4)
    final = {**blocks, **changed}
    del final[10]
    assert everything == sorted((i, sha256_hex(d)) for i, d in final.items())
    assert api.client.get(f"/v1/snapshots/{child['id']}/blocks/10").status_code == 404
    assert api.client.get(f"/v1/snapshots/{child['id']}/blocks/0").content == blocks[0]
    assert api.client.get(f"/v1/snapshots/{child['id']}/blocks/40").content == blocks[40]
    # A volume from the snapshot reads the same chunks (same key scope, nothing copied).
    keys = api.keys()
    vol = api.volume(size=size, chunk_size=None, from_snapshot_id=child["id"])
    assert vol["chunk_size"] == SMALL
    version, vmap = api.map(vol["id"])
    assert version == 0 and vmap == dict(everything)
    for i, cid in vmap.items():
        got = api.client.get(f"/v1/volumes/{vol['id']}/chunks/{cid}")
        assert got.status_code == 200 and got.content == final[i]
    assert api.keys() == keys
    # The volume's own uploads land in the snapshot lineage's scope too.
    api.put_chunk(vol["id"], content("restored"))
    lineage = {k.split("/")[1] for k in keys if api.object_key(k.split("/")[1], vmap[40]) == k}
    assert len(lineage) == 1 and base["id"] not in lineage
    assert {k.split("/")[1] for k in api.keys() - keys} == lineage
    # Deleting the base leaves the child (and the volume) readable.
    assert api.client.delete(f"/v1/snapshots/{base['id']}").status_code == 204
    assert api.client.get(f"/v1/snapshots/{base['id']}").status_code == 404
    assert api.client.get(f"/v1/snapshots/{child['id']}/blocks/0").content == blocks[0]


def put_zstd(api: Api, volume_id: str, chunk_id: str, body: bytes) -> httpx.Response:
    """A chunk upload with a zstd body."""
    return api.client.put(
        f"/v1/volumes/{volume_id}/chunks/{chunk_id}",
        content=body,
        headers={"x-sgw-sha256": chunk_id, "content-encoding": "zstd"},
    )


def declaring(frame: bytes, size: int) -> bytes:
    """A zstd frame of 256 to 65791 bytes whose header declares ``size`` bytes instead."""
    assert frame[4] >> 6 == 1  # the content size is a 2-byte field holding size - 256
    end = zstandard.frame_header_size(frame)
    return frame[: end - 2] + (size - 256).to_bytes(2, "little") + frame[end:]


def test_bad_requests_are_refused_and_store_nothing(api: Api) -> None:
    vol = api.volume()
    vid = vol["id"]
    snap = api.client.post("/v1/snapshots", json={"volume_size": 8 * SMALL, "chunk_size": SMALL})
    sid = snap.json()["id"]
    data = content("good")
    cid = sha256_hex(data)
    zc = zstandard.ZstdCompressor(level=1)
    before = api.keys()
    cases: list[tuple[str, httpx.Response, int, str]] = [
        (
            "wrong checksum",
            api.client.put(
                f"/v1/volumes/{vid}/chunks/{sha256_hex(b'other')}",
                content=data,
                headers={"x-sgw-sha256": sha256_hex(b"other")},
            ),
            400,
            "SHA-256",
        ),
        (
            "header differs from path",
            api.client.put(
                f"/v1/volumes/{vid}/chunks/{cid}", content=data, headers={"x-sgw-sha256": "0" * 64}
            ),
            400,
            "differs",
        ),
        (
            "larger than the chunk size",
            api.put_chunk(vid, content("big", SMALL + 1)),
            413,
            "larger",
        ),
        (
            "zstd inflating past the chunk size",
            api.client.put(
                f"/v1/volumes/{vid}/chunks/{sha256_hex(content('bomb', 64 * KIB))}",
                content=zstandard.ZstdCompressor().compress(content("bomb", 64 * KIB)),
                headers={
                    "x-sgw-sha256": sha256_hex(content("bomb", 64 * KIB)),
                    "content-encoding": "zstd",
                },
            ),
            413,
            "larger",
        ),
        (
            "not zstd",
            api.put_chunk(vid, data, **{"content-encoding": "zstd"}),
            400,
            "not valid zstd",
        ),
        (
            "two zstd frames that are not the chunk",
            put_zstd(
                api, vid, sha256_hex(data[:100]), zc.compress(data[:100]) + zc.compress(data[100:])
            ),
            400,
            "SHA-256",
        ),
        (
            "zstd frame whose header lies about its size",
            put_zstd(api, vid, cid, declaring(zc.compress(data), SMALL - 100)),
            400,
            "not valid zstd",
        ),
        (
            "zstd frame of other data",
            put_zstd(api, vid, sha256_hex(content("other")), zc.compress(data)),
            400,
            "SHA-256",
        ),
        ("unknown encoding", api.put_chunk(vid, data, **{"content-encoding": "br"}), 415, "br"),
        ("all-zero chunk", api.put_chunk(vid, bytes(SMALL)), 400, "zero"),
        ("unknown volume", api.put_chunk(str(uuid.uuid4()), data), 404, "not found"),
        (
            "malformed chunk id",
            api.client.put(
                f"/v1/volumes/{vid}/chunks/xyz", content=data, headers={"x-sgw-sha256": "xyz"}
            ),
            400,
            "not a chunk id",
        ),
        (
            "missing x-sgw-sha256",
            api.client.put(f"/v1/volumes/{vid}/chunks/{cid}", content=data),
            422,
            "x-sgw-sha256",
        ),
        ("block index out of range", api.put_block(sid, 8, data), 400, "out of range"),
        ("negative block index", api.put_block(sid, -1, data), 400, "out of range"),
        (
            "block with wrong checksum",
            api.client.put(
                f"/v1/snapshots/{sid}/blocks/0", content=data, headers={"x-sgw-sha256": "1" * 64}
            ),
            400,
            "SHA-256",
        ),
        ("block too large", api.put_block(sid, 0, content("big", SMALL + 1)), 413, "larger"),
        ("unknown snapshot", api.put_block(str(uuid.uuid4()), 0, data), 404, "not found"),
    ]
    for name, response, status, fragment in cases:
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert set(body) >= {"error", "message"}, name
        assert fragment in body["message"], (name, body)
    assert api.keys() == before
    assert api.map(vid) == (0, {})
    assert api.pages(f"/v1/snapshots/{sid}/blocks", limit=10) == []
    bad_page = api.client.get(f"/v1/snapshots/{sid}/blocks", params={"limit": 0})
    assert bad_page.status_code == 422
    far = api.client.get(f"/v1/snapshots/{sid}/blocks", params={"start": 1 << 70})
    assert far.status_code == 422
    huge_base = api.commit(vid, 1 << 70, {})
    assert huge_base.status_code == 422 and "base_version" in huge_base.json()["message"]
    # Without Content-Length (chunked), the limit applies while reading.
    big = content("streamed", 2 * SMALL)
    streamed = api.client.put(
        f"/v1/volumes/{vid}/chunks/{sha256_hex(big)}",
        content=iter([big[:SMALL], big[SMALL:]]),
        headers={"x-sgw-sha256": sha256_hex(big)},
    )
    assert streamed.status_code == 413, streamed.text
    assert api.keys() == before
    # A body declared larger than any call accepts is refused before it is read.
    with socket.create_connection(("127.0.0.1", api.process.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/volumes HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1099511627776\r\n\r\n{"
        )
        assert conn.recv(65536).startswith(b"HTTP/1.1 413")


def test_chunks_at_rest_are_encrypted_under_the_volume_scope_key(api: Api) -> None:
    vol = api.volume()
    data = b"plaintext that must not be visible at rest " * 90
    assert api.put_chunk(vol["id"], data).status_code == 201
    scope = api.scope_of(sha256_hex(data))
    key = api.object_key(scope, sha256_hex(data))
    blob = api.raw(key)
    assert b"plaintext that must not" not in blob
    master_path = api.data_dir / "master.key"
    assert stat.S_IMODE(master_path.stat().st_mode) == 0o600
    master = master_path.read_bytes()
    assert len(master) == 32
    assert decode_chunk(blob, derive_key(master, scope), expected_id=sha256_hex(data)) == data
    # A snapshot of the volume, and a volume made from that, share its scope.
    assert api.commit(vol["id"], 0, {0: sha256_hex(data)}).status_code == 200
    snap = api.client.post(f"/v1/volumes/{vol['id']}/snapshots").json()
    copy = api.volume(from_snapshot_id=snap["id"])
    assert api.client.get(f"/v1/volumes/{copy['id']}/chunks/{sha256_hex(data)}").content == data
    if api.store == "dir":
        assert stat.S_IMODE((api.data_dir / "objects" / key).stat().st_mode) == 0o600


def test_openapi_describes_the_block_api(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    put = spec["paths"]["/v1/volumes/{volume_id}/chunks/{chunk_id}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    assert {p["name"] for p in put["parameters"]} >= {"volume_id", "chunk_id", "x-sgw-sha256"}
    for path in (
        "/v1/volumes",
        "/v1/volumes/{volume_id}/map",
        "/v1/volumes/{volume_id}/commits",
        "/v1/snapshots/{snapshot_id}/changed-blocks",
        "/v1/snapshots/{snapshot_id}/complete",
    ):
        assert path in spec["paths"]
    assert "VolumeOut" in spec["components"]["schemas"]


def test_without_insecure_dev_every_call_but_health_is_401(
    tmp_path: Path, provider_factory: type[ProviderProcess]
) -> None:
    p = provider_factory(tmp_path / "locked", insecure_dev=False).start()
    assert httpx.get(f"{p.url}/v1/health").status_code == 200
    assert httpx.get(f"{p.url}/openapi.json").status_code == 200
    for method, path in (
        ("POST", "/v1/volumes"),
        ("GET", f"/v1/volumes/{uuid.uuid4()}"),
        ("PUT", f"/v1/volumes/{uuid.uuid4()}/chunks/{'0' * 64}"),
        ("POST", "/v1/snapshots"),
        ("GET", f"/v1/snapshots/{uuid.uuid4()}/changed-blocks"),
    ):
        r = httpx.request(method, f"{p.url}{path}", content=b"{}")
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthenticated"
        assert "--insecure-dev" in r.json()["message"]
        assert "management plane" in r.json()["message"]
    assert p.stop() == 0


def test_master_key_is_refused_when_loose_or_lost(
    provider: ProviderProcess, provider_factory: type[ProviderProcess]
) -> None:
    p = provider
    data_dir = p.data_dir
    key_file = data_dir / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    master = key_file.read_bytes()
    vid = httpx.post(
        f"{p.url}/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"}
    ).json()["id"]
    data = content("keep")
    put = httpx.put(
        f"{p.url}/v1/volumes/{vid}/chunks/{sha256_hex(data)}",
        content=data,
        headers={"x-sgw-sha256": sha256_hex(data)},
    )
    assert put.status_code == 201
    assert p.stop() == 0

    def refused() -> str:
        p2 = provider_factory(data_dir)
        with pytest.raises(RuntimeError, match="exited 2") as failure:
            p2.start()
        return str(failure.value)

    key_file.chmod(0o644)
    assert "chmod 600" in refused()
    key_file.chmod(0o600)
    key_file.write_bytes(master[:16])
    assert "not 32" in refused()
    key_file.unlink()
    assert "restore" in refused()
    assert not key_file.exists()  # no new key that could not read the stored chunks
    key_file.write_bytes(master)
    key_file.chmod(0o600)
    p3 = provider_factory(data_dir).start()
    got = httpx.get(f"{p3.url}/v1/volumes/{vid}/chunks/{sha256_hex(data)}")
    assert got.status_code == 200 and got.content == data
    assert p3.stop() == 0


@pytest.mark.parametrize("store", ["dir", "s3"])
def test_end_to_end_on_each_database_and_store(
    store: str, empty_db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    process, extra = start_provider_on(tmp_path / "e2e", store, request, db_url=empty_db_url)
    try:
        with httpx.Client(base_url=process.url, timeout=30) as client:
            api = Api(process, client, store, **extra)
            vid = api.volume(size=16 * SMALL)["id"]
            a, b = content("e2e-a"), content("e2e-b")
            assert api.put_chunk(vid, a).status_code == 201
            assert api.put_chunk(vid, a).status_code == 200
            assert api.commit(vid, 0, {0: sha256_hex(a), 15: sha256_hex(a)}, key="one").json() == {
                "version": 1
            }
            assert api.commit(vid, 0, {0: sha256_hex(a), 15: sha256_hex(a)}, key="one").json() == {
                "version": 1
            }
            assert api.commit(vid, 0, {1: sha256_hex(a)}).status_code == 409
            assert api.commit(vid, 1, {2: sha256_hex(b)}).status_code == 400
            first = client.post(f"/v1/volumes/{vid}/snapshots").json()
            assert api.put_chunk(vid, b).status_code == 201
            assert api.commit(vid, 1, {0: None, 2: sha256_hex(b)}).json() == {"version": 2}
            second = client.post(f"/v1/volumes/{vid}/snapshots").json()
            diff = api.pages(
                f"/v1/snapshots/{second['id']}/changed-blocks",
                limit=1,
                first_snapshot_id=first["id"],
            )
            assert diff == [(0, None), (2, sha256_hex(b))]
            listed = api.pages(f"/v1/snapshots/{second['id']}/blocks", limit=1)
            assert listed == [(2, sha256_hex(b)), (15, sha256_hex(a))]
            copy = api.volume(size=16 * SMALL, from_snapshot_id=first["id"])
            assert api.map(copy["id"]) == (0, {0: sha256_hex(a), 15: sha256_hex(a)})
            assert client.get(f"/v1/volumes/{copy['id']}/chunks/{sha256_hex(a)}").content == a
            assert client.delete(f"/v1/volumes/{vid}").status_code == 204
            assert client.get(f"/v1/snapshots/{first['id']}/blocks/0").content == a
        assert process.stop() == 0
    finally:
        process.kill()
