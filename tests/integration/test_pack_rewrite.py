"""Garbage collection rewrites packs that are less than half live (docs/adr/0005): the
live chunks are copied into a new pack, their locations moved, and the old pack goes in
the next pass. Real databases (SQLite, PostgreSQL) and stores (directory, S3 on moto)."""

from __future__ import annotations

from sgw.provider.blockstore.packs import PACKS_PREFIX, pack_key, read_index
from tests.fixtures.block_service import ACCOUNT, Env, put_pack
from tests.fixtures.chunk_data import content, sha256_hex


def pack_of_new(e: Env, volume_id: str, datas: list[bytes]) -> list[str]:
    """Uploads ``datas`` as one pack (all new); their ids."""
    done = put_pack(e, volume_id, datas)
    assert sorted(done.stored) == sorted(sha256_hex(d) for d in datas)
    return [sha256_hex(d) for d in datas]


def packs(e: Env, scope: str) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in e.store.list(f"{PACKS_PREFIX}{scope}/"))


def test_a_mostly_dead_pack_is_rewritten_and_its_live_chunk_stays_readable(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    datas = [content(("rewrite", i)) for i in range(4)]
    ids = pack_of_new(env, vol, datas)
    env.commit(vol, dict(enumerate(ids)))
    [old] = packs(env, scope)
    env.commit(vol, {1: None, 2: None, 3: None})  # one chunk of four still referenced

    dry = env.collect(dry_run=True)
    assert (dry.locations_deleted, dry.packs_rewritten) == (3, 1)
    first = env.collect()
    assert (first.locations_deleted, first.packs_rewritten, first.errors) == (3, 1, 0)
    assert first.pack_bytes_freed > 0
    # The old pack stays for this pass (a reader that looked it up still finds it).
    new = [p for p in packs(env, scope) if p != old]
    assert old in packs(env, scope) and len(new) == 1
    rewritten = read_index(env.store.get(pack_key(scope, new[0])))
    assert [n for n, _, _ in rewritten] == [env.blocks.keys.object_name(scope, ids[0])]
    location = env.maps.packs.locate(scope, ids[0])
    assert location is not None and location.pack_id == new[0]
    assert env.blocks.get_chunk(ACCOUNT, vol, ids[0]) == datas[0]

    second = env.collect()
    assert (second.packs_deleted, second.packs_rewritten, second.errors) == (1, 0, 0)
    assert packs(env, scope) == new
    # This process cached the old location: the read finds the pack gone and looks again.
    assert env.blocks.get_chunk(ACCOUNT, vol, ids[0]) == datas[0]
    assert env.dangling() == []


def test_a_mostly_live_pack_is_kept(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    ids = pack_of_new(env, vol, [content(("mostly", i)) for i in range(4)])
    env.commit(vol, dict(enumerate(ids)))
    env.commit(vol, {3: None})
    report = env.collect()
    assert (report.locations_deleted, report.packs_rewritten, report.packs_deleted) == (1, 0, 0)
    assert len(packs(env, scope)) == 1


def test_a_damaged_pack_is_not_rewritten(env: Env) -> None:
    """Copying a damaged chunk into a new pack would hide the damage: the pass reports
    an error and leaves the pack and its locations as they are."""
    vol = env.volume()
    scope = env.scope(vol)
    datas = [content(("damaged", i)) for i in range(4)]
    ids = pack_of_new(env, vol, datas)
    env.commit(vol, dict(enumerate(ids)))
    env.commit(vol, {1: None, 2: None, 3: None})
    [old] = packs(env, scope)
    key = pack_key(scope, old)
    blob = bytearray(env.store.get(key))
    location = env.maps.packs.locate(scope, ids[0])
    assert location is not None
    blob[location.offset + location.length // 2] ^= 0xFF
    env.store.put(key, bytes(blob))

    report = env.collect()
    assert (report.packs_rewritten, report.errors) == (0, 1)
    assert packs(env, scope) == [old]
    assert env.maps.packs.locate(scope, ids[0]) == location
