"""When chunk objects become durable in a directory store: not at upload, but at the
commit that first names them, which also refuses chunks a power loss damaged before that;
and the zstd frame an upload sends is what gets stored, once it is verified."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sgw.common.chunk_packs import PackedChunk, encode_pack
from sgw.common.chunks import HEADER_SIZE, NONCE_SIZE, check_chunk
from sgw.common.errors import BadRequestError, ChecksumMismatchError, MissingChunksError
from sgw.provider.api.auth import ensure_account
from sgw.provider.blockstore.keys import KeyRing
from sgw.provider.blockstore.maps import ChunkMaps, VolumeMode
from sgw.provider.blockstore.objects import DirectoryStore
from sgw.provider.blockstore.service import BlockService, chunk_key
from sgw.provider.db.schema import make_engine, session_factory, upgrade
from tests.fixtures.chunk_data import sha256_hex

KIB = 1 << 10
CHUNK = 64 * KIB
ACCOUNT = "acct"


def content(tag: object) -> bytes:
    """Distinct, non-zero, compressible chunk data for ``tag``."""
    seed = hashlib.sha256(repr(tag).encode()).hexdigest().encode()
    return (seed * (CHUNK // len(seed) + 1))[:CHUNK]


@dataclass
class Env:
    blocks: BlockService
    store: DirectoryStore
    volume: str
    scope: str

    def path(self, chunk_id: str) -> Path:
        return Path(self.store.path(chunk_key(self.blocks.keys, self.scope, chunk_id)))

    def put(self, data: bytes) -> str:
        self.blocks.put_chunk(ACCOUNT, self.volume, sha256_hex(data), data)
        return sha256_hex(data)

    def commit(self, changes: dict[int, str | None]) -> int:
        base = self.blocks.get_volume(ACCOUNT, self.volume).map_version
        return self.blocks.commit(ACCOUNT, self.volume, base, uuid.uuid4().hex, changes)

    def stored(self) -> set[str]:
        return set(self.store.list("chunks/"))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'provider.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    ensure_account(sessions, ACCOUNT, ACCOUNT)
    store = DirectoryStore(tmp_path / "objects")
    blocks = BlockService(ChunkMaps(sessions), store, KeyRing(os.urandom(32)))
    volume = blocks.create_volume(
        ACCOUNT, "vol", 16 * CHUNK, mode=VolumeMode.STORED, chunk_size=CHUNK
    )
    yield Env(blocks, store, volume.id, volume.key_scope)
    blocks.close()
    engine.dispose()


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file and directory fsynced from now on (by any thread)."""
    synced: list[str] = []
    lock = threading.Lock()
    real = os.fsync

    def fsync(fd: int) -> None:
        with lock:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_uploads_sync_nothing_and_a_commit_syncs_exactly_its_chunks(
    env: Env, fsyncs: list[str]
) -> None:
    a, b, c = (env.put(content(tag)) for tag in "abc")
    assert fsyncs == []
    env.commit({0: a, 1: b, 2: None})
    files = {str(env.path(a)), str(env.path(b))}
    assert files <= set(fsyncs)
    assert str(env.path(c)) not in fsyncs
    directories = {p for p in fsyncs if p not in files}
    root = Path(env.store.root)
    expected = {str(env.path(a).parent), str(env.path(b).parent)}
    scope = root / "chunks" / env.scope
    expected |= {str(scope / "k"), str(scope), str(root / "chunks"), str(root)}
    assert directories == expected
    # Uploading a chunk that is there already syncs it (after checking it), and no other.
    fsyncs.clear()
    env.put(content("a"))
    assert [p for p in fsyncs if not os.path.isdir(p)] == [str(env.path(a))]


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_commit_refuses_a_chunk_a_power_loss_damaged(env: Env, damage: str) -> None:
    """What a crash may leave of a put that was never synced: the commit does not take
    it, and uploading the chunk again replaces it (durably)."""
    data = content("torn")
    chunk = env.put(data)
    path = env.path(chunk)
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size // 2)
    else:
        path.write_bytes(bytes(size))
    with pytest.raises(MissingChunksError) as refused:
        env.commit({3: chunk})
    assert refused.value.chunk_ids == [chunk]
    assert "does not hold intact" in str(refused.value)
    assert env.blocks.read_map(ACCOUNT, env.volume) == (0, {})
    assert env.blocks.put_chunk(ACCOUNT, env.volume, chunk, data) is True  # stored anew
    assert env.commit({3: chunk}) == 1
    assert env.blocks.get_chunk(ACCOUNT, env.volume, chunk) == data


def test_a_single_zstd_frame_is_stored_as_sent(env: Env) -> None:
    data = content("frame")
    frame = zstandard.ZstdCompressor(level=1).compress(data)
    assert env.blocks.put_chunk(ACCOUNT, env.volume, sha256_hex(data), frame, zstd=True) is True
    blob = (env.path(sha256_hex(data))).read_bytes()
    assert check_chunk(blob).compressed
    nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
    payload = AESGCM(env.blocks.keys.key(env.scope)).decrypt(
        nonce, blob[HEADER_SIZE + NONCE_SIZE :], blob[:12]
    )
    assert payload == frame
    assert env.blocks.get_chunk(ACCOUNT, env.volume, sha256_hex(data)) == data


def test_zstd_bodies_of_other_shapes_are_verified_and_stored_anew(env: Env) -> None:
    """Several frames are valid zstd: inflated whole, checked, compressed again."""
    data = content("two frames")
    zc = zstandard.ZstdCompressor(level=1)
    body = zc.compress(data[: CHUNK // 2]) + zc.compress(data[CHUNK // 2 :])
    assert env.blocks.put_chunk(ACCOUNT, env.volume, sha256_hex(data), body, zstd=True) is True
    blob = env.path(sha256_hex(data)).read_bytes()
    assert len(blob) != HEADER_SIZE + NONCE_SIZE + len(body) + 16  # not the body as sent
    assert env.blocks.get_chunk(ACCOUNT, env.volume, sha256_hex(data)) == data


def test_zstd_bodies_that_do_not_verify_store_nothing(env: Env) -> None:
    data = content("refused")
    zc = zstandard.ZstdCompressor(level=1)
    frame = zc.compress(data)
    lying = bytearray(frame)  # 64 KiB declared in a 2-byte field: size - 256
    end = zstandard.frame_header_size(frame)
    lying[end - 2 : end] = (CHUNK - 256 - 100).to_bytes(2, "little")
    assert zstandard.frame_content_size(bytes(lying)) == CHUNK - 100
    cases: list[tuple[bytes, str, type[Exception]]] = [
        (zc.compress(data[:-4]) + zc.compress(b"tail"), sha256_hex(data), ChecksumMismatchError),
        (bytes(lying), sha256_hex(data), BadRequestError),
        (frame, sha256_hex(content("other")), ChecksumMismatchError),
        (
            zc.compress(data[:100]) + zc.compress(data[100:]),
            sha256_hex(data[:100]),
            BadRequestError,
        ),
    ]
    for body, chunk, error in cases:
        with pytest.raises(error):
            env.blocks.put_chunk(ACCOUNT, env.volume, chunk, body, zstd=True)
    assert env.stored() == set()


def test_a_pack_is_durable_before_its_chunks_get_locations(
    env: Env, fsyncs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk pack's object (its file, and the directories made for it) is fsynced
    before the locations that let a commit use its chunks are written; the commit then
    syncs nothing."""
    synced_at_finish: list[list[str]] = []
    finish = env.blocks.maps.packs.finish

    def watched(pack_id: str, *args: object, **kwargs: object) -> bool:
        synced_at_finish.append(list(fsyncs))
        return finish(pack_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(env.blocks.maps.packs, "finish", watched)
    datas = [content(("packed", i)) for i in range(3)]
    body = encode_pack([PackedChunk(sha256_hex(d), d, False) for d in datas])
    assert len(env.blocks.put_chunk_pack(ACCOUNT, env.volume, body).stored) == 3
    [before] = synced_at_finish
    [key] = env.store.list("packs/")
    path = Path(env.store.path(key))
    root = Path(env.store.root)
    # The file is fsynced under its temporary name, then renamed; its directory (and those
    # made for it) after the rename.
    assert any(Path(p).parent == path.parent and p.endswith(".tmp") for p in before), before
    assert {str(path.parent), str(path.parent.parent), str(root)} <= set(before)
    fsyncs.clear()
    env.commit({i: sha256_hex(d) for i, d in enumerate(datas)})
    assert fsyncs == []
