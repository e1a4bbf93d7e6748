"""Fuzzing the live daemon through a socket: garbage, mutated handshakes and requests; the
daemon keeps serving other connections and logs no error."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import Iterator

import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.daemons import GatewayProcess
from tests.fixtures.nbd_wire import (
    CMD_WRITE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    KEEP_SIZE,
    MIB,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REQUEST_MAGIC,
    VOL_SIZE,
    handshake_stream,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, bytes]]:
    """One daemon for every example; ``keep`` holds data written (and flushed) first."""
    gw = GatewayProcess(
        tmp_path_factory.mktemp("fuzz") / "gw", [f"vol0:{VOL_SIZE}", f"keep:{KEEP_SIZE}"]
    )
    gw.start()
    try:
        keep = random.Random(7).randbytes(KEEP_SIZE)
        h = nbd.NBD()
        h.connect_uri(gw.uri("keep"))
        h.pwrite(keep, 0)
        h.flush()
        h.shutdown()
        yield gw, keep
    finally:
        if gw.alive():
            gw.stop()


def request(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def valid_handshake(structured: bool, meta: bool, export_name: bool) -> bytes:
    out = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def opt(code: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", IHAVEOPT, code, len(data)) + data

    if structured:
        out += opt(OPT_STRUCTURED_REPLY)
        if meta:
            q = b"base:allocation"
            data = struct.pack(">I", 4) + b"vol0" + struct.pack(">II", 1, len(q)) + q
            out += opt(OPT_SET_META_CONTEXT, data)
    if export_name:
        return out + opt(OPT_EXPORT_NAME, b"vol0")
    return out + opt(OPT_GO, struct.pack(">I", 4) + b"vol0" + struct.pack(">H", 0))


@st.composite
def nbd_request(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from(range(8)) | st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0, 1, 2, 4, 8, 16]) | st.integers(0, 0xFFFF))
    offset = draw(
        st.integers(16 * MIB, 32 * MIB)
        | st.sampled_from([VOL_SIZE - 1, VOL_SIZE, VOL_SIZE + 4096, 2**63, 2**64 - 1])
        | st.integers(0, 2**64 - 1)
    )
    length = draw(
        st.integers(0, 20_000) | st.sampled_from([0, 1, 32 * MIB, 32 * MIB + 1, 2**32 - 1])
    )
    cookie = draw(st.integers(0, 2**64 - 1))
    raw = request(cmd, offset, length, flags, cookie)
    if cmd == CMD_WRITE:
        sent = length if length <= 20_000 else draw(st.integers(0, 1000))
        raw += draw(st.binary(min_size=min(sent, 64), max_size=min(sent, 64))).ljust(sent, b"w")
    return raw


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not out:
            break
        kind = draw(st.sampled_from(["flip", "byte", "cut", "insert", "dup"]))
        i = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            out[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[i : i + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=32))
        else:
            out[i:i] = out[i : i + draw(st.integers(1, 64))]
    return bytes(out)


@st.composite
def live_stream(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["garbage", "handshake", "requests", "requests", "requests"]))
    if kind == "garbage":
        return draw(st.binary(max_size=2000))
    if kind == "handshake":
        return draw(mutated(draw(handshake_stream())))
    hs = valid_handshake(draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    reqs = b"".join(draw(st.lists(nbd_request(), min_size=1, max_size=8)))
    if draw(st.booleans()):
        reqs += draw(st.binary(max_size=100))
    return hs + draw(mutated(reqs))


def drain(sock: socket.socket, limit: float) -> bool:
    """Reads until the server closes; False if it did not within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except OSError:  # reset by the server: closed too
            return True
    return False


def check_alive(gw: GatewayProcess, keep: bytes) -> None:
    assert gw.alive(), f"the daemon died: {gw.log_text()}"
    h = nbd.NBD()
    h.connect_uri(gw.uri("keep"))
    assert h.pread(KEEP_SIZE, 0) == keep
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(gw.uri("vol0"))
    h.pread(4096, 16 * MIB)  # vol0 still serves reads
    h.shutdown()


@settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=live_stream(), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_live_server_survives_garbage(
    daemon: tuple[GatewayProcess, bytes], stream: bytes, cuts: list[int]
) -> None:
    gw, keep = daemon
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(gw.sock)
        s.settimeout(5)
        sent = 0
        for edge in sorted({c for c in cuts if c < len(stream)} | {len(stream)}):
            try:
                s.sendall(stream[sent:edge])
            except OSError:  # the server hung up on us: fine
                break
            sent = edge
        # While this connection is still open (maybe in the middle of a request), others
        # are served.
        check_alive(gw, keep)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        assert drain(s, 10.0), "the server kept a connection open after the client's EOF"
    check_alive(gw, keep)


def test_live_server_logged_no_errors(daemon: tuple[GatewayProcess, bytes]) -> None:
    """Runs after the fuzzing: garbage gets warnings, never an error or a traceback."""
    gw, keep = daemon
    check_alive(gw, keep)
    assert gw.stderr_path is not None
    problems = [
        line
        for line in gw.stderr_path.read_text(errors="replace").splitlines()
        if not line.startswith("{") or json.loads(line).get("level") in ("error", "critical")
    ]
    assert not problems, f"the daemon logged errors under fuzzing: {problems[:5]}"
    assert gw.stop() == 0
