"""Garbage collection of chunk objects on real databases (SQLite, PostgreSQL) and real
stores (a directory, S3 on the moto server): what is referenced stays, what is not goes
after the grace period, and uploads racing with collection never leave a map naming a
missing chunk. Then the ``sgw provider gc`` command against a running provider."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import httpx
import nbd
import pytest

from sgw.common.errors import MissingChunksError
from sgw.provider.blockstore import gc, service
from sgw.provider.blockstore.keys import open_keyring
from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.blockstore.objects import DirectoryStore
from sgw.provider.blockstore.service import BlockService, chunk_key, legacy_chunk_key
from sgw.provider.db.schema import make_engine, session_factory
from tests.fixtures.block_service import ACCOUNT, CHUNK, Env, race_with_collector
from tests.fixtures.chunk_data import content, sha256_hex
from tests.fixtures.daemons import SGW, GatewayProcess, ProviderProcess
from tests.fixtures.gateway_uploads import (
    VOL_SIZE,
    full_log,
    gateway_args,
    read_all,
    wait_remote_equal,
    write_for,
)


def test_snapshots_keep_chunks_and_deleted_maps_release_them(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    a, b, c = (env.put(vol, content(t)) for t in "abc")
    env.commit(vol, {0: a, 1: b})
    snap = env.blocks.snapshot_volume(ACCOUNT, vol).id
    env.commit(vol, {0: c, 1: None})  # a and b now only in the snapshot
    # Not chunk objects: left alone whatever their age.
    env.store.put("chunks/readme", b"x")
    env.store.put(f"chunks/{scope}/zz/not-a-chunk-id", b"x")

    report = env.collect()
    assert (report.deleted, report.referenced, report.foreign, report.errors) == (0, 3, 2, 0)
    assert all(env.has(scope, x) for x in (a, b, c))

    env.blocks.delete_snapshot(ACCOUNT, snap)
    report = env.collect()
    assert (report.deleted, report.referenced) == (2, 1)
    assert report.bytes_deleted > 0
    assert not env.has(scope, a) and not env.has(scope, b) and env.has(scope, c)

    # A volume made from a snapshot shares its scope: its chunks outlive the original.
    snap2 = env.blocks.snapshot_volume(ACCOUNT, vol).id
    copy = env.volume(from_snapshot_id=snap2)
    assert env.scope(copy) == scope
    env.blocks.delete_volume(ACCOUNT, vol)
    env.blocks.delete_snapshot(ACCOUNT, snap2)
    assert env.collect().deleted == 0 and env.has(scope, c)
    assert env.blocks.get_chunk(ACCOUNT, copy, c) == content("c")

    env.blocks.delete_volume(ACCOUNT, copy)
    report = env.collect()
    assert report.deleted == 1 and not env.has(scope, c)
    assert env.store.exists("chunks/readme")
    assert env.dangling() == []


def test_each_key_scope_is_judged_by_its_own_maps(env: Env) -> None:
    """The same content under two volumes is two objects; one referenced only in the
    other scope goes."""
    one, two = env.volume(), env.volume()
    x = env.put(one, content("x"))
    assert env.put(two, content("x")) == x
    env.commit(one, {3: x})
    report = env.collect()
    assert (report.scopes, report.deleted, report.referenced) == (2, 1, 1)
    assert env.has(env.scope(one), x) and not env.has(env.scope(two), x)


def test_block_api_snapshot_chunks_are_references(env: Env) -> None:
    snap = env.blocks.start_snapshot(ACCOUNT, 8 * CHUNK, chunk_size=CHUNK).id
    data = content("block")
    env.blocks.put_block(ACCOUNT, snap, 2, data, sha256_hex(data))
    env.blocks.complete_snapshot(ACCOUNT, snap)
    assert env.collect().deleted == 0
    assert env.blocks.get_block(ACCOUNT, snap, 2) == (sha256_hex(data), data)
    env.blocks.delete_snapshot(ACCOUNT, snap)
    assert env.collect().deleted == 1


def test_uncommitted_chunks_survive_the_grace_period(env: Env) -> None:
    vol = env.volume()
    scope = env.scope(vol)
    kept = env.put(vol, content("kept"))
    env.commit(vol, {0: kept})
    pending = env.put(vol, content("pending"))

    report = env.collect(grace=3600)
    assert (report.deleted, report.young, report.referenced) == (0, 1, 1)
    dry = env.collect(grace=3600, dry_run=True, clock=lambda: time.time() + 7200)
    assert (dry.deleted, dry.young) == (1, 0) and env.has(scope, pending)
    assert "would delete 1 of 2 chunk objects" in dry.summary()

    # Two hours later the upload's commit still has not come: the chunk goes ...
    assert env.collect(grace=3600, clock=lambda: time.time() + 7200).deleted == 1
    assert not env.has(scope, pending) and env.has(scope, kept)
    # ... and the late commit is refused, naming it, until it is uploaded again.
    with pytest.raises(MissingChunksError) as refused:
        env.commit(vol, {1: pending, 2: kept})
    assert refused.value.chunk_ids == [pending]
    assert env.maps.read_map(vol) == {0: kept}
    env.put(vol, content("pending"))
    env.commit(vol, {1: pending, 2: kept})
    assert env.collect().deleted == 0
    assert env.dangling() == []


def test_a_commit_asks_the_store_only_after_a_collection_deleted_in_the_scope(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks this provider put are trusted at the commit (no HEAD per chunk on S3) until
    a collection deletes anything of the scope; from then on the store is asked."""
    vol = env.volume()
    asked: list[str] = []
    exists = env.store.exists
    monkeypatch.setattr(env.store, "exists", lambda key: asked.append(key) or exists(key))
    a, b = env.put(vol, content("a")), env.put(vol, content("b"))
    env.commit(vol, {0: a})
    assert asked == []
    env.put(vol, content("garbage"))
    assert env.collect(grace=0).deleted == 2  # b is not referenced either: gone too
    with pytest.raises(MissingChunksError) as refused:
        env.commit(vol, {1: b})
    assert refused.value.chunk_ids == [b]
    # Under its keyed name, then under the name a store from before keyed names used.
    scope = env.scope(vol)
    assert asked == [chunk_key(env.blocks.keys, scope, b), legacy_chunk_key(scope, b)]
    assert env.dangling() == []


def test_putting_an_old_chunk_again_renews_its_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that reuses old, unreferenced content must not find it collected before
    its commit: the provider rewrites an old object instead of just saying "have it"."""
    vol = env.volume()
    key = chunk_key(env.blocks.keys, env.scope(vol), env.put(vol, content("old")))
    first = env.store.get(key)

    class Later:  # the provider's clock two hours on: the object is old now
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return time.time() + 7200

    monkeypatch.setattr(service, "time", Later)
    assert env.blocks.put_chunk(ACCOUNT, vol, sha256_hex(content("old")), content("old")) is False
    monkeypatch.undo()
    assert env.store.get(key) != first  # rewritten (a fresh nonce), so its time is new
    # Old by the first write, young by the second: a collector with a one-hour grace
    # period an hour and a half after the first write keeps it.
    report = env.collect(grace=3600, clock=lambda: time.time() + 1800)
    assert (report.deleted, report.young) == (0, 1)
    # An object still young is not rewritten.
    again = env.store.get(key)
    assert env.blocks.put_chunk(ACCOUNT, vol, sha256_hex(content("old")), content("old")) is False
    assert env.store.get(key) == again


@pytest.mark.timeout(60)
def test_uploads_racing_with_zero_grace_collection_never_lose_a_referenced_chunk(
    env: Env,
) -> None:
    """Writers upload chunk by chunk and commit, take and delete snapshots, while a
    collector with no grace period at all runs again and again (``race_with_collector``).
    After every pass every chunk any map names is in the store, and at the end every map
    reads back right."""
    rng = random.Random(7)
    pool = [content(("pool", i)) for i in range(12)]  # few contents: lots of reuse

    def upload(vol: str, datas: list[bytes], _: random.Random) -> None:
        for data in datas:
            env.put(vol, data)

    race = race_with_collector(
        env,
        pool,
        upload,
        seeds=[rng.randrange(1 << 30) for _ in range(2)],
        duration=4.0,
        max_changes=4,
    )
    final = env.collect(grace=0)
    assert final.errors == 0 and env.dangling() == []
    for vol, model in race.models.items():
        assert env.maps.read_map(vol) == {i: sha256_hex(pool[n]) for i, n in model.items()}
        for i, n in model.items():
            assert env.blocks.get_chunk(ACCOUNT, vol, sha256_hex(pool[n])) == pool[n], i
    for snap, model in race.frozen.items():
        assert env.maps.read_map(None, snapshot_id=snap) == {
            i: sha256_hex(pool[n]) for i, n in model.items()
        }
        for i, n in model.items():
            assert env.blocks.get_block(ACCOUNT, snap, i)[1] == pool[n]
    passes = race.passes
    deleted = sum(p.deleted for p in passes)
    print(
        f"{len(passes)} gc passes deleted {deleted} objects; {race.refused} commits refused "
        f"and re-uploaded; {sum(p.rescued for p in passes)} candidates rescued at re-check"
    )
    assert len(passes) >= 3 and deleted > 0


def test_gc_command(tmp_path: Path, provider: ProviderProcess) -> None:
    """``sgw provider gc`` beside a running provider: one summary line, exit 0."""
    with httpx.Client(base_url=provider.url, timeout=30) as http:
        vol = http.post(
            "/v1/volumes",
            json={"name": "v", "size": 8 * CHUNK, "mode": "cached", "chunk_size": CHUNK},
        ).json()["id"]
        ids = []
        for tag in ("committed", "orphan"):
            data = content(tag)
            ids.append(sha256_hex(data))
            r = http.put(
                f"/v1/volumes/{vol}/chunks/{sha256_hex(data)}",
                content=data,
                headers={"x-sgw-sha256": sha256_hex(data)},
            )
            assert r.status_code == 201, r.text
        r = http.post(
            f"/v1/volumes/{vol}/commits",
            json={"base_version": 0, "idempotency_key": "k", "changes": {"0": ids[0]}},
        )
        assert r.status_code == 200, r.text

        def run(*extra: str) -> subprocess.CompletedProcess[str]:
            args = [SGW, "provider", "gc", "--data-dir", str(provider.data_dir), *extra]
            return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)

        young = run()  # the default grace period keeps the fresh orphan
        assert young.returncode == 0, young.stderr
        assert young.stdout.count("\n") == 1 and "deleted 0 of 2" in young.stdout
        dry = run("--grace", "0", "--dry-run")
        assert dry.returncode == 0 and "would delete 1 of 2" in dry.stdout, dry.stdout
        real = run("--grace", "0")
        assert real.returncode == 0 and "deleted 1 of 2" in real.stdout, real.stdout
        assert http.get(f"/v1/volumes/{vol}/chunks/{ids[0]}").status_code == 200
        assert http.get(f"/v1/volumes/{vol}/chunks/{ids[1]}").status_code == 404
    bad = run("--grace", "-1")
    assert bad.returncode == 2 and bad.stderr.startswith("sgw: error: --grace")
    missing = subprocess.run(
        [SGW, "provider", "gc", "--data-dir", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.timeout(60, method="thread")
def test_gateway_uploads_converge_while_gc_runs_with_zero_grace(
    tmp_path: Path,
    provider: ProviderProcess,
    gateway_factory: type[GatewayProcess],
) -> None:
    """A real gateway uploads while passes with no grace period run beside the provider
    (on its database and store). A chunk collected between upload and commit makes the
    commit fail with 400 missing_chunks; the destager retries the batch, which uploads it
    again. Every pass leaves no dangling reference, and the remote copy converges."""
    engine = make_engine(f"sqlite:///{provider.data_dir / 'provider.db'}")
    store = DirectoryStore(provider.data_dir / "objects")
    checker = Env(
        BlockService(
            ChunkMaps(session_factory(engine)),
            store,
            open_keyring(str(provider.data_dir), may_create=False),  # its object names
        ),
        store,
        session_factory(engine),
    )
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], extra_args=gateway_args(tmp_path, provider.url)
    ).start()
    stop = threading.Event()
    problems: list[str] = []
    reports: list[gc.GcReport] = []

    def collector() -> None:
        try:
            while not stop.wait(0.2):
                reports.append(checker.collect(grace=0))
                dangling = checker.dangling()
                if dangling:
                    problems.append(f"pass {len(reports)}: {dangling[:3]}")
        except Exception as e:
            problems.append(repr(e))

    thread = threading.Thread(target=collector)
    thread.start()
    model = bytearray(VOL_SIZE)
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    try:
        write_for(h, random.Random(21), model, 8)
    finally:
        h.shutdown()
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and problems == []
    wait_remote_equal(gw, provider.url, bytes(model))
    assert read_all(gw) == model
    assert checker.collect(grace=0).errors == 0 and checker.dangling() == []
    wait_remote_equal(gw, provider.url, bytes(model))  # still whole after a last pass
    refused = full_log(gw).count("missing_chunks") + full_log(gw).count("does not hold")
    print(
        f"{len(reports)} passes deleted {sum(r.deleted for r in reports)} objects; "
        f"{refused} refused-commit log lines at the gateway"
    )
    checker.blocks.close()
    engine.dispose()
    assert gw.stop() == 0
