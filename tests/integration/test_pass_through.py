"""Pass-through of stored volumes during a long provider outage, end to end.

A real gateway uploads to a real provider; the provider is killed, and the gateway is
written far past its write log's size. Writes must go on (the volume reports
PASS_THROUGH), survive a kill -9 of the gateway in the middle, and once the provider is
back the changes made meanwhile are re-synced: the provider's copy equals what the
initiator wrote.
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

from tests.fixtures.daemons import SGW, SMALL_LOG, GatewayProcess, ProviderProcess

MIB = 1 << 20
VOL_SIZE = 96 * MIB


def status(gw: GatewayProcess) -> dict[str, str]:
    out = subprocess.run(
        [SGW, "gateway", "status", "--data-dir", str(gw.data_dir), "--output", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    vol: dict[str, str] = json.loads(out.stdout)["volumes"][0]
    return vol


def remote_bytes(provider: ProviderProcess, gw: GatewayProcess) -> bytes:
    registry = json.loads((gw.data_dir / "volumes.json").read_text())
    rid = registry["vol0"]["remote_id"]
    with httpx.Client(base_url=provider.url, timeout=30) as http:
        doc = http.get(f"/v1/volumes/{rid}/map")
        doc.raise_for_status()
        out = bytearray(VOL_SIZE)
        for index, cid in doc.json()["chunks"].items():
            if cid is not None:
                r = http.get(f"/v1/volumes/{rid}/chunks/{cid}")
                r.raise_for_status()
                out[int(index) * MIB : int(index) * MIB + len(r.content)] = r.content
        return bytes(out)


def wait_remote(provider: ProviderProcess, gw: GatewayProcess, want: bytes) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        registry = json.loads((gw.data_dir / "volumes.json").read_text())
        entry = registry["vol0"]
        made = entry.get("remote_id") and entry.get("remote_created", True)
        if made and remote_bytes(provider, gw) == want:
            return
        time.sleep(0.5)
    pytest.fail(f"the provider's copy did not converge\n{gw.log_text()}")


def write_random(gw: GatewayProcess, rng: random.Random, model: bytearray, total: int) -> None:
    """``total`` bytes of 1 MiB and 4 KiB writes at random places, mirrored in ``model``."""
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    try:
        done = 0
        while done < total:
            length = rng.choice([4096, MIB, MIB])
            off = rng.randrange(0, (VOL_SIZE - length) // 4096) * 4096
            data = rng.randbytes(length)
            h.pwrite(data, off)
            model[off : off + length] = data
            done += length
        h.flush()
    finally:
        h.shutdown()


@pytest.mark.timeout(280)
def test_outage_goes_to_pass_through_and_resyncs(
    tmp_path: Path,
    gateway_factory: type[GatewayProcess],
    provider_factory: type[ProviderProcess],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        '[destage]\nstart_fill = 0.5\nidle_seconds = 0.2\nbatch = "8M"\npass_through_after = 1.0\n'
    )
    gw = gateway_factory(
        tmp_path / "gw",
        [f"vol0:{VOL_SIZE}"],
        log_size=SMALL_LOG,
        extra_args=["--config", str(cfg), "--provider", provider.url],
    ).start()
    rng = random.Random(7)
    model = bytearray(VOL_SIZE)
    write_random(gw, rng, model, 16 * MIB)
    wait_remote(provider, gw, bytes(model))
    provider.kill()
    # Twice the log's size: without pass-through these writes would wait for the provider.
    write_random(gw, rng, model, 260 * MIB)
    vol = status(gw)
    assert vol["status"] == "PASS_THROUGH", vol
    assert "provider unreachable" in str(vol["reason"])
    # Snapshots need the provider's copy to be whole: refused with a clear message.
    out = subprocess.run(
        [SGW, "gateway", "snapshot", "vol0", "--data-dir", str(gw.data_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "pass-through" in out.stderr
    # A crash in the middle: what changed locally is still known afterwards.
    gw.kill()
    gw.start()
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    got = b"".join(bytes(h.pread(16 * MIB, off)) for off in range(0, VOL_SIZE, 16 * MIB))
    assert got == model
    h.shutdown()
    write_random(gw, rng, model, 40 * MIB)
    provider.start()
    wait_remote(provider, gw, bytes(model))
    deadline = time.monotonic() + 30
    while status(gw)["status"] != "AVAILABLE" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(gw)["status"] == "AVAILABLE"
    registry = json.loads((gw.data_dir / "volumes.json").read_text())
    assert registry["vol0"]["dirty"] == []
    assert gw.stop() == 0
