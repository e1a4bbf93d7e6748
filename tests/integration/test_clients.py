"""Real NBD clients against a real ``sgw gateway serve``: nbdinfo, nbdcopy, qemu-io, qemu-img.

Every check goes through a client someone would actually point at the gateway; expected
contents are kept in a model (a bytearray) and compared byte for byte.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.fixtures.daemons import GatewayProcess, free_port, need
from tests.fixtures.waiting import wait_for

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4096
HOLE = 1  # base:allocation flags
ZERO = 2


# --- helpers ------------------------------------------------------------------------------------


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs a client; fails the test with its output if it exits non-zero."""
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def qemu_io(uri: str, *commands: str) -> str:
    """Runs qemu-io commands on the raw NBD export; any failed command fails the test."""
    args = [need("qemu-io"), "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    out = run(*args).stdout
    assert "failed" not in out.lower(), out
    return out


def qemu_io_rc(uri: str, *commands: str) -> tuple[int, str]:
    args = [need("qemu-io"), "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def nbdinfo_json(*args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run(need("nbdinfo"), "--json", *args).stdout)
    return doc


def pattern(seed: int, n: int) -> bytes:
    """Deterministic bytes without any zero byte."""
    raw = random.Random(seed).randbytes(n)
    return raw.translate(bytes([b or 0x5C for b in range(256)]))


def read_export(gw: GatewayProcess, offset: int, length: int, export: str = "vol0") -> bytes:
    """Reads through libnbd (another real client), in chunks the server accepts."""
    h = nbd.NBD()
    h.connect_uri(gw.uri(export))
    out = bytearray()
    pos = offset
    while pos < offset + length:
        n = min(16 * MIB, offset + length - pos)
        out += h.pread(n, pos)
        pos += n
    h.shutdown()
    return bytes(out)


def map_entries(uri: str) -> list[dict[str, Any]]:
    """``nbdinfo --map`` as a list of ``{offset, length, type}``, checked to be contiguous."""
    entries: list[dict[str, Any]] = json.loads(run(need("nbdinfo"), "--json", "--map", uri).stdout)
    pos = 0
    for e in entries:
        assert e["offset"] == pos, f"map has a gap or overlap at {pos}: {e}"
        assert e["length"] > 0
        pos += e["length"]
    return entries


def types_in(entries: list[dict[str, Any]], offset: int, length: int) -> set[int]:
    return {
        e["type"]
        for e in entries
        if e["offset"] < offset + length and e["offset"] + e["length"] > offset
    }


def assert_map_truthful(entries: list[dict[str, Any]], model: bytes | bytearray) -> None:
    """No extent within the model's range claims ZERO where the model holds data."""
    for e in entries:
        if e["type"] & ZERO and e["offset"] < len(model):
            chunk = model[e["offset"] : min(e["offset"] + e["length"], len(model))]
            assert chunk.count(0) == len(chunk), f"map says zero over data: {e}"


def wait_destaged(gw: GatewayProcess, volume: str, model: bytes, timeout: float = 20) -> None:
    """Waits until the volume's own file starts with ``model`` (moved out of the log)."""
    path = gw.data_dir / "volumes" / f"{volume}.img"
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            if f.read(len(model)) == model:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"the destager did not move the data into {path} within {timeout}s")
        time.sleep(0.1)


@pytest.fixture
def two_volumes(gateway_factory: type[GatewayProcess], tmp_path: Path) -> GatewayProcess:
    return gateway_factory(tmp_path / "gw2", ["vol0:1G", "vol1:64M"], tcp_port=free_port()).start()


# --- nbdinfo --------------------------------------------------------------------------------------


def test_nbdinfo_lists_every_export_with_sizes(two_volumes: GatewayProcess) -> None:
    gw = two_volumes
    for uri in (gw.uri(""), gw.tcp_uri("")):
        info = nbdinfo_json("--list", uri)
        assert info["protocol"] == "newstyle-fixed"
        assert info["structured"] is True
        exports = {e["export-name"]: e for e in info["exports"]}
        assert list(exports) == ["vol0", "vol1"]
        assert exports["vol0"]["export-size"] == GIB
        assert exports["vol1"]["export-size"] == 64 * MIB
        for name, e in exports.items():
            assert e["description"] == f"sgw volume {name}"
            assert "base:allocation" in e["contexts"]
    text = run(need("nbdinfo"), "--list", gw.uri("")).stdout
    assert 'export="vol0"' in text and 'export="vol1"' in text
    assert "export-size: 1073741824" in text and "export-size: 67108864" in text


def test_nbdinfo_inspects_one_export(two_volumes: GatewayProcess) -> None:
    gw = two_volumes
    for uri in (gw.uri("vol1"), gw.tcp_uri("vol1")):
        (e,) = nbdinfo_json(uri)["exports"]
        assert e["export-name"] == "vol1"
        assert e["export-size"] == 64 * MIB
        for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert e[cap] is True, cap
        assert e["can_fast_zero"] is True
        assert e["is_read_only"] is False
        assert e["block_size_minimum"] == 1
        assert e["block_size_preferred"] == 4096
        assert e["block_size_maximum"] == 32 * MIB
        assert e["contexts"] == ["base:allocation"]
    nbdinfo = need("nbdinfo")
    assert run(nbdinfo, "--size", gw.uri("vol1")).stdout.strip() == str(64 * MIB)
    for cap in ("flush", "fua", "trim", "zero", "multi-conn", "fast-zero"):
        run(nbdinfo, "--can", cap, gw.uri("vol1"))  # exit 0: yes
    assert (
        subprocess.run([nbdinfo, "--is", "read-only", gw.uri("vol1")], check=False).returncode == 2
    )
    # The default export is the first volume.
    (d,) = nbdinfo_json(gw.uri(""))["exports"]
    assert d["export-size"] == GIB
    assert d["export-name"] == "vol0"


def test_nbdinfo_map_follows_writes_trims_and_zeroes(gateway: GatewayProcess) -> None:
    uri = gateway.uri()
    assert map_entries(uri) == [
        {"offset": 0, "length": GIB, "type": HOLE | ZERO, "description": "hole,zero"}
    ]
    region = 8 * MIB
    model = bytearray(region)
    model[: 6 * MIB] = b"\x5a" * (6 * MIB)
    qemu_io(
        uri,
        "write -P 0x5a 0 6M",
        "discard 1M 1M",  # aligned: becomes a hole
        "write -z 2M 512k",  # zeroes, may stay allocated
        "write -z -u 3M 1M",  # zeroes, may unmap
        "write -P 0x66 3409000 5000",  # data inside the unmapped range
        "write -P 0x77 7340033 100",  # a lonely unaligned write past the first 6 MiB
    )
    model[MIB : 2 * MIB] = bytes(MIB)
    model[2 * MIB : 2 * MIB + 512 * KIB] = bytes(512 * KIB)
    model[3 * MIB : 4 * MIB] = bytes(MIB)
    model[3409000 : 3409000 + 5000] = b"\x66" * 5000
    model[7340033 : 7340033 + 100] = b"\x77" * 100

    for phase in ("in the log", "destaged"):
        entries = map_entries(uri)
        assert sum(e["length"] for e in entries) == GIB
        assert_map_truthful(entries, model)
        assert types_in(entries, 0, MIB) == {0}, phase
        assert types_in(entries, MIB, MIB) == {HOLE | ZERO}, phase
        assert types_in(entries, 3409000, 5000) == {0}, phase
        assert types_in(entries, 7340033, 100) == {0}, phase
        assert types_in(entries, 4 * MIB, 2 * MIB) == {0}, phase
        assert types_in(entries, region, GIB - region) == {HOLE | ZERO}, phase
        assert read_export(gateway, 0, region) == model, phase
        wait_destaged(gateway, "vol0", bytes(model))


def test_nbdinfo_map_of_default_export(two_volumes: GatewayProcess) -> None:
    """``nbdinfo --map`` on the export "" must describe the first volume."""
    gw = two_volumes
    qemu_io(gw.uri("vol0"), "write -P 0x31 1M 64k", "flush")
    default = map_entries(gw.uri(""))
    named = map_entries(gw.uri("vol0"))
    assert [(e["offset"], e["length"], e["type"]) for e in default] == [
        (e["offset"], e["length"], e["type"]) for e in named
    ]
    assert types_in(default, MIB, 64 * KIB) == {0}


# --- nbdcopy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_256m_round_trip(
    gateway_factory: type[GatewayProcess], tmp_path: Path, connections: int
) -> None:
    nbdcopy = need("nbdcopy")
    gw = gateway_factory(tmp_path / "gw", ["img:256M"]).start()
    src = tmp_path / "src.img"
    out = tmp_path / "out.img"
    # Twice the log's data area: the copy only completes if the destager keeps up.
    rng = random.Random(connections)
    with open(src, "wb") as f:
        for _ in range(16):
            f.write(rng.randbytes(16 * MIB))

    def connects() -> int:
        assert gw.stderr_path is not None
        return gw.stderr_path.read_text().count('"msg": "nbd client connected"')

    before = connects()
    copy = [nbdcopy, f"--connections={connections}", f"--threads={connections}"]
    run(*copy, "--flush", str(src), gw.uri("img"), timeout=300)
    if connections > 1:
        # can_multi_conn is advertised, so nbdcopy really spreads the copy.
        assert connects() - before >= connections
    run(*copy, gw.uri("img"), str(out), timeout=300)
    assert out.stat().st_size == 256 * MIB
    assert filecmp.cmp(src, out, shallow=False), "image read back differs from what was copied in"

    # After the flush the image survives a crash (1 connection) or a clean stop (4).
    if connections == 1:
        gw.kill()
    else:
        assert gw.stop() == 0
    gw.start()
    out.unlink()
    run(nbdcopy, gw.uri("img"), str(out), timeout=300)
    assert filecmp.cmp(src, out, shallow=False), "image changed across the restart"


# --- qemu-io --------------------------------------------------------------------------------------


def test_qemu_io_patterns_zeroes_discard_and_fua(gateway: GatewayProcess) -> None:
    uri = gateway.uri()
    model = bytearray(12 * MIB)

    def put(off: int, byte: int, n: int) -> None:
        model[off : off + n] = bytes([byte]) * n

    qemu_io(
        uri,
        "write -P 0xa5 0 4096",  # aligned
        "write -P 0x5a 4097 10000",  # unaligned start and end, spans blocks
        "write -P 0x11 1M 1M",
        "write -P 0x3c 1048577 1",  # single byte inside written data
        "write -f -P 0x22 3145729 65535",  # FUA, unaligned
        "aio_write -f -P 0x33 8M 64k",  # FUA, asynchronous
        "aio_write -P 0x44 9M 64k",
        "aio_flush",
        "write -z 1052672 8192",  # zeroes inside the 0x11 range (block aligned)
        "write -z 1069059 1000",  # zeroes, unaligned
        "write -z -u 1114112 64k",
        "discard 1536k 256k",  # aligned discard
        "flush",
    )
    put(0, 0xA5, 4096)
    put(4097, 0x5A, 10000)
    put(MIB, 0x11, MIB)
    put(MIB + 1, 0x3C, 1)
    put(3 * MIB + 1, 0x22, 65535)
    put(8 * MIB, 0x33, 64 * KIB)
    put(9 * MIB, 0x44, 64 * KIB)
    put(1052672, 0, 8192)
    put(1069059, 0, 1000)
    put(MIB + 64 * KIB, 0, 64 * KIB)
    put(1536 * KIB, 0, 256 * KIB)

    qemu_io(
        uri,
        "read -P 0xa5 0 4096",
        "read -P 0 4096 1",  # the byte between the two writes was never written
        "read -P 0x5a 4097 10000",
        "read -P 0 14097 100",
        "read -P 0x11 1M 1",
        "read -P 0x3c 1048577 1",
        "read -P 0x11 1048578 4094",
        "read -P 0 1052672 8192",
        "read -P 0x11 1060864 8195",
        "read -P 0 1069059 1000",
        "read -P 0 1114112 64k",
        "read -P 0 1536k 256k",
        "read -P 0x11 1792k 256k",
        "read -P 0x22 3145729 65535",
        "read -P 0x33 8M 64k",
        "read -P 0x44 9M 64k",
        "read -P 0 10M 2M",
    )
    # The verification really verifies: a wrong pattern is reported.
    rc, out = qemu_io_rc(uri, "read -P 0x5b 4097 10000")
    assert rc != 0 and "Pattern verification failed" in out
    # And another client sees exactly the same bytes.
    assert read_export(gateway, 0, len(model)) == model


# --- qemu-img -------------------------------------------------------------------------------------


def _sparse_image(path: Path, size: int) -> bytes:
    """A raw image with holes, explicit zeroes and data at odd places; returns its bytes."""
    rng = random.Random(7)
    img = bytearray(size)
    for off, n in [(MIB, 3 * MIB), (10 * MIB, 4097), (33 * MIB + 5, 70000), (size - 5000, 5000)]:
        img[off : off + n] = rng.randbytes(n)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in [(MIB, 3 * MIB), (10 * MIB, 4097), (33 * MIB + 5, 70000)]:
            f.seek(off)
            f.write(img[off : off + n])
        f.seek(40 * MIB)
        f.write(bytes(MIB))  # allocated zeroes
        f.seek(size - 5000)
        f.write(img[size - 5000 :])
    return bytes(img)


def test_qemu_img_convert_compare_info_map(two_volumes: GatewayProcess, tmp_path: Path) -> None:
    qemu_img = need("qemu-img")
    uri = two_volumes.uri("vol1")
    size = 64 * MIB
    # Fill the target first, so the holes of the source must really be zeroed.
    qemu_io(uri, "write -P 0x77 0 64M")
    src = tmp_path / "src.raw"
    content = _sparse_image(src, size)

    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    out = run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri).stdout
    assert "Images are identical" in out
    assert read_export(two_volumes, 0, size, "vol1") == content

    # compare notices a single changed byte (so "identical" above means something).
    qemu_io(uri, "write -P 0x01 20M 1")
    proc = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "20971520" in proc.stdout, proc.stdout + proc.stderr
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri)

    info = json.loads(run(qemu_img, "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == size
    assert info["format"] == "raw"

    entries = json.loads(run(qemu_img, "map", "--output=json", "-f", "raw", uri).stdout)
    pos = 0
    for e in entries:
        assert e["start"] == pos, f"qemu-img map has a gap or overlap at {pos}"
        assert e["length"] > 0 and e["present"] is True
        chunk = content[e["start"] : e["start"] + e["length"]]
        if e["zero"]:
            assert chunk.count(0) == len(chunk), f"map claims zeroes over data: {e}"
        pos += e["length"]
    assert pos == size
    for off, n in [(MIB, 3 * MIB), (10 * MIB, 4097), (33 * MIB + 5, 70000), (size - 5000, 5000)]:
        covering = [e for e in entries if e["start"] < off + n and e["start"] + e["length"] > off]
        assert all(e["data"] and not e["zero"] for e in covering), (off, covering)
    # The other volume was not touched by any of this.
    assert read_export(two_volumes, 0, MIB, "vol0") == bytes(MIB)


# --- restarts -------------------------------------------------------------------------------------


def test_data_survives_clean_sigterm_restart(gateway: GatewayProcess) -> None:
    uri = gateway.uri()
    qemu_io(uri, "write -P 0x61 0 2M", "write -P 0x62 4097 10000", "discard 1M 512k")
    # Acknowledged but never flushed by the client: a clean stop must still keep it.
    h = nbd.NBD()
    h.connect_uri(uri)
    tail = pattern(5, 300_001)
    h.pwrite(tail, GIB - len(tail))
    h.zero(8192, 1536 * KIB, nbd.CMD_FLAG_NO_HOLE)
    h.shutdown()
    assert gateway.stop() == 0
    assert not Path(gateway.sock).exists(), "a clean stop removes its socket"
    gateway.start()
    qemu_io(
        uri,
        "read -P 0x61 0 4097",
        "read -P 0x62 4097 10000",
        "read -P 0x61 14097 1034479",
        "read -P 0 1M 512k",
        "read -P 0 1536k 8k",
        "read -P 0x61 1544k 504k",
    )
    assert read_export(gateway, GIB - len(tail), len(tail)) == tail


def test_data_survives_kill_9_after_flush(gateway: GatewayProcess) -> None:
    uri = gateway.uri()
    # Round 1: qemu-io's explicit flush (and the one it does on close).
    qemu_io(uri, "write -P 0x71 0 3M", "write -P 0x72 5000 3000", "flush")
    gateway.kill()
    gateway.start()
    qemu_io(uri, "read -P 0x71 0 5000", "read -P 0x72 5000 3000", "read -P 0x71 8000 3137728")
    # Round 2, on top of a replayed log: overwrite part, zero part, flush, crash again.
    qemu_io(
        uri,
        "write -P 0x73 1M 4k",
        "write -z 2M 64k",
        "discard 2560k 512k",
        "write -P 0x74 500M 1M",
        "flush",
    )
    gateway.kill()
    gateway.start()
    qemu_io(
        uri,
        "read -P 0x71 0 5000",
        "read -P 0x72 5000 3000",
        "read -P 0x71 8000 1040576",
        "read -P 0x73 1M 4k",
        "read -P 0x71 1028k 1020k",
        "read -P 0 2M 64k",
        "read -P 0x71 2112k 448k",
        "read -P 0 2560k 512k",
        "read -P 0x74 500M 1M",
    )
    # Wait for the destager, crash once more: the volume file alone must now be right.
    expect = bytearray(b"\x71" * (3 * MIB))
    expect[5000:8000] = b"\x72" * 3000
    expect[MIB : MIB + 4096] = b"\x73" * 4096
    expect[2 * MIB : 2 * MIB + 64 * KIB] = bytes(64 * KIB)
    expect[2560 * KIB : 3 * MIB] = bytes(512 * KIB)
    wait_destaged(gateway, "vol0", bytes(expect))
    gateway.kill()
    gateway.start()
    assert read_export(gateway, 0, 3 * MIB) == expect


def test_kill_9_during_heavy_writes_restarts_consistent(
    gateway_factory: type[GatewayProcess], tmp_path: Path
) -> None:
    """A crash in the middle of a copy: the gateway restarts, flushed data is intact and
    every block of the copy target is either its old or its new content, never a mix.

    The copy reads its source from a pipe that the test fills: the first half, then (once
    that half reads back: the copy is under way) the second half while the gateway is
    killed; the copy failing shows the kill cut it off before it was done."""
    nbdcopy = need("nbdcopy")
    gw = gateway_factory(tmp_path / "gw", ["vol0:64M", "scratch:128M"]).start()
    qemu_io(gw.uri("vol0"), "write -P 0x42 0 64M", "flush")
    qemu_io(gw.uri("scratch"), "write -P 0x11 0 128M", "flush")
    rng = random.Random(11)
    new = b"".join(rng.randbytes(16 * MIB) for _ in range(8))
    half = len(new) // 2
    copy = subprocess.Popen(
        [nbdcopy, "-", gw.uri("scratch")], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    source = copy.stdin
    assert source is not None
    source.write(new[:half])
    source.flush()
    wait_for(
        lambda: read_export(gw, half - MIB, MIB, "scratch") == new[half - MIB : half],
        what="the first half of the copy to be acknowledged",
    )

    def rest() -> None:
        try:
            source.write(new[half:])
        except BrokenPipeError:
            pass  # the copy gave up: the gateway is gone
        finally:
            with contextlib.suppress(BrokenPipeError):
                source.close()

    feeder = threading.Thread(target=rest)
    feeder.start()
    gw.kill()
    assert copy.wait(60) != 0, "the copy finished before the gateway was killed"
    feeder.join(60)
    gw.start()
    qemu_io(gw.uri("vol0"), "read -P 0x42 0 64M")
    got = read_export(gw, 0, 128 * MIB, "scratch")
    old_block = b"\x11" * BLOCK
    mixed = [
        i
        for i in range(0, len(new), BLOCK)
        if got[i : i + BLOCK] != new[i : i + BLOCK] and got[i : i + BLOCK] != old_block
    ]
    assert not mixed, f"{len(mixed)} blocks are neither old nor new, first at {mixed[0]}"
