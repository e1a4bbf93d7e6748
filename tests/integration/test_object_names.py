"""Object names reveal nothing (docs/adr/0009-object-names-and-customer-keys.md): a bucket
reader who knows some content cannot tell from the store whether it is there, while the
provider still reads, deduplicates, restores and collects; a store written before keyed
names keeps working and ``migrate-object-names`` renames it. Real databases (SQLite,
PostgreSQL) and stores (a directory, S3 on the moto server)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sgw.provider.blockstore.object_names import migrate_object_names
from sgw.provider.blockstore.packs import PACKS_PREFIX, index_bytes, pack_format
from sgw.provider.blockstore.service import BlockService, chunk_key, legacy_chunk_key
from tests.fixtures.block_service import ACCOUNT, Env, put_pack
from tests.fixtures.chunk_data import content, sha256_hex


def bucket(env: Env) -> dict[str, bytes]:
    """Everything a bucket reader sees: every key and every object's bytes."""
    return {key: env.store.get(key) for key in env.store.list()}


def revealed(env: Env, known: bytes) -> list[str]:
    """The keys whose name or bytes hold the SHA-256 of ``known`` (raw or hex): how a
    reader with a listing and a guess finds out whether the content is stored."""
    digest = hashlib.sha256(known).digest()
    hexes = (digest.hex().encode(), digest.hex().upper().encode())
    return [
        key
        for key, data in bucket(env).items()
        if digest.hex() in key.lower() or digest in data or any(h in data for h in hexes)
    ]


def test_a_bucket_reader_with_known_content_cannot_find_its_object(env: Env) -> None:
    vol = env.volume()
    loose, packed = content("known loose"), content("known packed")
    env.put(vol, loose)
    put_pack(env, vol, [packed, content("other packed")])
    env.commit(vol, {0: sha256_hex(loose), 1: sha256_hex(packed)})
    snap = env.blocks.snapshot_volume(ACCOUNT, vol).id

    # The attack: hash the known content, look for it in every key and object.
    assert revealed(env, loose) == [] and revealed(env, packed) == []
    assert any(k.startswith("chunks/") for k in bucket(env))  # it did look at them
    assert any(k.startswith(PACKS_PREFIX) for k in bucket(env))
    # ... while the provider reads both, also for a volume restored from the snapshot.
    copy = env.volume(from_snapshot_id=snap)
    for volume_id in (vol, copy):
        assert env.blocks.get_chunk(ACCOUNT, volume_id, sha256_hex(loose)) == loose
        assert env.blocks.get_chunk(ACCOUNT, volume_id, sha256_hex(packed)) == packed


def test_the_same_chunk_put_twice_is_stored_once(env: Env) -> None:
    vol = env.volume()
    data = content("twice")
    before = set(env.store.list())
    env.put(vol, data)
    env.put(vol, data)
    assert len(set(env.store.list()) - before) == 1
    # Names are per scope: another lineage's name for the same content differs.
    other = env.volume()
    env.put(other, data)
    keys = {chunk_key(env.blocks.keys, env.scope(v), sha256_hex(data)) for v in (vol, other)}
    assert len(keys) == 2 and keys <= set(env.store.list())


def make_legacy(env: Env, scope: str, loose: list[str]) -> Env:
    """Turns the scope's objects into what the code before keyed names wrote: the
    ``loose`` chunks under ``chunks/<scope>/<id[:2]>/<id>`` (the bytes unchanged: the
    encryption never depended on the name), its packs with chunk ids in a format 1
    index; and a new provider (no memory of what the old one put) on that store."""
    for chunk_id in loose:
        key = chunk_key(env.blocks.keys, scope, chunk_id)
        env.store.put(legacy_chunk_key(scope, chunk_id), env.store.get(key))
        env.store.delete(key)
    for pack in env.maps.packs.contents(scope, datetime(9999, 1, 1, tzinfo=UTC)):
        key = f"{PACKS_PREFIX}{scope}/{pack.id}"
        data = env.store.get(key)
        legacy = index_bytes(sorted(pack.chunks, key=lambda e: e[1]), 1)
        env.store.put(key, data[: len(data) - len(legacy)] + legacy)
        assert pack_format(env.store.get(key)) == 1
    return Env(BlockService(env.maps, env.store, env.blocks.keys), env.store, env.sessions)


def test_a_store_from_before_keyed_names_reads_restores_collects_and_migrates(
    env: Env,
) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    a, b, c, garbage = (env.put(vol, content(t)) for t in ("a", "b", "c", "garbage"))
    p1 = put_pack(env, vol, [content("p1"), content("p2")]).stored[0]
    env.commit(vol, {0: a, 1: b, 2: p1})
    snap = env.blocks.snapshot_volume(ACCOUNT, vol).id
    env.commit(vol, {1: None})  # b only in the snapshot now
    upgraded = make_legacy(env, scope, [a, b, c, garbage])
    try:
        check_legacy_store(upgraded, vol, snap, (a, b, c, garbage, p1))
    finally:
        upgraded.blocks.close()


def check_legacy_store(
    env: Env, vol: str, snap: str, chunks: tuple[str, str, str, str, str]
) -> None:
    scope = env.scope(vol)
    a, b, c, garbage, p1 = chunks
    assert revealed(env, content("a")) and revealed(env, content("p1"))  # the old leak

    # Reads, a commit naming a legacy object without uploading it again, a restore.
    assert env.blocks.get_chunk(ACCOUNT, vol, a) == content("a")
    assert env.blocks.get_chunk(ACCOUNT, vol, p1) == content("p1")
    env.commit(vol, {3: c})
    copy = env.volume(from_snapshot_id=snap)
    assert env.blocks.get_chunk(ACCOUNT, copy, b) == content("b")
    assert env.dangling() == []
    # Collection: the unreferenced legacy object and packed chunk go, the rest stays.
    report = env.collect()
    assert (report.deleted, report.referenced, report.errors) == (1, 3, 0)
    assert report.locations_deleted == 1
    assert not env.store.exists(legacy_chunk_key(scope, garbage))
    assert env.dangling() == []

    # A migration cut short after copying ``a`` to its keyed name, before deleting it.
    env.store.put(chunk_key(env.blocks.keys, scope, a), env.store.get(legacy_chunk_key(scope, a)))
    migrated = migrate_object_names(env.store, env.blocks.keys)
    assert (migrated.renamed, migrated.duplicates, migrated.packs_rewritten) == (2, 1, 1)
    assert (migrated.damaged, migrated.errors) == (0, 0)
    for data in (content(t) for t in ("a", "b", "c", "p1", "p2")):
        assert revealed(env, data) == []
    assert all(pack_format(env.store.get(k)) == 2 for k in env.store.list(PACKS_PREFIX))
    assert env.blocks.get_chunk(ACCOUNT, vol, a) == content("a")
    assert env.blocks.get_chunk(ACCOUNT, vol, p1) == content("p1")
    assert env.blocks.get_chunk(ACCOUNT, copy, b) == content("b")
    assert env.dangling() == []
    # Run again: nothing left to do.
    again = migrate_object_names(env.store, env.blocks.keys)
    packs = len(list(env.store.list(PACKS_PREFIX)))  # the rewritten sparse pack, too
    assert (again.renamed, again.duplicates, again.packs_rewritten) == (0, 0, 0)
    assert again.packs_current == packs
    # And collection still frees what nothing references.
    assert env.collect().deleted == 0
    for volume_id in (vol, copy):
        env.blocks.delete_volume(ACCOUNT, volume_id)
    env.blocks.delete_snapshot(ACCOUNT, snap)
    final = env.collect()
    assert (final.deleted, final.errors) == (3, 0)
    assert [k for k in env.store.list() if scope in k] == []
