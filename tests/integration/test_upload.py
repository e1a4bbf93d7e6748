"""Remote uploads end to end: a real provider (`sgw provider serve --insecure-dev`), a real
gateway configured with it, writes through NBD, and the provider's map read back over HTTP.

The provider's copy is rebuilt from its map (absent entries read as zeroes) and must
equal what the gateway serves, also when the provider comes up only after the writes and
when the gateway is killed with SIGKILL in the middle of uploads.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nbd
import pytest

from tests.fixtures.daemons import SGW, SMALL_LOG, GatewayProcess, free_port, remote_id

MIB = 1 << 20
VOL_SIZE = 48 * MIB + 64 * 1024  # the last chunk is short


class Provider:
    """A running ``sgw provider serve --insecure-dev`` on loopback."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = data_dir.with_suffix(".stderr")

    def start(self) -> Provider:
        args = [SGW, "provider", "serve", "--insecure-dev", "--data-dir", str(self.data_dir)]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*args, "--listen", f"127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("provider did not answer /v1/health within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def volume_bytes(self, volume_id: str) -> bytes:
        """The volume as the provider holds it: its map's chunks, zeroes where absent."""
        with httpx.Client(base_url=self.url, timeout=30) as http:
            vol = http.get(f"/v1/volumes/{volume_id}")
            vol.raise_for_status()
            size, chunk = vol.json()["size"], vol.json()["chunk_size"]
            doc = http.get(f"/v1/volumes/{volume_id}/map")
            doc.raise_for_status()
            out = bytearray(size)
            for index, cid in doc.json()["chunks"].items():
                if cid is None:
                    continue
                r = http.get(f"/v1/volumes/{volume_id}/chunks/{cid}")
                r.raise_for_status()
                data = r.content
                start = int(index) * chunk
                assert len(data) == min(chunk, size - start), f"chunk {index} has a wrong size"
                out[start : start + len(data)] = data
            return bytes(out)


@pytest.fixture
def provider_factory(tmp_path: Path) -> Iterator[Callable[[int], Provider]]:
    started: list[Provider] = []

    def make(port: int) -> Provider:
        p = Provider(tmp_path / f"prov-{port}", port)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def write_config(path: Path, bandwidth: str | None = None) -> None:
    text = '[destage]\nstart_fill = 0.0\nidle_seconds = 0.05\nbatch = "4M"\n'
    if bandwidth:
        text += f'[remote]\nbandwidth = "{bandwidth}"\nconcurrency = 4\n'
    path.write_text(text)


def random_io(h: nbd.NBD, rng: random.Random, model: bytearray, ops: int) -> None:
    """Writes, zeroes and trims (block aligned) through NBD, mirrored in ``model``."""
    for _ in range(ops):
        kind = rng.choices(["write", "zero", "trim"], [8, 1, 1])[0]
        off = rng.randrange(0, VOL_SIZE // 4096) * 4096
        length = min(rng.choice([4096, 65536, MIB, 3 * MIB + 8192]), VOL_SIZE - off)
        if kind == "write":
            data = rng.randbytes(length)
            h.pwrite(data, off)
            model[off : off + length] = data
        elif kind == "zero":
            h.zero(length, off)
            model[off : off + length] = bytes(length)
        else:
            h.trim(length, off)
            model[off : off + length] = bytes(length)
    h.flush()


def read_all(gw: GatewayProcess) -> bytes:
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    try:
        return b"".join(
            bytes(h.pread(min(4 * MIB, VOL_SIZE - off), off)) for off in range(0, VOL_SIZE, 4 * MIB)
        )
    finally:
        h.shutdown()


def wait_remote_equal(
    gw: GatewayProcess, provider: Provider, want: bytes, timeout: float = 90.0
) -> float:
    """Polls until the provider's copy equals ``want``; returns the seconds it took."""
    started = time.monotonic()
    last = "no remote volume bound yet"
    while time.monotonic() - started < timeout:
        rid = remote_id(gw)
        if rid is not None:
            got = provider.volume_bytes(rid)
            if got == want:
                return time.monotonic() - started
            diff = [i for i in range(0, VOL_SIZE, MIB) if got[i : i + MIB] != want[i : i + MIB]]
            last = f"chunks still differing: {diff[:10]}"
        time.sleep(0.25)
    pytest.fail(f"the provider's copy did not converge: {last}\n{gw.log_text()}")


@pytest.mark.timeout(180)
def test_written_data_reaches_the_provider(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: Callable[[int], Provider],
) -> None:
    provider = provider_factory(free_port()).start()
    cfg = tmp_path / "gw.toml"
    write_config(cfg)
    gw = gateway_factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    ).start()
    rng = random.Random(1)
    model = bytearray(VOL_SIZE)
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    random_io(h, rng, model, 60)
    wait_remote_equal(gw, provider, bytes(model))
    # A second round over the same chunks: new versions replace the old ones.
    random_io(h, rng, model, 60)
    h.trim(16 * MIB, 8 * MIB)  # whole chunks become null entries
    model[8 * MIB : 24 * MIB] = bytes(16 * MIB)
    h.flush()
    h.shutdown()
    wait_remote_equal(gw, provider, bytes(model))
    assert read_all(gw) == model
    assert gw.stop() == 0


@pytest.mark.timeout(240)
def test_provider_down_at_first_loses_nothing(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: Callable[[int], Provider],
) -> None:
    port = free_port()
    provider = provider_factory(port)  # not started yet
    cfg = tmp_path / "gw.toml"
    write_config(cfg)
    gw = gateway_factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    ).start()
    rng = random.Random(2)
    model = bytearray(VOL_SIZE)
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    random_io(h, rng, model, 50)  # acknowledged and flushed while the provider is down
    time.sleep(3)  # the destager fails and backs off; the log keeps everything
    # The id is chosen and recorded, but the provider was never reached to create it.
    registry = json.loads((gw.data_dir / "volumes.json").read_text())
    assert registry["vol0"]["remote_created"] is False
    assert bytes(h.pread(VOL_SIZE // 2, 0)) == model[: VOL_SIZE // 2]
    h.shutdown()
    # A restart while the provider is still down replays the log; nothing is lost.
    assert gw.stop() == 0
    gw.start()
    assert read_all(gw) == model
    provider.start()
    took = wait_remote_equal(gw, provider, bytes(model), timeout=120)
    print(f"uploaded {took:.1f} s after the provider came up")
    assert read_all(gw) == model
    assert gw.stop() == 0


@pytest.mark.timeout(300)
def test_kill_9_during_uploads_then_restart_converges(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: Callable[[int], Provider],
) -> None:
    provider = provider_factory(free_port()).start()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, bandwidth="6M")  # slow enough that the kills land mid-upload
    gw = gateway_factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    )
    rng = random.Random(3)
    model = bytearray(VOL_SIZE)
    for rnd in range(3):
        gw.start()
        assert read_all(gw) == model, f"round {rnd}: flushed data lost"
        h = nbd.NBD()
        h.connect_uri(gw.uri())
        random_io(h, rng, model, 40)
        h.shutdown()
        time.sleep(rng.uniform(0.5, 2.5))
        gw.kill()
    gw.start()
    assert read_all(gw) == model
    wait_remote_equal(gw, provider, bytes(model), timeout=150)
    text = gw.stderr_path.read_text() if gw.stderr_path else ""
    assert text.count("gateway ready") == 4
    assert text.count("remote volume created") == 1  # bound once, kept across kills
    assert "something else writes" not in text
    assert gw.stop() == 0


def test_bad_provider_flag_is_one_line_and_exit_2(tmp_path: Path) -> None:
    args = [SGW, "gateway", "serve", "--data-dir", str(tmp_path), "--volume", "a:1G"]
    res = subprocess.run(
        [*args, "--provider", "localhost:8480"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--provider" in lines[0] and "http://" in lines[0]
