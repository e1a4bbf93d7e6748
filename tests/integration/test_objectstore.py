"""The object store contract, run against every store: a directory, S3 (a real moto
server over HTTP) and memory; then what is particular to each, and open_store."""

from __future__ import annotations

import base64
import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crc32c
import pytest

from sgw.common.chunks import chunk_id, decode_chunk, encode_chunk
from sgw.common.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from sgw.provider.blockstore.objects import (
    DirectoryStore,
    MemoryStore,
    ObjectStore,
    S3Store,
    open_store,
)
from tests.fixtures.s3 import s3_store

STORES = ["directory", "s3", "s3-prefixed", "memory"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    kind = request.param
    if kind == "directory":
        return DirectoryStore(tmp_path / "objects")
    if kind == "memory":
        return MemoryStore()
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return s3_store(endpoint, bucket, prefix="tenant/1" if kind == "s3-prefixed" else "")


def put_many(store: ObjectStore, keys: list[str], data: Callable[[str], bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, data(k)), keys))


# The contract


def test_put_get_exists_delete(store: ObjectStore) -> None:
    key = "chunks/ab/" + "ab" * 32
    assert not store.exists(key)
    store.put(key, b"payload")
    assert store.exists(key)
    assert store.get(key) == b"payload"
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFoundError):
        store.get(key)


def test_empty_and_binary_objects(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.exists("empty")
    data = bytes(range(256)) * 4096
    store.put("binary", data)
    assert store.get("binary") == data


def test_overwrite_and_idempotent_put(store: ObjectStore) -> None:
    store.put("maps/vol1/head", b"version 1")
    store.put("maps/vol1/head", b"version 2, longer")
    assert store.get("maps/vol1/head") == b"version 2, longer"
    store.put("maps/vol1/head", b"v3")
    store.put("maps/vol1/head", b"v3")
    assert store.get("maps/vol1/head") == b"v3"
    assert list(store.list()) == ["maps/vol1/head"]


def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="nope/missing"):
        store.get("nope/missing")
    assert not store.exists("nope/missing")
    store.delete("nope/missing")  # idempotent
    store.put("nope/present", b"x")
    store.delete("nope/present")
    store.delete("nope/present")
    assert list(store.list("nope/")) == []


def test_list_is_sorted_and_filtered_by_prefix(store: ObjectStore) -> None:
    keys = [
        "chunks/ab/abc1",
        "chunks/ab/abd2",
        "chunks/ac/x",
        "chunks/b",
        "maps/vol1/00000001",
        "maps/vol10/00000001",
        "a-b",
        "a/b",
        "a0",
        "Z",
    ]
    put_many(store, keys, lambda k: k.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("chunks/ab/")) == ["chunks/ab/abc1", "chunks/ab/abd2"]
    assert list(store.list("chunks/ab/abc")) == ["chunks/ab/abc1"]
    assert list(store.list("chunks/a")) == ["chunks/ab/abc1", "chunks/ab/abd2", "chunks/ac/x"]
    assert list(store.list("chunks/")) == sorted(k for k in keys if k.startswith("chunks/"))
    assert list(store.list("maps/vol1")) == ["maps/vol1/00000001", "maps/vol10/00000001"]
    assert list(store.list("maps/vol1/")) == ["maps/vol1/00000001"]
    assert list(store.list("a")) == ["a-b", "a/b", "a0"]
    assert list(store.list("zzz")) == []
    assert list(store.list("chunks/zz/")) == []
    for key in keys:
        assert store.get(key) == key.encode()


def test_stat_and_list_with_times(store: ObjectStore) -> None:
    """Sizes and write times (what garbage collection's grace period is judged by)."""
    before = time.time()
    keys = ["chunks/s1/ab/ab1", "chunks/s1/cd/cd2", "chunks/s2/ab/ab3", "maps/x"]
    put_many(store, keys, lambda k: k.encode() * 3)
    after = time.time()
    assert store.stat("chunks/s1/ab/missing") is None
    info = store.stat("chunks/s1/ab/ab1")
    assert info is not None
    assert (info.key, info.size) == ("chunks/s1/ab/ab1", len(b"chunks/s1/ab/ab1") * 3)
    # S3's LastModified has whole seconds; allow for that and a little clock skew.
    assert before - 2 <= info.modified <= after + 2
    listed = list(store.list_with_times("chunks/"))
    assert [i.key for i in listed] == list(store.list("chunks/")) == sorted(keys[:3])
    for item in listed:
        assert item.size == len(item.key) * 3
        assert abs(item.modified - info.modified) <= 3
    assert [i.key for i in store.list_with_times("chunks/s1/")] == keys[:2]
    assert list(store.list_with_times("nothing/")) == []
    store.delete("maps/x")
    assert store.stat("maps/x") is None
    with pytest.raises(ObjectStoreError):
        store.stat("../escape")


@pytest.mark.parametrize("store", ["directory", "s3", "memory"], indirect=True)
def test_list_pages_past_a_thousand_keys(store: ObjectStore) -> None:
    """S3 returns at most 1000 keys per request; list must follow the continuation."""
    keys = [f"many/{i:05d}" for i in range(1100)]
    put_many(store, keys, lambda k: k[-1:].encode())
    store.put("other/key", b"x")
    assert list(store.list("many/")) == keys
    assert len(list(store.list())) == 1101


BAD_KEYS = [
    "",
    "/etc/passwd",
    "a//b",
    "a/",
    "../escape",
    "a/../../escape",
    "a/./b",
    ".hidden",
    "a/.tmp",
    "a\\b",
    "a\x00b",
    "line\nbreak",
    "x" * 1025,
    "a/" + "y" * 256,
]


def test_bad_keys_are_rejected(store: ObjectStore) -> None:
    """The same rules for every store, so that data can move between them."""
    for key in BAD_KEYS:
        calls: list[Callable[[str], object]] = [
            lambda k: store.put(k, b"x"),
            store.get,
            store.exists,
            store.delete,
        ]
        for call in calls:
            with pytest.raises(ObjectStoreError) as raised:
                call(key)
            assert not isinstance(raised.value, ObjectNotFoundError), key
    for prefix in ["/", "../", "a/../", "a//", ".x"]:
        with pytest.raises(ObjectStoreError):
            store.list(prefix)
    assert list(store.list()) == []


def test_concurrent_puts_of_one_key_leave_a_whole_object(store: ObjectStore) -> None:
    versions = [bytes([n]) * (256 * 1024) for n in range(8)]
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            with contextlib.suppress(ObjectNotFoundError):
                seen.append(store.get("chunks/hot"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: store.put("chunks/hot", versions[n % 8]), range(32)))
    finally:
        done.set()
        reader.join()
    assert store.get("chunks/hot") in versions
    assert all(data in versions for data in seen)
    assert list(store.list()) == ["chunks/hot"]


def test_encrypted_chunk_round_trip(store: ObjectStore) -> None:
    key = os.urandom(32)
    data = b"block data " * 50_000
    cid = chunk_id(data)
    store.put(f"chunks/{cid[:2]}/{cid}", encode_chunk(data, key))
    blob = store.get(f"chunks/{cid[:2]}/{cid}")
    assert decode_chunk(blob, key, expected_id=cid) == data


def test_sync_after_puts_that_are_not_durable(store: ObjectStore) -> None:
    keys = [f"chunks/{n:02x}/object-{n}" for n in range(5)]
    for key in keys:
        store.put(key, key.encode(), durable=False)
    assert store.sync(keys) == []
    assert store.sync(keys, check=lambda blob: blob.startswith(b"chunks/")) == []
    assert store.sync([]) == []
    assert all(store.get(key) == key.encode() for key in keys)
    with pytest.raises(ObjectStoreError):
        store.sync(["../escape"])


# DirectoryStore


def test_directory_layout_and_modes(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "objects")
    store.put("chunks/ab/abcdef", b"data")
    path = tmp_path / "objects" / "chunks" / "ab" / "abcdef"
    assert store.path("chunks/ab/abcdef") == str(path)
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert os.listdir(path.parent) == ["abcdef"]  # no temporary file left behind


def test_directory_key_that_is_a_directory(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.put("chunks/ab/abcdef", b"data")
    assert not store.exists("chunks/ab")
    with pytest.raises(ObjectNotFoundError):
        store.get("chunks/ab")
    with pytest.raises(ObjectNotFoundError):
        store.get("chunks/ab/abcdef/deeper")
    with pytest.raises(ObjectStoreError, match="chunks/ab"):
        store.put("chunks/ab", b"x")


def test_directory_interrupted_put_never_shows_a_partial_object(tmp_path: Path) -> None:
    """A put that died before its rename leaves only a temporary file nobody reads."""
    store = DirectoryStore(tmp_path)
    store.put("chunks/ab/old", b"complete old version")
    leftover = tmp_path / "chunks" / "ab" / ".new.0123456789abcdef.tmp"
    leftover.write_bytes(b"half of the n")
    (tmp_path / "chunks" / "ab" / ".old.fedcba9876543210.tmp").write_bytes(b"torn")
    assert not store.exists("chunks/ab/new")
    with pytest.raises(ObjectNotFoundError):
        store.get("chunks/ab/new")
    assert store.get("chunks/ab/old") == b"complete old version"
    assert list(store.list()) == ["chunks/ab/old"]
    store.put("chunks/ab/new", b"half of the new object")
    assert store.get("chunks/ab/new") == b"half of the new object"
    assert store.remove_temp_files(older_than=3600) == 0  # too young to be stale
    assert store.remove_temp_files(older_than=-1) == 2
    assert sorted(os.listdir(tmp_path / "chunks" / "ab")) == ["new", "old"]


def test_directory_put_failing_before_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectoryStore(tmp_path)
    store.put("maps/head", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ObjectStoreError, match="maps/head"):
        store.put("maps/head", b"new")
    monkeypatch.undo()
    assert store.get("maps/head") == b"old"
    assert os.listdir(tmp_path / "maps") == ["head"]  # the temporary file was removed


def test_directory_store_reopens_existing_data(tmp_path: Path) -> None:
    DirectoryStore(tmp_path / "o").put("a/b", b"kept")
    assert DirectoryStore(tmp_path / "o").get("a/b") == b"kept"


def test_directory_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ObjectStoreError, match="file"):
        DirectoryStore(tmp_path / "file")


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes ``os.fsync`` note the path of each descriptor it syncs (from any thread)."""
    synced: list[str] = []
    lock = threading.Lock()
    real = os.fsync

    def fsync(fd: int) -> None:
        with lock:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_directory_put_that_is_not_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It syncs nothing and never replaces an object that is there (durable or not)."""
    store = DirectoryStore(tmp_path)
    synced = record_fsyncs(monkeypatch)
    store.put("chunks/ab/new", b"first", durable=False)
    store.put("chunks/ab/new", b"second", durable=False)
    assert synced == []
    assert store.get("chunks/ab/new") == b"first"
    assert sorted(os.listdir(tmp_path / "chunks" / "ab")) == ["new"]  # no temporary file
    assert stat.S_IMODE((tmp_path / "chunks" / "ab" / "new").stat().st_mode) == 0o600
    with pytest.raises(ObjectStoreError, match="chunks/ab"):
        store.put("chunks/ab", b"a directory is there", durable=False)
    store.put("chunks/ab/new", b"third")  # a durable put replaces, and syncs
    assert store.get("chunks/ab/new") == b"third"
    assert str(tmp_path / "chunks" / "ab") in synced


def test_directory_sync_syncs_exactly_the_named_objects_and_their_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectoryStore(tmp_path / "objects")
    named = ["chunks/s1/ab/one", "chunks/s1/cd/two", "chunks/s2/ef/three"]
    for key in [*named, "chunks/s1/ab/other", "maps/unrelated"]:
        store.put(key, key.encode(), durable=False)
    synced = record_fsyncs(monkeypatch)
    assert store.sync(named) == []
    root = tmp_path / "objects"
    directories = {"chunks/s1/ab", "chunks/s1/cd", "chunks/s2/ef", "chunks/s1", "chunks/s2"}
    expected = [root / key for key in named] + [root / d for d in directories]
    expected += [root / "chunks", root]
    assert sorted(synced) == sorted(str(p) for p in expected)


def test_directory_sync_reports_missing_and_damaged_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged object (as a power loss may leave one) is neither synced nor accepted."""
    store = DirectoryStore(tmp_path)
    store.put("chunks/ab/whole", b"whole object", durable=False)
    store.put("chunks/ab/torn", b"whole object", durable=False)
    os.truncate(tmp_path / "chunks" / "ab" / "torn", 5)
    synced = record_fsyncs(monkeypatch)
    keys = ["chunks/ab/whole", "chunks/ab/torn", "chunks/ab/missing"]
    failed = store.sync(keys, check=lambda blob: blob == b"whole object")
    assert failed == ["chunks/ab/torn", "chunks/ab/missing"]
    assert str(tmp_path / "chunks" / "ab" / "whole") in synced
    assert str(tmp_path / "chunks" / "ab" / "torn") not in synced
    assert store.sync(["chunks/ab/torn"]) == []  # without a check it is only synced


def test_directory_sync_that_fails_removes_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the file's bytes on disk are unknown (and a retried fsync
    may claim success), so it is removed for the next upload to write it anew."""
    store = DirectoryStore(tmp_path)
    store.put("chunks/ab/bad", b"data", durable=False)
    store.put("chunks/ab/good", b"data", durable=False)
    real = os.fsync

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("bad"):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(ObjectStoreError, match="Input/output error"):
        store.sync(["chunks/ab/good", "chunks/ab/bad"])
    assert not store.exists("chunks/ab/bad")
    assert store.get("chunks/ab/good") == b"data"


# S3Store


def test_s3_errors_name_bucket_and_key(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint, "no-such-bucket-here")
    with pytest.raises(ObjectStoreError, match="'chunks/x' in S3 bucket 'no-such-bucket-here'"):
        store.get("chunks/x")
    with pytest.raises(ObjectStoreError, match="'chunks/x' in S3 bucket 'no-such-bucket-here'"):
        store.put("chunks/x", b"data")
    with pytest.raises(ObjectStoreError, match="no-such-bucket-here"):
        list(store.list())


def test_s3_prefix_isolates_tenants(s3_endpoint: str, s3_bucket: str) -> None:
    whole = s3_store(s3_endpoint, s3_bucket)
    one = s3_store(s3_endpoint, s3_bucket, prefix="/one/")
    two = s3_store(s3_endpoint, s3_bucket, prefix="two")
    one.put("k", b"1")
    two.put("k", b"2")
    assert list(whole.list()) == ["one/k", "two/k"]
    assert list(one.list()) == ["k"]
    assert one.get("k") == b"1"
    assert two.get("k") == b"2"
    two.delete("k")
    assert one.exists("k")
    assert not two.exists("k")


def test_s3_conditional_put_stores_only_what_is_new(s3_endpoint: str, s3_bucket: str) -> None:
    store = s3_store(s3_endpoint, s3_bucket, prefix="cond")
    assert store.put_new("chunks/a", b"first") is True
    assert store.put_new("chunks/a", b"second") is False  # one request, nothing replaced
    assert store.get("chunks/a") == b"first"
    assert store.conditional_puts
    # A store that refuses the condition: the caller is told to look and put itself.
    store.conditional_puts = False
    assert store.put_new("chunks/b", b"x") is None and not store.exists("chunks/b")


def test_s3_puts_carry_a_crc32c_of_the_body_and_leave_it_unsigned(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """Each put sends the body's CRC32C for the store to verify, and no SHA-256 of it."""
    store = s3_store(s3_endpoint, s3_bucket, prefix="crc")
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append({k.lower(): _text(v) for k, v in request.headers.items()})

    store._client.meta.events.register("before-send.s3.PutObject", record)
    body = bytearray(os.urandom(100_000))
    store.put("chunks/p", body)
    assert store.put_new("chunks/n", memoryview(body)) is True
    want = base64.b64encode(crc32c.crc32c(body).to_bytes(4, "big")).decode()
    assert [h["x-amz-checksum-crc32c"] for h in sent] == [want, want]
    assert all(h["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" for h in sent)
    assert "x-amz-checksum-crc32" not in sent[0]  # botocore's own default is not added
    assert store.get("chunks/p") == store.get("chunks/n") == bytes(body)


def test_s3_ensure_bucket_is_idempotent(s3_endpoint: str, s3_bucket: str) -> None:
    store = s3_store(s3_endpoint, s3_bucket)
    store.put("k", b"v")
    store.ensure_bucket()
    assert store.get("k") == b"v"


# open_store


def test_open_store_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"file://{tmp_path}/a%20b")
    assert isinstance(store, DirectoryStore)
    assert store.root == f"{tmp_path}/a b"
    store = open_store(str(tmp_path / "plain"))
    assert isinstance(store, DirectoryStore)
    assert store.root == str(tmp_path / "plain")
    monkeypatch.chdir(tmp_path)
    store = open_store("relative/dir")
    assert isinstance(store, DirectoryStore)
    assert store.root == str(tmp_path / "relative" / "dir")
    assert isinstance(open_store(f"file://localhost{tmp_path}"), DirectoryStore)


def test_open_store_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store("s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix/")
    assert (store.endpoint_url, store.region) == ("http://127.0.0.1:9000", "eu-west-1")
    bare = open_store("s3://bucket")
    assert isinstance(bare, S3Store)
    assert (bare.bucket, bare.prefix, bare.endpoint_url) == ("bucket", "", None)


def test_open_store_s3_talks_to_the_server(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials come from boto3's standard sources, here the environment."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = open_store(f"s3://{s3_bucket}/pre?endpoint={s3_endpoint}&region=us-east-1")
    store.put("k", b"v")
    assert s3_store(s3_endpoint, s3_bucket).get("pre/k") == b"v"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("file://otherhost/x", "must be local"),
        ("file:///x?sync=1", "no options"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket?endpoint=http://h&colour=blue", "unknown option 'colour'"),
        ("s3://bucket?endpoint=127.0.0.1:9000", "must be an http"),
        ("s3://bucket/../x", "bad prefix"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
