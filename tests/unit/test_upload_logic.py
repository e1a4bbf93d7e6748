"""Upload logic without a network: token bucket, retry classification, the client against
an in-memory provider (httpx.MockTransport), and the upload step's crash recovery."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard

from sgw.common.errors import (
    ConfigError,
    RemoteConflictError,
    RemoteNotFoundError,
    RemoteRejectedError,
    RemoteUnavailableError,
)
from sgw.gateway.config import RemoteConfig, load
from sgw.gateway.daemon import _mark_unsynced
from sgw.gateway.volume.destager import Destager, merge
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.remote import BlockApiClient, RetryPolicy, is_retryable, prepare_chunk
from sgw.gateway.volume.upload import TokenBucket, Uploader, VolumeResult, idempotency_key
from tests.fixtures.clock import FakeClock, no_sleep
from tests.fixtures.provider_sim import ProviderSim

MIB = 1 << 20


# -- token bucket ------------------------------------------------------------------------


def test_token_bucket_holds_the_long_run_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)

    async def run() -> None:
        for _ in range(10):
            await bucket.acquire(500)

    asyncio.run(run())
    # 5000 bytes at 1000/s with a 1000-byte burst: 4 s of waiting.
    assert clock.now == pytest.approx(4.0)


def test_token_bucket_lets_a_request_larger_than_the_burst_through_in_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    assert bucket.delay_for(1000) == pytest.approx(9.0)
    clock.now += 9.0
    assert bucket.delay_for(100) == pytest.approx(1.0)


def test_token_bucket_refills_while_idle_but_not_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    clock.now = 1000.0
    assert bucket.delay_for(100) == 0.0
    assert bucket.delay_for(100) == pytest.approx(1.0)


def test_unlimited_bucket_never_waits() -> None:
    assert TokenBucket(None).delay_for(1 << 40) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)


# -- retry classification ------------------------------------------------------------------


def client_for(handler: object, attempts: int = 4) -> BlockApiClient:
    return BlockApiClient(
        "http://provider.test",
        retry=RetryPolicy(attempts=attempts, sleep=no_sleep),
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
    )


def test_classification() -> None:
    assert is_retryable(RemoteUnavailableError("x", status=503))
    assert not is_retryable(RemoteRejectedError("x", status=400))
    assert not is_retryable(RemoteConflictError("x", status=409))
    assert not is_retryable(ValueError())


@pytest.mark.parametrize("failure", ["503", "429", "connect", "timeout", "broken"])
def test_5xx_timeouts_and_broken_connections_are_retried(failure: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            if failure == "503":
                return httpx.Response(503, json={"error": "busy", "message": "try later"})
            if failure == "429":  # the account's rate quota: it refills
                return httpx.Response(429, json={"error": "rate_limited", "message": "wait"})
            if failure == "connect":
                raise httpx.ConnectError("refused", request=request)
            if failure == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            raise httpx.RemoteProtocolError("closed", request=request)
        return httpx.Response(200, json={"version": 7})

    async def run() -> int:
        client = client_for(handler)
        try:
            return await client.commit("v1", 6, {0: None}, "key-1")
        finally:
            await client.aclose()

    assert asyncio.run(run()) == 7
    assert len(calls) == 3
    # A retried commit is the same request: same idempotency key, same changes.
    bodies = [json.loads(c.content) for c in calls]
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["idempotency_key"] == "key-1"


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, RemoteRejectedError),
        (401, RemoteRejectedError),
        (404, RemoteNotFoundError),
        (409, RemoteConflictError),
        (422, RemoteRejectedError),
    ],
)
def test_4xx_is_never_retried(status: int, exc: type[Exception]) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"error": "nope", "message": "volume v1: bad"})

    async def run() -> None:
        client = client_for(handler)
        try:
            await client.commit("v1", 6, {0: None}, "key-1")
        finally:
            await client.aclose()

    with pytest.raises(exc) as info:
        asyncio.run(run())
    assert len(calls) == 1
    assert getattr(info.value, "status", None) == status
    assert "volume v1: bad" in str(info.value)


def test_retries_give_up_after_the_attempts_with_an_unavailable_error() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    async def run() -> None:
        client = client_for(handler, attempts=3)
        try:
            await client.get_map("v1")
        finally:
            await client.aclose()

    with pytest.raises(RemoteUnavailableError, match="cannot reach the provider"):
        asyncio.run(run())
    assert calls == 3


def test_chunks_go_compressed_only_when_that_helps() -> None:
    zeros = prepare_chunk(bytes(MIB))
    assert zeros.encoding == "zstd" and len(zeros.body) < 1000
    assert zstandard.ZstdDecompressor().decompress(zeros.body) == bytes(MIB)
    noise = prepare_chunk(random.Random(1).randbytes(64 * 1024))
    assert noise.encoding is None
    assert noise.id == hashlib.sha256(noise.body).hexdigest()


# -- commit contents ------------------------------------------------------------------------


def test_diff_sends_only_what_differs_from_the_map() -> None:
    r = VolumeResult(data={1: "a", 2: "b"})
    for i in (5, 6, 7, 100):
        r.add_zero(i)
    assert r.zero_runs == [[5, 8], [100, 101]]
    assert r.diff({1: "a", 2: "x", 6: "y", 50: "z"}) == {2: "b", 6: None}
    # A huge zero run against a small map costs the map, not the run.
    big = VolumeResult(zero_runs=[[0, 1 << 30]])
    assert big.diff({3: "a", 1 << 29: "b"}) == {3: None, 1 << 29: None}


def test_idempotency_key_is_deterministic_and_short() -> None:
    a = idempotency_key("vol", 10, 20, 3, {1: "a", 2: None})
    assert a == idempotency_key("vol", 10, 20, 3, {2: None, 1: "a"})
    assert a != idempotency_key("vol", 10, 20, 3, {1: "b", 2: None})
    assert a != idempotency_key("vol", 10, 21, 3, {1: "a", 2: None})
    assert len(a) <= 255


# -- the upload step against an in-memory provider ---------------------------------------------


VOL = 4 * MIB + 64 * 1024  # the last chunk is short


def open_engine(d: Path) -> VolumeEngine:
    return VolumeEngine.open(
        str(d), str(d / "log"), 129 << 20, [VolumeSpec("v", VOL, str(d / "v.img"))]
    )


def uploader_for(engine: VolumeEngine, provider: ProviderSim) -> Uploader:
    client = BlockApiClient(
        "http://provider.test",
        retry=RetryPolicy(attempts=3, sleep=no_sleep),
        transport=httpx.MockTransport(provider),
    )
    return Uploader(engine, client, concurrency=3)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_upload_makes_the_remote_map_equal_the_volume(workdir: Path) -> None:
    provider = ProviderSim()

    async def run() -> tuple[bytes, str]:
        engine = open_engine(workdir)
        try:
            vol = engine.volumes["v"]
            vol.base.write(3 * MIB, b"\x05" * 8192)  # data on disk before the volume was bound
            up = uploader_for(engine, provider)
            destager = Destager(engine, batch_bytes=MIB, upload=up)
            vol.write(0, b"\x01" * (MIB + 4096))
            vol.write(2 * MIB, b"\x02" * 4096)
            vol.trim(0, MIB)  # chunk 0 becomes zero again
            vol.write(4 * MIB, b"\x04" * 65536)  # the short last chunk
            await destager.drain()
            vol.write(2 * MIB, b"\x03" * 4096)
            vol.zero_blocks(MIB, 3 * MIB, punch=True)
            await destager.drain()
            want = bytes(vol.read(0, VOL))
            await up.close()
            rid = engine.registry["v"].remote_id
            assert rid is not None
            assert engine.registry["v"].remote_version == provider.volumes[rid]["map_version"]
            return want, rid
        finally:
            engine.close()

    want, rid = asyncio.run(run())
    assert provider.volume_bytes(rid, VOL) == want
    assert all(c != hashlib.sha256(bytes(MIB)).hexdigest() for c in provider.chunks)
    # The registry survives a restart with its remote fields.
    engine = open_engine(workdir)
    try:
        entry = engine.registry["v"]
        assert (entry.remote_id, entry.remote_pending, entry.remote_synced) == (rid, None, True)
    finally:
        engine.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipelined_batches_upload_exactly_the_volume_through_failures(
    workdir: Path, seed: int
) -> None:
    """Small batches, each chunk written piecewise over several of them, writes landing
    while a batch is in flight, commits failing now and then: the provider's copy equals
    the volume, and batches did overlap (the next one sent while one was committed)."""
    provider = ProviderSim()
    rng = random.Random(seed)

    async def run() -> tuple[bytes, str, Destager]:
        engine = open_engine(workdir)
        try:
            vol = engine.volumes["v"]
            up = uploader_for(engine, provider)
            destager = Destager(engine, batch_bytes=96 * 1024, idle_seconds=0.0, upload=up)
            await destager.drain()  # binds the volume (an empty first sync)
            failures = 0
            for _round in range(12):
                for _ in range(rng.randrange(5, 30)):
                    offset = rng.randrange(0, VOL // 4096) * 4096
                    length = min(rng.randrange(1, 17) * 4096, VOL - offset)
                    if rng.random() < 0.1:
                        vol.trim(offset, length)
                    else:
                        vol.write(offset, rng.randbytes(length))
                for _ in range(rng.randrange(1, 6)):
                    if rng.random() < 0.15:
                        provider.fail_commits = 3  # past the client's retries
                    try:
                        await destager.destage_once()
                    except RemoteUnavailableError:
                        failures += 1
                        provider.fail_commits = 0
            provider.fail_commits = 0
            while engine.log.used:
                await destager.destage_once()
            want = bytes(vol.read(0, VOL))
            await up.close()
            rid = engine.registry["v"].remote_id
            assert rid is not None
            assert engine.registry["v"].remote_version == provider.volumes[rid]["map_version"]
            assert failures > 0
            return want, rid, destager
        finally:
            engine.close()

    want, rid, destager = asyncio.run(run())
    assert provider.volume_bytes(rid, VOL) == want
    assert destager.batches_overlapped > 0


def test_lost_commit_reply_is_recognised_by_its_idempotency_key(workdir: Path) -> None:
    provider = ProviderSim()
    provider.lose_next_commit_reply = True

    async def run() -> None:
        engine = open_engine(workdir)
        try:
            up = uploader_for(engine, provider)
            destager = Destager(engine, upload=up)
            engine.volumes["v"].write(0, b"\x09" * 4096)
            await destager.drain()
            await up.close()
            assert engine.registry["v"].remote_version == 1
        finally:
            engine.close()

    asyncio.run(run())
    assert list(provider.keys.values()) == [1]  # applied once


def test_restart_after_an_unrecorded_commit_rebases_on_it(workdir: Path) -> None:
    """Crash after the commit, before the registry and the tail were updated: the next
    batch (same tail, possibly more records) is committed on top, nothing is lost."""
    provider = ProviderSim()

    async def run() -> tuple[bytes, str]:
        engine = open_engine(workdir)
        try:
            vol = engine.volumes["v"]
            up = uploader_for(engine, provider)
            destager = Destager(engine, upload=up)
            vol.write(0, b"\x01" * 4096)
            vol.write(MIB, b"\x02" * 4096)
            await destager.drain()  # binds, commits version 1
            entry = engine.registry["v"]
            log = engine.log
            vol.write(0, b"\x03" * 4096)
            first = log.tail_seq
            # Upload this batch, but "crash" before the registry update and the apply.
            records = log.read_records(log.tail, log.tail_seq, log.head, 1 << 30)
            await up(merge(engine, records, point_in_time=True))
            entry.remote_version, entry.remote_pending = 1, first
            up._bindings.clear()  # a new process knows only the registry
            # More writes arrive before the next destage, so the batch is longer now.
            vol.write(MIB, b"\x04" * 4096)
            vol.write(0, b"\x01" * 4096)  # chunk 0 back to what version 1 had
            await destager.drain()
            await up.close()
            assert entry.remote_pending is None
            return bytes(vol.read(0, VOL)), str(entry.remote_id)
        finally:
            engine.close()

    want, rid = asyncio.run(run())
    assert provider.volume_bytes(rid, VOL) == want


def test_a_foreign_writer_fails_the_upload_loudly(workdir: Path) -> None:
    provider = ProviderSim()

    async def run() -> None:
        engine = open_engine(workdir)
        try:
            vol = engine.volumes["v"]
            up = uploader_for(engine, provider)
            destager = Destager(engine, upload=up)
            vol.write(0, b"\x01" * 4096)
            await destager.drain()
            rid = str(engine.registry["v"].remote_id)
            provider.volumes[rid]["map_version"] = 5  # someone else committed
            vol.write(0, b"\x02" * 4096)
            used = engine.log.used
            with pytest.raises(RemoteConflictError, match="something else writes to it"):
                await destager.destage_once()
            assert engine.log.used == used  # nothing freed
            await up.close()
        finally:
            engine.close()

    asyncio.run(run())


# -- the destager's retries ------------------------------------------------------------------


def test_failed_uploads_back_off_and_stop_does_not_wait_for_them(workdir: Path) -> None:
    calls: list[float] = []

    async def failing(_: object) -> None:
        calls.append(time.monotonic())
        raise RemoteUnavailableError("provider down")

    async def run() -> None:
        engine = open_engine(workdir)
        try:
            destager = Destager(engine, idle_seconds=0.0, upload=failing)
            engine.volumes["v"].write(0, b"\x01" * 4096)
            used = engine.log.used
            destager.start()
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            await destager.stop()
            assert time.monotonic() - t0 < 0.5  # the backoff wait is interrupted
            assert engine.log.used == used  # nothing freed
            assert 2 <= len(calls) <= 3  # 1 s, then 2 s (with jitter): no hot loop
            assert destager.failures == len(calls)
        finally:
            engine.close()

    asyncio.run(run())


def test_retries_stay_quick_while_writers_wait_for_log_space(workdir: Path) -> None:
    """A full log with writers waiting: the provider's return must be noticed within
    seconds, however long the outage lasted (no 30 s backoff)."""
    calls: list[float] = []

    async def failing(_: object) -> None:
        calls.append(time.monotonic())
        raise RemoteUnavailableError("provider down")

    async def run() -> None:
        engine = open_engine(workdir)
        try:
            destager = Destager(engine, idle_seconds=0.0, upload=failing)
            destager.failures = 10  # a long outage so far: the normal backoff is at its cap
            engine.volumes["v"].write(0, b"\x01" * 4096)
            waiter = engine.log.wait_for_space(engine.log.data_size)  # never fits: waits
            assert engine.log.space_waiters == 1
            destager.start()
            await asyncio.sleep(3.5)
            await destager.stop()
            waiter.cancel()
            assert len(calls) >= 2, calls  # retried within 2 s, not after 15-30 s
        finally:
            engine.close()

    asyncio.run(run())


def test_stop_abandons_an_upload_in_progress(workdir: Path) -> None:
    started = asyncio.Event()

    async def hanging(_: object) -> None:
        started.set()
        await asyncio.Event().wait()

    async def run() -> None:
        engine = open_engine(workdir)
        try:
            destager = Destager(engine, idle_seconds=0.0, upload=hanging)
            engine.volumes["v"].write(0, b"\x01" * 4096)
            used = engine.log.used
            destager.start()
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.wait_for(destager.stop(), 1)
            assert engine.log.used == used
        finally:
            engine.close()

    asyncio.run(run())


# -- configuration ----------------------------------------------------------------------------


def test_remote_config_from_toml_and_flag(tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(
        '[remote]\nurl = "http://10.0.0.5:8480/"\nconcurrency = 4\nbandwidth = "100M"\n'
        "insecure_http = true\n"
        '[[volumes]]\nname = "a"\nsize = "1G"\n'
    )
    cfg = load(str(conf), data_dir=str(tmp_path))
    assert cfg.remote == RemoteConfig(
        "http://10.0.0.5:8480", concurrency=4, bandwidth=100 << 20, insecure_http=True
    )
    flagged = load(str(conf), data_dir=str(tmp_path), provider="https://p.example")
    assert flagged.remote is not None and flagged.remote.url == "https://p.example"
    assert flagged.remote.concurrency == 4
    plain = load(data_dir=str(tmp_path), volumes=["a:1G"])
    assert plain.remote is None
    quick = load(data_dir=str(tmp_path), volumes=["a:1G"], provider="http://127.0.0.1:1")
    assert quick.remote == RemoteConfig("http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("toml", "provider", "match"),
    [
        ('[remote]\nurl = "ftp://x"\n', None, "remote.url: 'ftp://x' is not an http"),
        ("", "localhost:8480", "--provider: 'localhost:8480' is not an http"),
        ('[remote]\nurl = "http://h:99999"\n', None, "is not an http"),
        ("[remote]\nconcurrency = 2\n", None, r"\[remote\] needs a url"),
        ('[remote]\nurl = "http://h"\nconcurrency = 0\n', None, "remote.concurrency"),
        ('[remote]\nurl = "http://h"\nbandwidth = "fast"\n', None, "remote.bandwidth"),
        ('[remote]\nurl = "http://h"\nspeed = 1\n', None, r"\[remote\] has unknown key"),
    ],
)
def test_bad_remote_config_is_one_line(
    tmp_path: Path, toml: str, provider: str | None, match: str
) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(toml)
    with pytest.raises(ConfigError, match=match) as info:
        load(str(conf), data_dir=str(tmp_path), volumes=["a:1G"], provider=provider)
    assert "\n" not in str(info.value)


def test_destaging_without_remote_then_with_it_again_uploads_what_differs(
    workdir: Path,
) -> None:
    provider = ProviderSim()

    async def run() -> tuple[bytes, str]:
        engine = open_engine(workdir)
        try:
            vol = engine.volumes["v"]
            up = uploader_for(engine, provider)
            vol.write(0, b"\x01" * MIB)
            vol.write(2 * MIB, b"\x02" * 4096)
            await Destager(engine, upload=up).drain()
            # A run without [remote]: local destage only.
            _mark_unsynced(engine)
            vol.trim(0, MIB)  # the remote still has chunk 0
            vol.write(3 * MIB, b"\x03" * 4096)  # the remote lacks chunk 3
            await Destager(engine).drain()
            # [remote] again (a new process: only the registry is known).
            up2 = uploader_for(engine, provider)
            vol.write(MIB, b"\x04" * 4096)
            await Destager(engine, upload=up2).drain()
            await up.close()
            await up2.close()
            assert engine.registry["v"].remote_synced
            return bytes(vol.read(0, VOL)), str(engine.registry["v"].remote_id)
        finally:
            engine.close()

    want, rid = asyncio.run(run())
    assert provider.volume_bytes(rid, VOL) == want
