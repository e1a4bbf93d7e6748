"""Chunk packs on the gateway side (docs/adr/0005-chunk-packs.md): the uploader sends up
to ``[remote] pack_chunks`` new chunks per request (``POST /v1/volumes/{id}/chunk-packs``),
a group left with one chunk to send as a single ``PUT``, and every chunk once per batch.

End to end: a real gateway writes through NBD and uploads to a real provider
(``sgw provider serve --insecure-dev``) through a small HTTP proxy that records every
request (kind, chunk ids carried, the provider's answer) and can cut, lose or refuse pack
requests; the provider's database (chunk_packs, chunk_locations) and object directory
show what was stored, and the provider's map read back over HTTP must equal the volume.

Logic without a network: the ``Uploader`` against an in-memory provider
(``httpx.MockTransport``): group sizes, zero chunks, duplicates, requests in flight and
the bandwidth limit with requests larger than its burst.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nbd
import pytest

from sgw.common.chunk_packs import decode_pack
from sgw.common.chunks import decode_chunk
from sgw.common.errors import RemoteRejectedError
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.remote import BlockApiClient, RetryPolicy
from sgw.gateway.volume.upload import DEFAULT_PACK_CHUNKS, TokenBucket, Uploader
from sgw.provider.blockstore.keys import derive_key, derive_name_key, object_name
from tests.fixtures.chunk_data import sha256_hex
from tests.fixtures.clock import no_sleep
from tests.fixtures.daemons import (
    SMALL_LOG,
    GatewayProcess,
    ProviderProcess,
    gateway_status,
    remote_id,
)
from tests.fixtures.faultproxy import _ClosedError, _read_body, _read_head
from tests.fixtures.gateway_uploads import VOL_SIZE, assert_clean_log, read_all, wait_remote_equal
from tests.fixtures.provider_sim import ProviderSim

MIB = 1 << 20
CHUNKS = VOL_SIZE // MIB + 1  # 17: 16 whole chunks and a short last one

# -- a recording proxy -----------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the proxy saw it."""

    kind: str  # "pack", "put", "commit" or "other"
    chunk_ids: list[str]  # the chunks a pack or a PUT carries
    body_bytes: int
    at: float  # time.monotonic() when its body had arrived
    fault: str = "none"
    status: int | None = None  # the provider's answer; None if it never gave one
    answer: bytes = b""


# Faults for pack requests: "cut-body" forwards the head and half the body, then closes
# both connections (the provider gets a truncated body, the gateway no answer);
# "drop-response" forwards it and loses the answer (the provider acted on it);
# "503" answers 503 without forwarding.
PACK_FAULTS = ("cut-body", "drop-response", "503")


class RecordingProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, recording each request;
    the next pack requests get the faults queued with ``fail_packs`` (in order)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._seen: list[Seen] = []
        self._faults: collections.deque[str] = collections.deque()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def fail_packs(self, *faults: str) -> None:
        assert all(f in PACK_FAULTS for f in faults), faults
        self._faults.extend(faults)

    @property
    def faults_left(self) -> int:
        return len(self._faults)

    def seen(self, *kinds: str) -> list[Seen]:
        return [s for s in list(self._seen) if not kinds or s.kind in kinds]

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                body = await _read_body(reader, head, response=False)
                seen = _classify(head, body)
                self._seen.append(seen)
                if seen.kind == "pack" and self._faults:
                    seen.fault = self._faults.popleft()
                if seen.fault == "503":
                    text = b'{"error": "injected", "message": "refused by the test proxy"}'
                    writer.write(
                        b"HTTP/1.1 503 Injected\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(text), text)
                    )
                    await writer.drain()
                    continue
                if up is None:
                    up = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                if seen.fault == "cut-body":
                    up[1].write(head + body[: len(body) // 2])
                    await up[1].drain()
                    await asyncio.sleep(0.05)  # the provider reads the part it got
                    return
                up[1].write(head + body)
                await up[1].drain()
                resp_head = await _read_head(up[0])
                resp_body = await _read_body(up[0], resp_head)
                seen.answer = resp_body
                seen.status = int(resp_head.split(b" ", 2)[1])
                if seen.fault == "drop-response":
                    return
                writer.write(resp_head + resp_body)
                await writer.drain()
        except (_ClosedError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._conns.discard(writer)
            for w in (writer, None if up is None else up[1]):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()


def _classify(head: bytes, body: bytes) -> Seen:
    method, target = head.split(b" ", 2)[:2]
    parts = target.decode().split("?", 1)[0].strip("/").split("/")
    now = time.monotonic()
    if method == b"POST" and parts[-1] == "chunk-packs":
        ids = [c.id for c in decode_pack(body)]
        return Seen("pack", ids, len(body), now)
    if method == b"PUT" and len(parts) == 5 and parts[3] == "chunks":
        return Seen("put", [parts[4]], len(body), now)
    if method == b"POST" and parts[-1] == "commits":
        return Seen("commit", [], len(body), now)
    return Seen("other", [], len(body), now)


@pytest.fixture
def proxy_for() -> Iterator[Callable[[int], RecordingProxy]]:
    started: list[RecordingProxy] = []

    def make(upstream_port: int) -> RecordingProxy:
        p = RecordingProxy(upstream_port).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


# -- helpers ---------------------------------------------------------------------------------


def gateway_args(
    tmp_path: Path,
    provider_url: str,
    *,
    pack_chunks: int | None = None,
    bandwidth: str | None = None,
    idle_seconds: float = 0.5,
) -> list[str]:
    """Batches end once writes pause for ``idle_seconds`` (a burst of writes is one batch,
    so the tests know how the chunks are grouped)."""
    text = f'[destage]\nstart_fill = 0.5\nidle_seconds = {idle_seconds}\nbatch = "32M"\n'
    text += "[remote]\nconcurrency = 4\n"
    if pack_chunks is not None:
        text += f"pack_chunks = {pack_chunks}\n"
    if bandwidth is not None:
        text += f'bandwidth = "{bandwidth}"\n'
    cfg = tmp_path / "gw.toml"
    cfg.write_text(text)
    return ["--config", str(cfg), "--provider", provider_url]


def start_pair(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
    **config: Any,
) -> tuple[ProviderProcess, RecordingProxy, GatewayProcess]:
    provider = provider_factory(tmp_path / "provider").start()
    proxy = proxy_for(provider.port)
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG,
        extra_args=gateway_args(tmp_path, proxy.url, **config),
    ).start()  # fmt: skip
    return provider, proxy, gw


def chunk_of(model: bytearray, index: int) -> bytes:
    return bytes(model[index * MIB : (index + 1) * MIB])


def write_chunks(gw: GatewayProcess, model: bytearray, writes: dict[int, bytes]) -> float:
    """Writes each chunk's new content (at its start) through NBD in one burst, mirrored in
    ``model``; flushed. Returns time.monotonic() after the flush."""
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    try:
        for index, data in writes.items():
            off = index * MIB
            assert len(data) <= min(MIB, VOL_SIZE - off)
            if data.count(0) == len(data):
                h.zero(len(data), off)
            else:
                h.pwrite(data, off)
            model[off : off + len(data)] = data
        h.flush()
        return time.monotonic()
    finally:
        h.shutdown()


def text_chunk(i: int, size: int = MIB) -> bytes:
    """Compressible, not zero: sent zstd-encoded."""
    return (
        f"chunk {i}: the quick brown fox jumps over the lazy dog\n" * (size // 40 + 1)
    ).encode()[:size]


@dataclass
class ProviderState:
    packs: dict[str, bool]  # pack id -> written
    locations: dict[str, str]  # chunk id -> pack id
    loose: list[str]  # chunk ids stored as loose objects
    pack_objects: list[str]  # pack ids with an object

    def chunks_per_pack(self) -> list[int]:
        return sorted(collections.Counter(self.locations.values()).values())


def provider_state(provider: ProviderProcess) -> ProviderState:
    """What the provider stored: its database rows and its object directory."""
    db = provider.data_dir / "provider.db"
    assert db.exists(), sorted(p.name for p in provider.data_dir.iterdir())
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        packs = {str(i): bool(w) for i, w in con.execute("SELECT id, written FROM chunk_packs")}
        locations = {
            str(c): str(p) for c, p in con.execute("SELECT chunk_id, pack_id FROM chunk_locations")
        }
    finally:
        con.close()
    objects = provider.data_dir / "objects"
    master = (provider.data_dir / "master.key").read_bytes()
    loose = []
    for path in (objects / "chunks").rglob("*"):
        if path.is_file() and len(path.name) == 64:
            # Named by a keyed hash: the chunk id is the SHA-256 of what it decrypts to.
            scope = path.relative_to(objects / "chunks").parts[0]
            data = decode_chunk(path.read_bytes(), derive_key(master, scope))
            loose.append(sha256_hex(data))
            assert path.name == object_name(derive_name_key(master, scope), loose[-1])
    packed = [p.name for p in (objects / "packs").rglob("*") if p.is_file() and len(p.name) == 32]
    return ProviderState(packs, locations, sorted(loose), sorted(packed))


def converge(gw: GatewayProcess, provider: ProviderProcess, model: bytearray) -> float:
    """Waits until the provider's copy equals ``model`` (read from the provider itself,
    not through the proxy); the gateway still serves it too."""
    took = wait_remote_equal(gw, provider.url, bytes(model))
    assert read_all(gw) == model
    return took


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.timeout(60, method="thread")
def test_new_chunks_go_four_per_request_and_are_stored_in_packs(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
) -> None:
    provider, proxy, gw = start_pair(tmp_path, provider_factory, gateway_factory, proxy_for)
    rng = random.Random(21)
    model = bytearray(VOL_SIZE)
    # Ten new non-zero chunks (random and compressible ones, a partly written one, the
    # short last one) and an all-zero one between them, in one batch.
    writes: dict[int, bytes] = {}
    for i in (0, 1, 2, 4, 5, 7, 8, 9):
        writes[i] = rng.randbytes(MIB) if i % 2 == 0 else text_chunk(i)
    writes[3] = rng.randbytes(64 * 1024)  # the rest of the chunk stays zero
    writes[6] = bytes(MIB)
    writes[16] = rng.randbytes(VOL_SIZE - 16 * MIB)
    write_chunks(gw, model, dict(sorted(writes.items())))
    converge(gw, provider, model)

    new = [i for i in range(CHUNKS) if any(chunk_of(model, i))]
    assert new == [0, 1, 2, 3, 4, 5, 7, 8, 9, 16]
    index_of = {sha256_hex(chunk_of(model, i)): i for i in new}
    packs = proxy.seen("pack")
    assert len(packs) == math.ceil(len(new) / DEFAULT_PACK_CHUNKS) == 3
    assert proxy.seen("put") == []  # no group was left with one chunk
    # Groups of up to four new chunks in index order; the zero chunk is never sent.
    groups = sorted(sorted(index_of[c] for c in p.chunk_ids) for p in packs)
    assert groups == [[0, 1, 2, 3], [4, 5, 7, 8], [9, 16]]
    assert all(p.status == 200 and p.fault == "none" for p in packs)
    assert all(len(json.loads(p.answer)["stored"]) == len(p.chunk_ids) for p in packs)
    assert len(proxy.seen("commit")) == 1
    state = provider_state(provider)
    assert state.chunks_per_pack() == [2, 4, 4]
    assert set(state.locations) == set(index_of)
    assert all(state.packs.values()) and set(state.packs) == set(state.locations.values())
    assert state.pack_objects == sorted(state.packs)
    assert state.loose == []

    # A second batch of five new versions: one pack of four, the fifth on its own.
    second = {i: rng.randbytes(MIB) for i in (0, 1, 2, 4, 5)}
    write_chunks(gw, model, second)
    converge(gw, provider, model)
    packs2, puts = proxy.seen("pack")[3:], proxy.seen("put")
    assert [sorted(index_of.get(c, -1) for c in p.chunk_ids) for p in packs2] == [[-1] * 4]
    assert {c for p in packs2 for c in p.chunk_ids} == {sha256_hex(second[i]) for i in (0, 1, 2, 4)}
    assert [p.chunk_ids for p in puts] == [[sha256_hex(second[5])]]
    state = provider_state(provider)
    assert state.chunks_per_pack() == [2, 4, 4, 4]
    assert state.loose == [sha256_hex(second[5])]
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_pack_chunks_1_sends_every_chunk_on_its_own(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
) -> None:
    provider, proxy, gw = start_pair(
        tmp_path, provider_factory, gateway_factory, proxy_for, pack_chunks=1
    )
    rng = random.Random(22)
    model = bytearray(VOL_SIZE)
    writes = {i: rng.randbytes(MIB) if i % 3 else text_chunk(i) for i in range(10)}
    write_chunks(gw, model, writes)
    converge(gw, provider, model)
    assert proxy.seen("pack") == []
    puts = proxy.seen("put")
    assert sorted(c for p in puts for c in p.chunk_ids) == sorted(
        sha256_hex(d) for d in writes.values()
    )
    assert all(p.status == 201 for p in puts)
    state = provider_state(provider)
    assert state.packs == {} and state.locations == {} and state.pack_objects == []
    assert state.loose == sorted(sha256_hex(d) for d in writes.values())
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_duplicate_content_in_a_batch_is_sent_once(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
) -> None:
    provider, proxy, gw = start_pair(tmp_path, provider_factory, gateway_factory, proxy_for)
    rng = random.Random(23)
    a, b, c = rng.randbytes(MIB), text_chunk(1), rng.randbytes(MIB)
    model = bytearray(VOL_SIZE)
    # Same content within a group ([0-3] all a) and across groups ([4-7], [8-11]).
    layout = [a, a, a, a, a, b, b, c, a, b, c, c]
    write_chunks(gw, model, dict(enumerate(layout)))
    converge(gw, provider, model)
    sent = [x for s in proxy.seen("pack", "put") for x in s.chunk_ids]
    assert sorted(sent) == sorted({sha256_hex(a), sha256_hex(b), sha256_hex(c)})
    assert all(s.status in (200, 201) for s in proxy.seen("pack", "put"))
    with httpx.Client(base_url=provider.url, timeout=10) as http:
        doc = http.get(f"/v1/volumes/{remote_id(gw)}/map").raise_for_status().json()
    assert doc["chunks"] == {str(i): sha256_hex(d) for i, d in enumerate(layout)}
    state = provider_state(provider)
    assert sorted([*state.locations, *state.loose]) == sorted(
        {sha256_hex(a), sha256_hex(b), sha256_hex(c)}
    )
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_pack_requests_cut_lost_or_refused_are_retried_and_stored_once(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
) -> None:
    """Each batch is one pack of four chunks whose first try fails: cut in the middle of
    its body (the provider gets half of it and must store nothing), answered but the reply
    lost (the retry finds the chunks packed and stores nothing more), or refused with 503.
    The retry succeeds; every acknowledged write is at the provider, each pack once."""
    provider, proxy, gw = start_pair(tmp_path, provider_factory, gateway_factory, proxy_for)
    rng = random.Random(24)
    model = bytearray(VOL_SIZE)
    for n, fault in enumerate(PACK_FAULTS):
        proxy.fail_packs(fault)
        before = len(proxy.seen("pack"))
        writes = {
            4 * n + i: rng.randbytes(MIB) if i % 2 else text_chunk(4 * n + i) for i in range(4)
        }
        write_chunks(gw, model, writes)
        converge(gw, provider, model)
        assert proxy.faults_left == 0
        tries = proxy.seen("pack")[before:]
        want = sorted(sha256_hex(d) for d in writes.values())
        assert [t.fault for t in tries] == [fault, "none"], tries
        assert all(sorted(t.chunk_ids) == want for t in tries)
        first, retry = tries
        stored = json.loads(retry.answer)
        if fault == "cut-body":
            assert first.status is None  # the provider never answered a truncated body
            assert sorted(stored["stored"]) == want
        elif fault == "drop-response":
            assert first.status == 200 and sorted(json.loads(first.answer)["stored"]) == want
            assert stored["stored"] == []
            assert sorted(stored["present"]) == want
        else:
            assert first.status is None  # refused by the proxy, never forwarded
            assert sorted(stored["stored"]) == want
        state = provider_state(provider)
        assert len(state.packs) == n + 1, state  # no pack for the cut or repeated request
        assert all(state.packs.values())
        assert state.chunks_per_pack() == [4] * (n + 1)
        assert state.pack_objects == sorted(state.packs)
        assert state.loose == []
    gw.stop()
    gw.start()  # a restart finds everything uploaded: nothing more is sent
    assert read_all(gw) == model
    assert wait_remote_equal(gw, provider.url, bytes(model)) < 1.0
    assert len(proxy.seen("pack", "put")) == 2 * len(PACK_FAULTS)
    # The provider logs the truncated body (an error with its traceback, from uvicorn);
    # anything else going wrong there would show up here too.
    assert provider.stderr_path is not None
    errors = [
        json.loads(line)
        for line in provider.stderr_path.read_text().splitlines()
        if '"level": "error"' in line or '"level": "critical"' in line
    ]
    assert all("ClientDisconnect" in e.get("exc", "") for e in errors), errors
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_bandwidth_limit_holds_with_packs_larger_than_its_burst(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], RecordingProxy],
) -> None:
    """2 MiB/s (a 2 MiB burst) and 10 MiB of incompressible chunks in packs of 4 MiB: each
    pack larger than the whole bucket is held back by the limit (the daemon counts them)
    and still goes. How long each waits is test_bandwidth_limit_counts_whole_packs_larger_
    than_the_burst's, on a recorded clock rather than a measured one."""
    provider, proxy, gw = start_pair(
        tmp_path, provider_factory, gateway_factory, proxy_for, bandwidth="2M", idle_seconds=0.2
    )
    rng = random.Random(25)
    model = bytearray(VOL_SIZE)
    writes = {i: rng.randbytes(MIB) for i in range(10)}
    write_chunks(gw, model, writes)
    converge(gw, provider, model)
    packs = proxy.seen("pack")
    assert sorted(len(p.chunk_ids) for p in packs) == [2, 4, 4]
    assert max(p.body_bytes for p in packs) > 4 * MIB  # larger than the burst
    # The 4 MiB packs cannot fit the bucket (2 MiB at most): each waited. The 2 MiB one
    # fits a full bucket, so it waited unless it went first. Nothing else was sent.
    assert not proxy.seen("put")
    held = gateway_status(gw)["destager"]["uploads_held"]
    assert 2 <= held <= len(packs), held
    assert_clean_log(gw)
    assert gw.stop() == 0


# -- the Uploader against an in-memory provider --------------------------------------------------

UNIT_VOL = 16 * MIB


def run_upload(
    workdir: Path,
    provider: ProviderSim,
    writes: dict[int, bytes],
    *,
    configure: Callable[[Uploader], None] = lambda _: None,
    **uploader: Any,
) -> bytes:
    """Writes each chunk's content at its start, destages in one batch through an
    Uploader; returns the volume as the gateway holds it."""

    async def run() -> bytes:
        engine = VolumeEngine.open(
            str(workdir),
            str(workdir / "log"),
            129 << 20,
            [VolumeSpec("v", UNIT_VOL, str(workdir / "v.img"))],
        )
        try:
            client = BlockApiClient(
                "http://provider.test",
                retry=RetryPolicy(attempts=3, sleep=no_sleep),
                transport=httpx.MockTransport(provider),
            )
            up = Uploader(engine, client, **uploader)
            configure(up)
            vol = engine.volumes["v"]
            for index, data in writes.items():
                vol.write(index * MIB, data)
            try:
                await Destager(engine, upload=up).drain()
            finally:
                await up.close()
            return bytes(vol.read(0, UNIT_VOL))
        finally:
            engine.close()

    return asyncio.run(run())


def assert_remote_equal(provider: ProviderSim, want: bytes) -> None:
    [rid] = provider.volumes
    assert provider.volume_bytes(rid, UNIT_VOL) == want


def test_groups_of_pack_chunks_and_a_last_single_put(tmp_path: Path) -> None:
    """pack_chunks=3, seven new non-zero chunks around zero ones: packs of 3 and 3 in
    index order, the seventh as a single PUT; the zero chunks are never sent."""
    provider = ProviderSim()
    rng = random.Random(31)
    writes = {i: rng.randbytes(MIB) if i % 2 else text_chunk(i) for i in (0, 1, 3, 4, 5, 7, 9)}
    writes[2] = writes[6] = bytes(MIB)
    want = run_upload(tmp_path, provider, writes, pack_chunks=3, concurrency=2)
    assert_remote_equal(provider, want)
    index_of = {sha256_hex(d): i for i, d in writes.items()}
    got = sorted((kind, sorted(index_of[c] for c in ids)) for kind, ids, _ in provider.requests)
    assert got == [("pack", [0, 1, 3]), ("pack", [4, 5, 7]), ("put", [9])]
    assert sha256_hex(bytes(MIB)) not in provider.chunks


def test_pack_chunks_1_sends_each_chunk_in_its_own_put(tmp_path: Path) -> None:
    provider = ProviderSim()
    rng = random.Random(32)
    writes = {i: rng.randbytes(MIB) for i in range(6)}
    want = run_upload(tmp_path, provider, writes, pack_chunks=1)
    assert_remote_equal(provider, want)
    assert [kind for kind, _, _ in provider.requests] == ["put"] * 6
    assert sorted(provider.sent()) == sorted(sha256_hex(d) for d in writes.values())


def test_duplicates_in_a_batch_are_sent_once(tmp_path: Path) -> None:
    provider = ProviderSim()
    rng = random.Random(33)
    a, b = rng.randbytes(MIB), text_chunk(0)
    layout = [a, a, a, a, a, b, b, a, b, a]
    want = run_upload(tmp_path, provider, dict(enumerate(layout)), concurrency=1)
    assert_remote_equal(provider, want)
    assert sorted(provider.sent()) == sorted([sha256_hex(a), sha256_hex(b)])
    # [a a a a] leaves one chunk to send: a single PUT; [a b b a] then only b.
    assert [(kind, ids) for kind, ids, _ in provider.requests] == [
        ("put", [sha256_hex(a)]),
        ("put", [sha256_hex(b)]),
    ]


def test_concurrency_bounds_the_requests_in_flight(tmp_path: Path) -> None:
    provider = ProviderSim(delay=0.05)
    rng = random.Random(34)
    writes = {i: rng.randbytes(MIB) for i in range(10)}
    want = run_upload(tmp_path, provider, writes, pack_chunks=2, concurrency=2)
    assert_remote_equal(provider, want)
    assert [len(ids) for _, ids, _ in provider.requests] == [2] * 5
    assert provider.max_in_flight == 2


def test_bandwidth_limit_counts_whole_packs_larger_than_the_burst(tmp_path: Path) -> None:
    """1 MiB/s (a 1 MiB burst), three packs of 4 MiB of incompressible chunks: they wait
    3, 7 and 11 s, the long-run rate exactly (no clock runs: the waits are recorded)."""
    provider = ProviderSim()
    rng = random.Random(35)
    writes = {i: rng.randbytes(MIB) for i in range(12)}
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    bucket = TokenBucket(MIB, clock=lambda: 100.0, sleep=record)

    def limit(up: Uploader) -> None:
        up.bucket = bucket

    want = run_upload(tmp_path, provider, writes, configure=limit, concurrency=3)
    assert_remote_equal(provider, want)
    assert [len(ids) for _, ids, _ in provider.requests] == [4, 4, 4]
    assert min(n for _, _, n in provider.requests) > 4 * MIB
    assert sorted(waits) == pytest.approx([3.0, 7.0, 11.0], abs=0.01)
    assert bucket.held == 3  # what `sgw gateway status` reports as uploads_held


def test_a_lost_pack_reply_is_retried(tmp_path: Path) -> None:
    provider = ProviderSim()
    provider.lose_next_pack_reply = True
    rng = random.Random(36)
    writes = {i: rng.randbytes(MIB) for i in range(4)}
    want = run_upload(tmp_path, provider, writes)
    assert_remote_equal(provider, want)
    assert [kind for kind, _, _ in provider.requests] == ["pack", "pack"]
    assert list(provider.keys.values()) == [1]  # one commit


def test_a_refused_pack_fails_the_batch_and_commits_nothing(tmp_path: Path) -> None:
    provider = ProviderSim()
    provider.refuse_packs = True
    rng = random.Random(37)
    writes = {i: rng.randbytes(MIB) for i in range(4)}
    with pytest.raises(RemoteRejectedError, match=r"pack of 4 chunks.*413.*pack refused"):
        run_upload(tmp_path, provider, writes)
    assert len(provider.requests) == 1  # a 4xx is not retried
    assert provider.keys == {}
    [rid] = provider.volumes
    assert provider.maps[rid] == {}


@pytest.mark.parametrize("pack_chunks", [0, 65])
def test_uploader_refuses_a_pack_size_out_of_range(pack_chunks: int) -> None:
    client = BlockApiClient("http://provider.test")
    with pytest.raises(ValueError, match="chunks per pack must be 1 to 64"):
        Uploader(None, client, pack_chunks=pack_chunks)  # type: ignore[arg-type]
    asyncio.run(client.aclose())
