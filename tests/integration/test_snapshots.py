"""Snapshots as markers in the write log, end to end: a real provider, a real gateway,
writes through NBD, ``sgw gateway snapshot`` through the admin socket, and the snapshot
read back over the block API.

The snapshot must be exactly the volume at the marker: pattern A written, snapshot
requested, pattern B written over everything while the snapshot still uploads (a
bandwidth limit keeps it slow), and the snapshot reads A everywhere.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import httpx
import nbd
import pytest

from tests.fixtures.daemons import SGW, SMALL_LOG, GatewayProcess, ProviderProcess, gateway_status
from tests.fixtures.waiting import wait_for

MIB = 1 << 20
VOL_SIZE = 24 * MIB + 8192  # the last chunk is short


def sgw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([SGW, *args], check=False, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def snapshot(gw: GatewayProcess, volume: str = "vol0", *, wait: bool = False) -> dict[str, str]:
    args = ["gateway", "snapshot", volume, "--data-dir", str(gw.data_dir), "--output", "json"]
    out = sgw(*args, *(["--wait"] if wait else []))
    doc: dict[str, str] = json.loads(out.stdout)
    return doc


def snapshot_state(gw: GatewayProcess, snapshot_id: str) -> str:
    out = sgw("gateway", "status", "--data-dir", str(gw.data_dir), "--output", "json")
    for snap in json.loads(out.stdout)["snapshots"]:
        if snap["snapshot_id"] == snapshot_id:
            return str(snap["state"])
    raise AssertionError(f"snapshot {snapshot_id} unknown to the gateway: {out.stdout}")


def wait_completed(gw: GatewayProcess, snapshot_id: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = snapshot_state(gw, snapshot_id)
        if state == "COMPLETED":
            return
        assert state == "PENDING", state
        time.sleep(0.2)
    pytest.fail(f"snapshot {snapshot_id} not completed in {timeout} s\n{gw.log_text()}")


def snapshot_bytes(provider: ProviderProcess, snapshot_id: str) -> bytes:
    """The snapshot as the provider holds it, read through the block API."""
    with httpx.Client(base_url=provider.url, timeout=30) as http:
        snap = http.get(f"/v1/snapshots/{snapshot_id}")
        snap.raise_for_status()
        assert snap.json()["status"] == "completed"
        size, chunk = snap.json()["volume_size"], snap.json()["chunk_size"]
        out = bytearray(size)
        start: int | None = 0
        while start is not None:
            page = http.get(f"/v1/snapshots/{snapshot_id}/blocks", params={"start": start})
            page.raise_for_status()
            for block in page.json()["blocks"]:
                index = block["index"]
                r = http.get(f"/v1/snapshots/{snapshot_id}/blocks/{index}")
                r.raise_for_status()
                out[index * chunk : index * chunk + len(r.content)] = r.content
            start = page.json()["next"]
        return bytes(out)


def pattern(tag: str, size: int) -> bytes:
    """Incompressible data, different per tag."""
    return random.Random(tag).randbytes(size)


def write_all(gw: GatewayProcess, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    try:
        for off in range(0, len(data), 4 * MIB):
            h.pwrite(data[off : off + 4 * MIB], off)
        h.flush()
    finally:
        h.shutdown()


def start_gateway(
    factory: type[GatewayProcess], tmp_path: Path, provider: ProviderProcess, bandwidth: str
) -> GatewayProcess:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        '[destage]\nstart_fill = 0.9\nidle_seconds = 30\nbatch = "4M"\n'
        f'[remote]\nbandwidth = "{bandwidth}"\nconcurrency = 4\n'
    )
    return factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    ).start()


@pytest.mark.timeout(240)
def test_snapshot_is_the_volume_at_the_marker(
    tmp_path: Path, gateway_factory: type[GatewayProcess], provider: ProviderProcess
) -> None:
    gw = start_gateway(gateway_factory, tmp_path, provider, "3M")
    a, b = pattern("A", VOL_SIZE), pattern("B", VOL_SIZE)
    write_all(gw, a)
    snap_a = snapshot(gw)
    assert snap_a["state"] == "PENDING"
    write_all(gw, b)  # while A is still on its way to the provider
    assert snapshot_state(gw, snap_a["snapshot_id"]) == "PENDING", "the test lost its race"
    snap_b = snapshot(gw, wait=True)  # behind A in the log: waits for both
    assert snap_b["state"] == "COMPLETED"
    assert snapshot_state(gw, snap_a["snapshot_id"]) == "COMPLETED"
    assert snapshot_bytes(provider, snap_a["snapshot_id"]) == a
    assert snapshot_bytes(provider, snap_b["snapshot_id"]) == b
    # Incremental by construction: every chunk changed between the two.
    with httpx.Client(base_url=provider.url, timeout=30) as http:
        r = http.get(
            f"/v1/snapshots/{snap_b['snapshot_id']}/changed-blocks",
            params={"first_snapshot_id": snap_a["snapshot_id"]},
        )
        r.raise_for_status()
        assert len(r.json()["blocks"]) == (VOL_SIZE + MIB - 1) // MIB
    # A snapshot of an unchanged volume is the same data again.
    snap_c = snapshot(gw, wait=True)
    assert snapshot_bytes(provider, snap_c["snapshot_id"]) == b
    assert gw.stop() == 0


@pytest.mark.timeout(240)
def test_snapshot_marker_survives_kill_9(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: type[ProviderProcess],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    gw = start_gateway(gateway_factory, tmp_path, provider, "100M")
    a, b = pattern("A", VOL_SIZE), pattern("B", VOL_SIZE)
    provider.kill()  # the snapshot cannot be made yet
    write_all(gw, a)
    snap_a = snapshot(gw)
    write_all(gw, b)
    # The snapshot asked the destager to start at once: it has tried to upload towards
    # the marker and failed, and the snapshot waits.
    wait_for(
        lambda: gateway_status(gw)["destager"]["failures"] >= 1,
        what="an upload attempt to fail while the provider is away",
    )
    assert snapshot_state(gw, snap_a["snapshot_id"]) == "PENDING"
    gw.kill()
    provider.start()
    gw.start()
    wait_completed(gw, snap_a["snapshot_id"])
    assert snapshot_bytes(provider, snap_a["snapshot_id"]) == a
    assert gw.stop() == 0


@pytest.mark.timeout(120)
def test_snapshot_needs_a_provider_and_a_known_volume(
    tmp_path: Path, gateway_factory: type[GatewayProcess], provider: ProviderProcess
) -> None:
    alone = gateway_factory(tmp_path / "alone", [f"vol0:{VOL_SIZE}"]).start()
    out = sgw("gateway", "snapshot", "vol0", "--data-dir", str(alone.data_dir), check=False)
    assert out.returncode == 1
    assert "configure [remote]" in out.stderr
    assert alone.stop() == 0
    out = sgw("gateway", "status", "--data-dir", str(alone.data_dir), check=False)
    assert out.returncode == 1 and "no gateway is running" in out.stderr
    gw = start_gateway(gateway_factory, tmp_path, provider, "100M")
    out = sgw("gateway", "snapshot", "nope", "--data-dir", str(gw.data_dir), check=False)
    assert out.returncode == 1 and "no volume named 'nope'" in out.stderr
    assert (gw.data_dir / "admin.sock").stat().st_mode & 0o777 == 0o600
    assert gw.stop() == 0


def read_all(gw: GatewayProcess, export: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(gw.uri(export))
    try:
        return b"".join(
            bytes(h.pread(min(4 * MIB, size - off), off)) for off in range(0, size, 4 * MIB)
        )
    finally:
        h.shutdown()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["cached", "stored"])
def test_volume_from_snapshot_reads_the_snapshot(
    tmp_path: Path, gateway_factory: type[GatewayProcess], provider: ProviderProcess, mode: str
) -> None:
    gw = start_gateway(gateway_factory, tmp_path, provider, "100M")
    a, b = pattern("A", VOL_SIZE), pattern("B", VOL_SIZE)
    write_all(gw, a)
    snap_a = snapshot(gw)
    write_all(gw, b)
    wait_completed(gw, snap_a["snapshot_id"])
    assert gw.stop() == 0
    # Another gateway (a new appliance) creates a volume from the snapshot.
    other = gateway_factory(
        tmp_path / "other",
        [f"copy:{VOL_SIZE}:{mode}:{snap_a['snapshot_id']}"],
        extra_args=["--provider", provider.url],
    ).start()
    want = bytearray(a)
    # First a write of part of a block that is not local yet: the rest of the block must
    # come from the snapshot (sub-block writes are what a 512-byte-sector initiator sends).
    h = nbd.NBD()
    h.connect_uri(other.uri("copy"))
    h.pwrite(b"\xdd" * 512, 9 * MIB + 1536)
    h.zero(1000, 17 * MIB + 100)
    want[9 * MIB + 1536 : 9 * MIB + 2048] = b"\xdd" * 512
    want[17 * MIB + 100 : 17 * MIB + 1100] = bytes(1000)
    h.shutdown()
    assert read_all(other, "copy", VOL_SIZE) == want
    # It is a volume of its own: writes change it, not the snapshot.
    h = nbd.NBD()
    h.connect_uri(other.uri("copy"))
    h.pwrite(b"\xee" * 8192, 5 * MIB)
    h.flush()
    h.shutdown()
    want[5 * MIB : 5 * MIB + 8192] = b"\xee" * 8192
    assert other.stop() == 0
    other.start()
    assert read_all(other, "copy", VOL_SIZE) == want
    assert snapshot_bytes(provider, snap_a["snapshot_id"]) == a
    assert other.stop() == 0


def volume_status(gw: GatewayProcess, name: str) -> dict[str, object]:
    out = sgw("gateway", "status", "--data-dir", str(gw.data_dir), "--output", "json")
    for vol in json.loads(out.stdout)["volumes"]:
        if vol["name"] == name:
            return dict(vol)
    raise AssertionError(f"no volume {name}: {out.stdout}")


@pytest.mark.timeout(240)
def test_stored_restore_survives_kill_9_and_keeps_new_writes(
    tmp_path: Path, gateway_factory: type[GatewayProcess], provider: ProviderProcess
) -> None:
    from tests.fixtures.faultproxy import Fault, FaultProxy

    gw = start_gateway(gateway_factory, tmp_path, provider, "100M")
    a = pattern("A", VOL_SIZE)
    write_all(gw, a)
    snap_a = snapshot(gw, wait=True)
    assert snap_a["state"] == "COMPLETED"
    assert gw.stop() == 0
    # Every request to the provider takes a while: the restore is still running when the
    # gateway is killed.
    proxy = FaultProxy(provider.port).start()
    try:
        proxy.set(Fault.DELAY, delay=0.15)
        other = gateway_factory(
            tmp_path / "other",
            [f"copy:{VOL_SIZE}:stored:{snap_a['snapshot_id']}"],
            extra_args=["--provider", proxy.url],
        ).start()
        want = bytearray(a)
        rng = random.Random(5)
        killed_while_restoring = 0
        for round_ in range(3):
            h = nbd.NBD()
            h.connect_uri(other.uri("copy"))
            off = rng.randrange(0, VOL_SIZE // 4096) * 4096
            assert bytes(h.pread(4096, off)) == want[off : off + 4096]
            data = bytes([round_ + 1]) * 8192
            off = rng.randrange(0, VOL_SIZE // 4096 - 2) * 4096
            h.pwrite(data, off)
            h.flush()
            want[off : off + 8192] = data
            h.shutdown()
            status = volume_status(other, "copy")
            assert status["status"] in ("RESTORING", "AVAILABLE"), status
            killed_while_restoring += status["status"] == "RESTORING"
            time.sleep(rng.uniform(0.1, 0.8))
            other.kill()
            other.start()
        assert killed_while_restoring, "the restore finished before any kill"
        proxy.heal()
        deadline = time.monotonic() + 60
        while volume_status(other, "copy")["status"] != "AVAILABLE":
            assert time.monotonic() < deadline, other.log_text()
            time.sleep(0.2)
        assert read_all(other, "copy", VOL_SIZE) == want
        registry = json.loads((other.data_dir / "volumes.json").read_text())
        assert registry["copy"]["restore_done"] is True
        assert other.stop() == 0
    finally:
        proxy.stop()
