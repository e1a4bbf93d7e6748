"""Cached volumes end to end: a real provider (`sgw provider serve --insecure-dev`), a real
gateway with a cached volume, and libnbd as the client.

The primary copy lives at the provider: after an upload the gateway reads everything back
through a cache that starts empty (every chunk fetched) or is smaller than the volume
(evictions); sequential reads fetch ahead; with the provider gone, cached reads go on and
writes are acknowledged until the log is full, then stall (not fail) and resume.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import nbd
import pytest

from tests.fixtures.daemons import SGW, SMALL_LOG, GatewayProcess, ProviderProcess, remote_id

MIB = 1 << 20
VOL_SIZE = 24 * MIB + 64 * 1024  # the last chunk is short


def write_config(path: Path, cache: Path, cache_size: str, batch: str = "4M") -> None:
    path.write_text(
        f'[destage]\nstart_fill = 0.0\nidle_seconds = 0.05\nbatch = "{batch}"\n'
        f'[cache]\npath = "{cache}"\nsize = "{cache_size}"\nread_ahead = 4\n'
    )


def cached_gateway(
    tmp_path: Path,
    factory: type[GatewayProcess],
    provider: ProviderProcess,
    cache_size: str,
    batch: str = "4M",
) -> GatewayProcess:
    cfg = tmp_path / "gw.toml"
    write_config(cfg, tmp_path / "cache", cache_size, batch)
    return factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}:cached"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    )


def remote_map(provider: ProviderProcess, rid: str) -> dict[int, str]:
    r = httpx.get(f"{provider.url}/v1/volumes/{rid}/map", timeout=10)
    r.raise_for_status()
    return {int(k): v for k, v in r.json()["chunks"].items() if v is not None}


def remote_bytes(provider: ProviderProcess, rid: str) -> bytes:
    out = bytearray(VOL_SIZE)
    with httpx.Client(base_url=provider.url, timeout=30) as http:
        for index, cid in remote_map(provider, rid).items():
            r = http.get(f"/v1/volumes/{rid}/chunks/{cid}")
            r.raise_for_status()
            out[index * MIB : index * MIB + len(r.content)] = r.content
    return bytes(out)


def wait_uploaded(
    gw: GatewayProcess, provider: ProviderProcess, want: bytes, timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rid = remote_id(gw)
        if rid is not None and remote_bytes(provider, rid) == want:
            return rid
        time.sleep(0.3)
    pytest.fail(f"the provider's copy did not converge\n{gw.log_text()}")


def connect(gw: GatewayProcess) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    return h


def read_all(gw: GatewayProcess, step: int = 4 * MIB) -> bytes:
    h = connect(gw)
    try:
        return b"".join(
            bytes(h.pread(min(step, VOL_SIZE - off), off)) for off in range(0, VOL_SIZE, step)
        )
    finally:
        h.shutdown()


def write_pattern(gw: GatewayProcess, rng: random.Random) -> bytearray:
    model = bytearray(rng.randbytes(VOL_SIZE))
    model[4 * MIB : 6 * MIB] = bytes(2 * MIB)  # two all-zero chunks: null map entries
    h = connect(gw)
    for off in range(0, VOL_SIZE, MIB):
        h.pwrite(bytes(model[off : off + MIB]), off)
    h.flush()
    h.shutdown()
    return model


def full_log(gw: GatewayProcess) -> str:
    assert gw.stderr_path is not None
    return gw.stderr_path.read_text(errors="replace")


def cache_files(cache: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in cache.rglob("*") if f.is_file()}


@pytest.mark.timeout(120)
def test_read_back_through_an_empty_and_a_small_cache(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: type[ProviderProcess],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    gw = cached_gateway(tmp_path, gateway_factory, provider, cache_size="16M").start()
    model = write_pattern(gw, random.Random(1))
    rid = wait_uploaded(gw, provider, bytes(model), timeout=40)
    # The cache (16 MiB) is smaller than the volume (24 MiB): reads evict and refetch.
    assert read_all(gw, step=MIB) == model
    files = cache_files(tmp_path / "cache")
    assert 0 < sum(files.values()) <= 16 * MIB
    assert gw.stop() == 0

    # Restart with an empty cache: every chunk comes from the provider.
    shutil.rmtree(tmp_path / "cache")
    gw.start()
    h = connect(gw)
    for off in range(0, 2 * MIB, 256 * 1024):  # two chunks read sequentially
        assert bytes(h.pread(256 * 1024, off)) == model[off : off + 256 * 1024]
    ids = remote_map(provider, rid)
    ahead = {ids[2], ids[3]}  # read-ahead 4: chunks 2-5, of which 4 and 5 are all zero
    assert 4 not in ids and 5 not in ids
    deadline = time.monotonic() + 10
    while not ahead <= set(cache_files(tmp_path / "cache")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ahead <= set(cache_files(tmp_path / "cache")), "no read-ahead"
    assert "sequential read: reading ahead" in full_log(gw)
    h.shutdown()
    assert read_all(gw) == model
    assert sum(cache_files(tmp_path / "cache").values()) <= 16 * MIB
    assert gw.stop() == 0

    # A corrupted cache file is detected at its first use and fetched again. Every chunk
    # file is corrupted: one alone may be evicted (the cache is smaller than the volume)
    # before the read reaches its chunk, and then nothing would use it.
    victims = [f for f in (tmp_path / "cache").rglob("*") if f.is_file() and len(f.name) == 64]
    assert victims
    for victim in victims:
        with open(victim, "r+b") as f:
            f.write(b"\x00garbage\x00")
    gw.start()
    assert read_all(gw) == model
    assert "cache file does not match its chunk id" in full_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(150)
def test_provider_down_reads_go_on_writes_stall_then_resume(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: type[ProviderProcess],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    gw = cached_gateway(tmp_path, gateway_factory, provider, cache_size="64M", batch="16M")
    gw.start()
    rng = random.Random(2)
    model = write_pattern(gw, rng)
    wait_uploaded(gw, provider, bytes(model), timeout=40)
    provider.stop()

    reader = connect(gw)
    assert bytes(reader.pread(VOL_SIZE, 0)) == model  # all from the cache

    # Writes are acknowledged until the log (128 MiB) is full, then stall.
    writer = connect(gw)
    inflight: dict[int, tuple[int, bytes]] = {}
    issued = acked = 0
    off = 0
    last_progress = time.monotonic()
    stalled = False
    while issued < 200 * MIB:
        while len(inflight) < 8 and issued < 200 * MIB:
            data = rng.randbytes(MIB)
            length = min(MIB, VOL_SIZE - off)
            data = data[:length]
            cookie = writer.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
            inflight[cookie] = (off, data)
            issued += length
            off = (off + length) % VOL_SIZE
        writer.poll(100)
        for cookie in [c for c in inflight if writer.aio_command_completed(c)]:
            o, d = inflight.pop(cookie)
            model[o : o + len(d)] = d
            acked += len(d)
            last_progress = time.monotonic()
        if time.monotonic() - last_progress > 3.0:
            stalled = True
            break
    assert stalled, f"writes never stalled ({acked >> 20} MiB acknowledged)"
    assert 100 * MIB <= acked < 200 * MIB, acked
    deadline = time.monotonic() + 5
    while "WRITES_STALLED" not in full_log(gw) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"status": "WRITES_STALLED"' in full_log(gw)
    # Reads on another connection go on: the log's blocks and the cached chunks.
    assert bytes(reader.pread(VOL_SIZE, 0)) == model

    provider.start()
    deadline = time.monotonic() + 60
    while inflight and time.monotonic() < deadline:
        writer.poll(100)
        for cookie in [c for c in inflight if writer.aio_command_completed(c)]:
            o, d = inflight.pop(cookie)
            model[o : o + len(d)] = d
    assert not inflight, f"stalled writes did not resume\n{gw.log_text()}"
    writer.flush()
    writer.shutdown()
    assert bytes(reader.pread(VOL_SIZE, 0)) == model
    reader.shutdown()
    deadline = time.monotonic() + 10
    available, stalled_at = '"status": "AVAILABLE"', '"status": "WRITES_STALLED"'
    text = full_log(gw)
    while text.rfind(available) < text.rfind(stalled_at) and time.monotonic() < deadline:
        time.sleep(0.1)
        text = full_log(gw)
    assert text.rfind(available) > text.rfind(stalled_at)
    wait_uploaded(gw, provider, bytes(model), timeout=40)
    assert gw.stop() == 0


def test_cached_volume_config_errors(tmp_path: Path) -> None:
    base = [SGW, "gateway", "serve", "--data-dir", str(tmp_path / "gw")]
    res = subprocess.run(
        [*base, "--volume", "a:1G:cached"], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cached" in lines[0] and "--provider" in lines[0], lines

    # A stored volume cannot become cached (the registry remembers the mode).
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "volumes.json").write_text(
        json.dumps({"a": {"id": 1, "size": 1 << 30, "path": str(tmp_path / "a.img")}})
    )
    res = subprocess.run(
        [*base, "--volume", "a:1G:cached", "--provider", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 1
    assert "stored volume but is configured as cached" in res.stderr, res.stderr
