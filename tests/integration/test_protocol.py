"""NBD protocol edge cases against a real ``sgw gateway serve``.

Well-formed traffic comes from libnbd (the ``nbd`` Python bindings); raw sockets produce
what libnbd refuses to send. The wire constants are written out from the NBD protocol
document rather than imported from the server, so a wrong constant there is caught here.
After every abuse a fresh libnbd connection must work and earlier data must be intact.
"""

from __future__ import annotations

import contextlib
import errno
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.fixtures.daemons import SGW, GatewayProcess

# --- wire constants (NBD doc/proto.md) ---------------------------------------------------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_UNKNOWN = (1 << 31) + 6
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) + 1

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10
MAX_PAYLOAD = 32 * MIB
BLOCK = 4096


# --- libnbd helpers -----------------------------------------------------------------------


def connect(gw: GatewayProcess, export: str = "vol0", *, structured: bool = True) -> nbd.NBD:
    """A libnbd handle connected to ``export`` over the unix socket, with base:allocation."""
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(gw.uri(export))
    return h


def close(h: nbd.NBD) -> None:
    """Disconnects politely if the connection is still up (the handle is freed by GC)."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def pattern(seed: int, n: int) -> bytes:
    """Deterministic incompressible bytes with no zero byte (so they can never pass as zeroes)."""
    raw = random.Random(seed).randbytes(n)
    return raw.translate(bytes([b or 0xA5 for b in range(256)]))


def write_known(gw: GatewayProcess, chunks: dict[int, bytes], export: str = "vol0") -> None:
    """Writes and flushes ``{offset: data}``."""
    h = connect(gw, export)
    try:
        for off, data in chunks.items():
            h.pwrite(data, off)
        h.flush()
    finally:
        close(h)


def assert_intact(gw: GatewayProcess, chunks: dict[int, bytes], export: str = "vol0") -> None:
    """A fresh libnbd connection works and reads back exactly ``{offset: data}``."""
    assert gw.alive(), f"gateway died: {gw.log_text()}"
    h = connect(gw, export)
    try:
        for off, data in chunks.items():
            got = h.pread(len(data), off)
            assert got == data, f"data at {off} changed"
    finally:
        close(h)


def extents(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int, int]]:
    """``(offset, length, flags)`` of base:allocation covering exactly the range."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        got: list[tuple[int, int]] = []

        def cb(
            meta: str, off: int, entries: list[int], err: object, got: list[tuple[int, int]] = got
        ) -> int:
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(zip(entries[0::2], entries[1::2], strict=True))
            return 0

        h.block_status(end - pos, pos, cb)
        assert got, f"block status at {pos} described nothing"
        for n, flags in got:
            assert n > 0, f"zero-length extent at {pos}"
            if pos >= end:
                break
            out.append((pos, min(n, end - pos), flags))
            pos += n
    return out


def assert_status_truthful(
    h: nbd.NBD, model: bytes | bytearray, base: int = 0
) -> list[tuple[int, int, int]]:
    """Block status never claims ZERO for bytes that are not zero (model: expected bytes)."""
    exts = extents(h, base, len(model))
    for off, n, flags in exts:
        if flags & nbd.STATE_ZERO:
            chunk = model[off - base : off - base + n]
            assert chunk.count(0) == n, (
                f"extent {off}+{n} reported flags {flags} (ZERO) but holds data at "
                f"{off + next(i for i, b in enumerate(chunk) if b)}"
            )
    return exts


def flags_at(exts: list[tuple[int, int, int]], offset: int, length: int) -> set[int]:
    """The set of flag values reported anywhere in ``[offset, offset+length)``."""
    return {f for o, n, f in exts if o < offset + length and o + n > offset}


def wait_destaged(gw: GatewayProcess, volume: str, chunks: dict[int, bytes], timeout: float = 20):
    """Waits until the volume file itself holds ``chunks`` (the destager moved them)."""
    path = gw.data_dir / "volumes" / f"{volume}.img"
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            ok = True
            for off, data in chunks.items():
                f.seek(off)
                if f.read(len(data)) != data:
                    ok = False
                    break
        if ok:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"destager did not move the data to {path} within {timeout}s")
        time.sleep(0.1)


# --- raw socket helpers -----------------------------------------------------------------


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_connect(gw: GatewayProcess) -> tuple[socket.socket, int]:
    """Connects and reads the greeting; returns the socket and the handshake flags."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(gw.sock)
    hello = recv_exact(s, 18)
    assert hello[:8] == NBDMAGIC
    magic, hflags = struct.unpack(">QH", hello[8:])
    assert magic == IHAVEOPT, "server must speak newstyle"
    assert hflags & FLAG_FIXED_NEWSTYLE
    return s, hflags


def send_option(s: socket.socket, option: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def recv_option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, option, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
    return option, rtype, recv_exact(s, length)


def raw_go(
    gw: GatewayProcess, export: str = "vol0", *, structured: bool = False
) -> tuple[socket.socket, int, int]:
    """A raw connection in transmission phase: returns socket, export size, flags."""
    s, _ = raw_connect(gw)
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    if structured:
        send_option(s, OPT_STRUCTURED_REPLY)
        option, rtype, _ = recv_option_reply(s)
        assert (option, rtype) == (OPT_STRUCTURED_REPLY, REP_ACK)
    name = export.encode()
    send_option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = tflags = -1
    while True:
        option, rtype, payload = recv_option_reply(s)
        assert option == OPT_GO
        if rtype == REP_ACK:
            break
        assert rtype == REP_INFO, f"GO failed: {rtype:#x} {payload!r}"
        if struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
            _, size, tflags = struct.unpack(">HQH", payload)
    assert size >= 0, "GO succeeded without NBD_INFO_EXPORT"
    return s, size, tflags


def request(
    cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 1, flags: int = 0
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def recv_reply(s: socket.socket, reads: dict[int, int] | None = None) -> tuple[int, int, bytes]:
    """One complete reply: ``(cookie, error, data)``; ``reads`` maps the cookies of READ
    requests to their lengths (a simple reply carries no length of its own)."""
    reads = reads or {}
    (magic,) = struct.unpack(">I", recv_exact(s, 4))
    if magic == SIMPLE_REPLY_MAGIC:
        error, cookie = struct.unpack(">IQ", recv_exact(s, 12))
        n = reads.get(cookie, 0)
        data = recv_exact(s, n) if n and not error else b""
        return cookie, error, data
    assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
    body = bytearray()
    error = 0
    while True:
        rflags, rtype, cookie, length = struct.unpack(">HHQI", recv_exact(s, 16))
        payload = recv_exact(s, length)
        if rtype == REPLY_TYPE_OFFSET_DATA:
            body += payload[8:]  # the callers' reads fit one chunk
        elif rtype & (1 << 15):
            (error,) = struct.unpack_from(">I", payload)
        if rflags & REPLY_FLAG_DONE:
            return cookie, error, bytes(body) if not error else b""


def send_quietly(s: socket.socket, data: bytes) -> None:
    """Sends what the server may refuse to read (it may already have reset the connection)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def assert_closed_by_server(s: socket.socket, timeout: float = 10.0) -> None:
    """The server closes (or resets) the connection without being asked to."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(65536):
                return
    except ConnectionResetError:
        return
    except TimeoutError:
        pass
    pytest.fail("the server kept a connection open after a protocol violation")


@pytest.fixture
def seeded(gateway: GatewayProcess) -> dict[int, bytes]:
    """Data written (and flushed) before the abuse; must survive it."""
    chunks = {
        0: pattern(1, 3 * BLOCK),
        5 * MIB + 123: pattern(2, 70000),
        GIB - 777: pattern(3, 777),
    }
    write_known(gateway, chunks)
    return chunks


@pytest.fixture
def two_volumes(gateway_factory: type[GatewayProcess], tmp_path: Path) -> GatewayProcess:
    """A gateway whose first volume is not first in alphabetical order."""
    return gateway_factory(tmp_path / "gw2", ["zeta:64M", "alpha:128M"]).start()


# --- errors from well-formed clients --------------------------------------------------------


def test_read_out_of_range_is_einval(gateway: GatewayProcess, seeded: dict[int, bytes]) -> None:
    h = connect(gateway)
    h.set_strict_mode(0)  # let libnbd send what it would refuse
    for count, offset in [(4096, GIB - 100), (1, GIB), (512, 2 * GIB), (MAX_PAYLOAD + 1, 0)]:
        with pytest.raises(nbd.Error) as exc:
            h.pread(count, offset)
        assert exc.value.errnum == errno.EINVAL, (count, offset, exc.value)
    # The connection is still in sync: the last bytes of the export read fine.
    assert h.pread(777, GIB - 777) == seeded[GIB - 777]
    assert len(h.pread(MAX_PAYLOAD, 0)) == MAX_PAYLOAD
    close(h)
    assert_intact(gateway, seeded)


def test_write_past_the_end_is_enospc_and_writes_nothing(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    h = connect(gateway)
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"\xee" * 8192, GIB - 4096)
    assert exc.value.errnum == errno.ENOSPC
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"\xee", GIB)
    assert exc.value.errnum == errno.ENOSPC
    for op in (h.zero, h.trim):
        with pytest.raises(nbd.Error) as exc:
            op(8192, GIB - 4096)
        assert exc.value.errnum in (errno.ENOSPC, errno.EINVAL)
    # A rejected request changes nothing, not even the part that was in range.
    assert h.pread(777, GIB - 777) == seeded[GIB - 777]
    close(h)
    assert_intact(gateway, seeded)


def test_bad_command_flags_are_einval_and_write_nothing(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    h = connect(gateway)
    h.set_strict_mode(0)
    for name, op in [
        ("read+NO_HOLE", lambda: h.pread(100, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("write+NO_HOLE", lambda: h.pwrite(b"\xee" * 100, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("trim+FAST_ZERO", lambda: h.trim(BLOCK, 0, nbd.CMD_FLAG_FAST_ZERO)),
        ("block_status+FUA", lambda: h.block_status(BLOCK, 0, lambda *a: 0, nbd.CMD_FLAG_FUA)),
    ]:
        with pytest.raises(nbd.Error) as exc:
            op()
        assert exc.value.errnum == errno.EINVAL, name
    assert h.pread(3 * BLOCK, 0) == seeded[0]
    close(h)
    assert_intact(gateway, seeded)


def test_zero_length_requests_keep_the_connection_usable(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    """Zero-length requests are legal on the wire (the protocol leaves the outcome to the
    server: success or an error); either way the reply must be well formed."""
    for structured in (True, False):
        for name, op in [
            ("write", lambda h: h.pwrite(b"", 4097)),
            ("zero", lambda h: h.zero(0, 4097)),
            ("trim", lambda h: h.trim(0, 4097)),
            ("read", lambda h: h.pread(0, 4097)),
            ("block status", lambda h: h.block_status(0, 4097, lambda *a: 0)),
        ]:
            if name == "block status" and not structured:
                continue
            h = connect(gateway, structured=structured)
            h.set_strict_mode(0)
            try:
                result = op(h)
                assert result in (None, b"", bytearray()), name
            except nbd.Error as exc:
                # A server error is fine; a malformed reply (libnbd kills the handle) is not.
                assert exc.errnum == errno.EINVAL, f"{name} (structured={structured}): {exc}"
            try:
                assert h.pread(3 * BLOCK, 0) == seeded[0]
            except nbd.Error as exc:
                pytest.fail(f"{name} (structured={structured}) broke the connection: {exc}")
            close(h)
    assert_intact(gateway, seeded)


def test_structured_replies_off_reads_and_writes(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    h = connect(gateway, structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert not h.can_df()
    chunks = {7 * MIB + 1: pattern(10, 200_000), 9 * MIB: pattern(11, 4 * MIB), 20 * MIB + 5: b"x"}
    for off, data in chunks.items():
        h.pwrite(data, off)
    h.pwrite(pattern(12, 5000), 30 * MIB + 100, nbd.CMD_FLAG_FUA)
    chunks[30 * MIB + 100] = pattern(12, 5000)
    for off, data in chunks.items():
        assert h.pread(len(data), off) == data
    # An error to a read is a simple reply without payload; the stream stays in sync.
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:
        h.pread(8192, GIB - 4096)
    assert exc.value.errnum == errno.EINVAL
    assert h.pread(len(seeded[0]), 0) == seeded[0]
    h.zero(1000, 7 * MIB + 1)
    assert h.pread(1000, 7 * MIB + 1) == bytes(1000)
    h.flush()
    close(h)
    assert_intact(gateway, {**seeded, **chunks, 7 * MIB + 1: bytes(1000)})


# --- negotiation --------------------------------------------------------------------------


def test_unknown_export_with_go_fails_cleanly(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    for _ in range(3):
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(gateway.uri("no-such-volume"))
    # In option mode the failure leaves negotiation open: the client can pick another export.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(gateway.uri("no-such-volume"))
    with pytest.raises(nbd.Error):
        h.opt_go()
    assert h.aio_is_negotiating()
    h.set_export_name("vol0")
    h.opt_go()
    assert h.get_size() == GIB
    assert h.pread(3 * BLOCK, 0) == seeded[0]
    close(h)
    assert_intact(gateway, seeded)


def test_opt_mode_list_info_meta_context_go(two_volumes: GatewayProcess) -> None:
    gw = two_volumes
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(gw.uri(""))
    assert h.aio_is_negotiating()

    exports: list[tuple[str, str]] = []
    n = h.opt_list(lambda name, desc: exports.append((name, desc)) or 0)
    assert n == 2
    assert [name for name, _ in exports] == ["zeta", "alpha"]

    # INFO about the default export "": the first configured volume, by its real name.
    h.opt_info()
    assert h.get_size() == 64 * MIB
    assert h.get_canonical_export_name() == "zeta"
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD

    h.set_export_name("alpha")
    h.opt_info()
    assert h.get_size() == 128 * MIB
    assert h.get_canonical_export_name() == "alpha"

    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    assert h.aio_is_negotiating()

    h.set_export_name("alpha")
    contexts: list[str] = []
    assert h.opt_list_meta_context(lambda name: contexts.append(name) or 0) >= 1
    assert nbd.CONTEXT_BASE_ALLOCATION in contexts
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    only: list[str] = []
    assert h.opt_list_meta_context(lambda name: only.append(name) or 0) == 1
    assert only == [nbd.CONTEXT_BASE_ALLOCATION]

    h.opt_go()
    assert h.aio_is_ready()
    assert h.get_size() == 128 * MIB
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"alpha!", 4096)
    assert h.pread(6, 4096) == b"alpha!"
    assert extents(h, 0, BLOCK)  # block status works on the negotiated context
    close(h)

    a = nbd.NBD()
    a.set_opt_mode(True)
    a.connect_uri(gw.uri("alpha"))
    a.opt_abort()
    assert a.aio_is_closed()
    # The other export was not touched; alpha kept its data.
    assert_intact(gw, {4096: b"alpha!"}, "alpha")
    assert_intact(gw, {4096: bytes(6)}, "zeta")


def test_default_export_serves_first_volume_with_block_status(
    two_volumes: GatewayProcess,
) -> None:
    """Export "" is the first volume, for data and for base:allocation alike."""
    gw = two_volumes
    write_known(gw, {MIB: pattern(20, 8192)}, "zeta")
    h = connect(gw, "")
    assert h.get_size() == 64 * MIB
    assert h.pread(8192, MIB) == pattern(20, 8192)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    exts = extents(h, 0, 2 * MIB)  # must not fail with EINVAL
    assert flags_at(exts, MIB, 8192) == {0}
    assert flags_at(exts, 0, 512 * KIB) <= {nbd.STATE_ZERO, nbd.STATE_ZERO | nbd.STATE_HOLE}
    close(h)


# --- block status ----------------------------------------------------------------------------


def test_block_status_after_write_trim_zero(gateway: GatewayProcess) -> None:
    h = connect(gateway)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    region = 4 * MIB
    model = bytearray(region)

    def write(off: int, data: bytes, flags: int = 0) -> None:
        h.pwrite(data, off, flags)
        model[off : off + len(data)] = data

    # A never-written volume is all holes that read as zeroes.
    assert {f for _, _, f in extents(h, 0, GIB)} == {nbd.STATE_HOLE | nbd.STATE_ZERO}

    write(0, pattern(30, region))  # everything data first
    h.trim(256 * KIB, 256 * KIB)  # aligned trim: holes
    model[256 * KIB : 512 * KIB] = bytes(256 * KIB)
    h.zero(256 * KIB, 512 * KIB, nbd.CMD_FLAG_NO_HOLE)  # zeroes, allocated
    model[512 * KIB : 768 * KIB] = bytes(256 * KIB)
    h.zero(2 * MIB, MIB)  # large punching zero (an interval, not per-block entries)
    model[MIB : 3 * MIB] = bytes(2 * MIB)
    write(MIB + 5000, pattern(31, 10000))  # data inside the zeroed range, unaligned
    h.zero(100, 3 * MIB + 4000)  # unaligned zero: partial blocks stay data
    model[3 * MIB + 4000 : 3 * MIB + 4100] = bytes(100)
    write(3 * MIB + 8192, bytes(4096))  # data that happens to be zero: either answer is fine
    write(3 * MIB + 12288, b"\x01", nbd.CMD_FLAG_FUA)

    for phase in ("in the log", "destaged"):
        assert h.pread(region, 0) == model, phase
        exts = assert_status_truthful(h, model)
        assert flags_at(exts, 0, 256 * KIB) == {0}, phase
        assert flags_at(exts, 256 * KIB, 256 * KIB) == {nbd.STATE_HOLE | nbd.STATE_ZERO}, phase
        for f in flags_at(exts, 2 * MIB, MIB):  # punching zero: zeroes, a hole allowed
            assert f & nbd.STATE_ZERO, phase
        assert flags_at(exts, MIB + 5000, 10000) == {0}, phase
        assert flags_at(exts, 3 * MIB + 12288, 1) == {0}, phase
        beyond = extents(h, region, 64 * MIB)
        assert flags_at(beyond, region, 64 * MIB) == {nbd.STATE_HOLE | nbd.STATE_ZERO}, phase
        # REQ_ONE: a single extent, within the range asked for.
        one: list[list[int]] = []

        def first(
            meta: str, off: int, entries: list[int], err: object, one: list[list[int]] = one
        ) -> int:
            one.append(list(entries))
            return 0

        h.block_status(MIB, 0, first, nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1 and len(one[0]) == 2, one
        assert 0 < one[0][0] <= MIB and one[0][1] == 0, one
        wait_destaged(gateway, "vol0", {0: bytes(model)})
    close(h)


def test_block_status_never_claims_zero_for_data_random_ops(gateway: GatewayProcess) -> None:
    """A model-checked mix of writes, trims and zeroes; after each few operations block
    status must be truthful and reads must match, both from the log and once destaged."""
    rng = random.Random(2024)
    size = 8 * MIB
    model = bytearray(size)
    h = connect(gateway)
    for step in range(160):
        op = rng.random()
        off = rng.randrange(size - 1)
        if op < 0.5:
            n = min(rng.choice([1, 100, 4096, 5000, 65536, 300_000]), size - off)
            if rng.random() < 0.5:  # block aligned
                off &= ~(BLOCK - 1)
                n = max(BLOCK, n & ~(BLOCK - 1))
                n = min(n, size - off)
            data = pattern(1000 + step, n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[off : off + n] = data
        elif op < 0.75:
            n = min(rng.choice([4096, 10000, 1 * MIB, 3 * MIB + 17]), size - off)
            h.trim(n, off)
            # After TRIM the contents are the server's choice: old bytes or zeroes.
            got = h.pread(n, off)
            for i in range(0, n, 512):
                j = min(i + 512, n)
                seg, old = got[i:j], model[off + i : off + j]
                assert (
                    seg == old
                    or seg.count(0) == len(seg)
                    or all(a in (b, 0) for a, b in zip(seg, old, strict=True))
                ), f"trim at {off}+{n} produced bytes that are neither old nor zero"
            model[off : off + n] = got
        else:
            n = min(rng.choice([1, 4096, 9000, 2 * MIB, 5 * MIB]), size - off)
            flags = rng.choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO])
            h.zero(n, off, flags)
            model[off : off + n] = bytes(n)
        if step % 10 == 9:
            assert_status_truthful(h, model)
            probe = rng.randrange(size - 70000)
            assert h.pread(70000, probe) == model[probe : probe + 70000], f"step {step}"
    assert h.pread(size, 0) == model
    assert_status_truthful(h, model)
    wait_destaged(gateway, "vol0", {0: bytes(model)})
    assert h.pread(size, 0) == model
    assert_status_truthful(h, model)
    close(h)


# --- concurrency ------------------------------------------------------------------------------


def test_many_requests_in_flight_on_one_connection(gateway: GatewayProcess) -> None:
    h = connect(gateway)
    rng = random.Random(99)
    # 64 disjoint regions, one per MiB, with unaligned starts and assorted lengths.
    regions = [
        (i * MIB + rng.randrange(BLOCK), rng.choice([1, 511, 4096, 70000, 300_001, 900_000]))
        for i in range(64)
    ]
    datas = [pattern(500 + i, n) for i, (_, n) in enumerate(regions)]

    def run(cookies: list[int]) -> None:
        assert h.aio_in_flight() > 1, "requests were not actually in flight together"
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)  # raises if the command failed

    # Phase 1: 48 writes (some FUA, whose replies come later) and flushes, all outstanding.
    bufs = [nbd.Buffer.from_bytearray(bytearray(d)) for d in datas]
    cookies = []
    for i in range(48):
        flags = nbd.CMD_FLAG_FUA if i % 4 == 0 else 0
        cookies.append(h.aio_pwrite(bufs[i], regions[i][0], flags=flags))
        if i % 16 == 15:
            cookies.append(h.aio_flush())
    run(cookies)

    # Phase 2: reads of the written regions interleaved with writes of the remaining ones.
    reads = []
    cookies = []
    for i in range(48):
        rb = nbd.Buffer(regions[i][1])
        reads.append((i, rb))
        cookies.append(h.aio_pread(rb, regions[i][0]))
        if i >= 32:
            j = i + 16
            cookies.append(h.aio_pwrite(bufs[j], regions[j][0]))
    run(cookies)
    for i, rb in reads:
        assert rb.to_bytearray() == datas[i], f"region {i} read back wrong"

    # Phase 3: everything read back at once, again with many outstanding.
    reads = [(i, nbd.Buffer(n)) for i, (_, n) in enumerate(regions)]
    run([h.aio_pread(rb, regions[i][0]) for i, rb in reads])
    for i, rb in reads:
        assert rb.to_bytearray() == datas[i], f"region {i} read back wrong"
    close(h)


def test_flush_on_one_connection_covers_writes_of_another(gateway: GatewayProcess) -> None:
    a = connect(gateway)
    b = connect(gateway)
    assert a.can_multi_conn()
    chunks = {MIB * 3 + 17: pattern(40, 500_000), 100 * MIB: pattern(41, 4 * BLOCK)}
    for off, data in chunks.items():
        a.pwrite(data, off)  # acknowledged, not yet durable
    a.zero(2 * BLOCK, 100 * MIB + BLOCK)
    old = chunks[100 * MIB]
    chunks[100 * MIB] = old[:BLOCK] + bytes(2 * BLOCK) + old[3 * BLOCK :]
    for off, data in chunks.items():  # multi-conn: b sees what a completed
        assert b.pread(len(data), off) == data
    b.flush()  # ...and its flush makes a's completed writes durable too
    gateway.kill()  # no chance to flush anything itself
    gateway.start()
    assert_intact(gateway, chunks)


def test_fua_writes_survive_kill_without_flush(gateway: GatewayProcess) -> None:
    h = connect(gateway)
    write_known(gateway, {50 * MIB: pattern(49, 3 * BLOCK)})
    data = pattern(50, 123_457)
    h.pwrite(data, 10 * MIB + 3, nbd.CMD_FLAG_FUA)
    h.zero(BLOCK, 50 * MIB + BLOCK, nbd.CMD_FLAG_FUA)
    gateway.kill()
    gateway.start()
    expect = pattern(49, 3 * BLOCK)[:BLOCK] + bytes(BLOCK) + pattern(49, 3 * BLOCK)[2 * BLOCK :]
    assert_intact(gateway, {10 * MIB + 3: data, 50 * MIB: expect})


# --- raw-socket abuse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        random.Random(5).randbytes(4096),
        struct.pack(">I", FLAG_FIXED_NEWSTYLE) + b"\x00" * 8 + bytes(200),  # bad opt magic
    ],
    ids=["http", "random", "bad-option-magic"],
)
def test_garbage_instead_of_handshake(
    gateway: GatewayProcess, seeded: dict[int, bytes], garbage: bytes
) -> None:
    s, _ = raw_connect(gateway)
    send_quietly(s, garbage)
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)


@pytest.mark.parametrize(
    "client_flags",
    [0, FLAG_NO_ZEROES, FLAG_FIXED_NEWSTYLE | 1 << 5, 0xFFFFFFFF],
    ids=["plain-newstyle", "no-zeroes-only", "unknown-bit", "all-bits"],
)
def test_wrong_client_flags_close_the_connection(
    gateway: GatewayProcess, seeded: dict[int, bytes], client_flags: int
) -> None:
    s, _ = raw_connect(gateway)
    s.sendall(struct.pack(">I", client_flags))
    send_quietly(s, struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)


def test_option_with_huge_length_closes_without_waiting(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    for length in (0xFFFFFFFF, 16 * MIB):
        s, _ = raw_connect(gateway)
        s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        # The header alone: the server must not wait for (or buffer) gigabytes of data.
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, length))
        assert_closed_by_server(s)
        s.close()
        # It closed on reading the header, for its length (not on an idle timeout, nor
        # after data that was never sent): the reason it logged names the length.
        assert f"option data of {length} bytes is too large" in gateway.log_text()
    assert_intact(gateway, seeded)


def test_unknown_option_is_unsupported_and_negotiation_goes_on(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    s, _ = raw_connect(gateway)
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    send_option(s, 0x4242, b"whatever")
    option, rtype, _ = recv_option_reply(s)
    assert (option, rtype) == (0x4242, REP_ERR_UNSUP)
    send_option(s, OPT_LIST)
    names = []
    while True:
        option, rtype, payload = recv_option_reply(s)
        assert option == OPT_LIST
        if rtype == REP_ACK:
            break
        assert rtype == REP_SERVER
        (n,) = struct.unpack_from(">I", payload)
        names.append(payload[4 : 4 + n].decode())
    assert names == ["vol0"]
    name = b"nope"
    send_option(s, OPT_GO, struct.pack(">I", len(name)) + name + b"\x00\x00")
    option, rtype, _ = recv_option_reply(s)
    assert (option, rtype) == (OPT_GO, REP_ERR_UNKNOWN)
    send_option(s, OPT_ABORT)
    option, rtype, _ = recv_option_reply(s)
    assert (option, rtype) == (OPT_ABORT, REP_ACK)
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)


def test_bad_request_magic_closes_the_connection(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    s, _, _ = raw_go(gateway)
    bad = struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_WRITE, 1, 0, 4096) + b"\xee" * 4096
    send_quietly(s, bad)
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_unknown_command_is_einval_and_connection_usable(
    gateway: GatewayProcess, seeded: dict[int, bytes], structured: bool
) -> None:
    s, size, _ = raw_go(gateway, structured=structured)
    assert size == GIB
    for cmd in (42, 0xFFFF):
        s.sendall(request(cmd, 0, 0, cookie=0xC0FFEE00 + cmd))
        cookie, error, _ = recv_reply(s)
        assert cookie == 0xC0FFEE00 + cmd
        assert error == errno.EINVAL
    s.sendall(request(CMD_READ, 0, 3 * BLOCK, cookie=7))
    cookie, error, data = recv_reply(s, {7: 3 * BLOCK})
    assert (cookie, error) == (7, 0)
    assert data == seeded[0]
    s.sendall(request(CMD_DISC))
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)


def test_structured_read_replies_on_the_wire(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    s, _, tflags = raw_go(gateway, structured=True)
    assert tflags & TFLAG_SEND_DF
    s.sendall(request(CMD_READ, 5 * MIB + 123, 70000, cookie=11))
    magic, rflags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (magic, cookie) == (STRUCTURED_REPLY_MAGIC, 11)
    assert rtype == REPLY_TYPE_OFFSET_DATA and rflags & REPLY_FLAG_DONE
    payload = recv_exact(s, length)
    assert struct.unpack_from(">Q", payload)[0] == 5 * MIB + 123
    assert payload[8:] == seeded[5 * MIB + 123]
    s.sendall(request(CMD_READ, GIB - 10, 20, cookie=12))
    magic, rflags, rtype, cookie, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (magic, cookie, rtype) == (STRUCTURED_REPLY_MAGIC, 12, REPLY_TYPE_ERROR)
    assert rflags & REPLY_FLAG_DONE
    payload = recv_exact(s, length)
    error, msglen = struct.unpack_from(">IH", payload)
    assert error == errno.EINVAL and length == 6 + msglen
    s.close()
    assert_intact(gateway, seeded)


@pytest.mark.parametrize("sent", [100 * KIB, MIB - 1, 0], ids=["100KiB", "all-but-1", "header"])
def test_truncated_write_never_reaches_the_volume(
    gateway: GatewayProcess, seeded: dict[int, bytes], sent: int
) -> None:
    offset = 5 * MIB + 123 - 1000  # over seeded data, unaligned
    h = connect(gateway)
    before = h.pread(MIB, offset)
    close(h)
    s, _, _ = raw_go(gateway)
    s.sendall(request(CMD_WRITE, offset, MIB, cookie=3))
    s.sendall(b"\xee" * sent)
    s.close()  # disconnect mid-payload
    time.sleep(0.3)
    assert_intact(gateway, {**seeded, offset: before})
    # Not in the log either: a clean restart replays and destages everything it holds.
    assert gateway.stop() == 0
    gateway.start()
    assert_intact(gateway, {**seeded, offset: before})


def test_write_over_32mib_closes_the_connection(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    s, _, _ = raw_go(gateway)
    s.sendall(request(CMD_WRITE, 0, MAX_PAYLOAD + 1, cookie=5))
    send_quietly(s, b"\xee" * MIB)
    assert_closed_by_server(s)
    s.close()
    assert_intact(gateway, seeded)
    # Exactly the maximum is served.
    h = connect(gateway)
    big = pattern(60, MAX_PAYLOAD)
    h.pwrite(big, 64 * MIB + 1)
    assert h.pread(MAX_PAYLOAD, 64 * MIB + 1) == big
    close(h)
    assert_intact(gateway, seeded)


@pytest.mark.parametrize("no_zeroes", [False, True], ids=["zero-padded", "no-zeroes"])
def test_export_name_option_old_style_finish(two_volumes: GatewayProcess, no_zeroes: bool) -> None:
    gw = two_volumes
    for export, size in [("alpha", 128 * MIB), ("", 64 * MIB)]:
        s, _ = raw_connect(gw)
        s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))
        send_option(s, OPT_EXPORT_NAME, export.encode())
        got_size, tflags = struct.unpack(">QH", recv_exact(s, 10))
        if not no_zeroes:
            assert recv_exact(s, 124) == bytes(124)
        assert got_size == size
        want = (
            TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
        )
        assert tflags & want == want
        assert not tflags & (TFLAG_READ_ONLY | TFLAG_SEND_DF)  # DF needs structured replies
        data = pattern(70 + len(export), 5000)
        s.sendall(request(CMD_WRITE, 12345, len(data), cookie=1) + data)
        s.sendall(request(CMD_READ, 12345, len(data), cookie=2))
        s.sendall(request(CMD_FLUSH, cookie=3))
        replies = {}
        for _ in range(3):
            cookie, error, payload = recv_reply(s, {2: len(data)})
            replies[cookie] = (error, payload)
        assert replies[1][0] == 0 and replies[3][0] == 0
        assert replies[2] == (0, data)
        s.sendall(request(CMD_DISC))
        assert_closed_by_server(s)
        s.close()
        assert_intact(gw, {12345: data}, export or "zeta")
    # EXPORT_NAME has no error reply: an unknown name ends the session, the server stays up.
    s, _ = raw_connect(gw)
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    send_option(s, OPT_EXPORT_NAME, b"missing")
    assert_closed_by_server(s)
    s.close()
    assert gw.alive()
    assert_intact(gw, {12345: pattern(70 + 5, 5000)}, "alpha")


def test_idle_half_open_connection_does_not_block_others(
    gateway: GatewayProcess, seeded: dict[int, bytes]
) -> None:
    s, _ = raw_connect(gateway)  # greeting read, never answered
    s2, _, _ = raw_go(gateway)
    s2.sendall(request(CMD_WRITE, 0, 10, cookie=1))
    s2.sendall(b"\xee" * 5)  # a write stuck mid-payload
    assert_intact(gateway, seeded)
    s.close()
    s2.close()


# --- command line -----------------------------------------------------------------------------


# ``{d}`` stands for a data directory, ``{cfg}`` for a config file holding CONFIGS[case].
BAD_ARGS: dict[str, list[str]] = {
    "volume-size": ["--data-dir", "{d}", "--volume", "vol0:abc"],
    "volume-no-size": ["--data-dir", "{d}", "--volume", "vol0"],
    "volume-name": ["--data-dir", "{d}", "--volume", "bad name!:1G"],
    "volume-unaligned": ["--data-dir", "{d}", "--volume", "vol0:1000"],
    "nbd-address": ["--data-dir", "{d}", "--volume", "vol0:1G", "--nbd", "foo"],
    "nbd-port": ["--data-dir", "{d}", "--volume", "vol0:1G", "--nbd", "tcp:127.0.0.1:99999"],
    "no-data-dir": ["--volume", "vol0:1G"],
    "log-size": ["--data-dir", "{d}", "--volume", "vol0:1G", "--log-size", "1M"],
    "log-level": ["--data-dir", "{d}", "--volume", "vol0:1G", "--log-level", "chatty"],
    "unknown-flag": ["--data-dir", "{d}", "--volume", "vol0:1G", "--frobnicate"],
    "missing-value": ["--data-dir", "{d}", "--volume"],
    "no-config-file": ["--config", "{d}.toml"],
}
_VOL = b'[[volumes]]\nname = "v"\nsize = "1G"\n'
CONFIGS: dict[str, bytes] = {
    "toml-syntax": b"[[volumes]\nname = \n",
    "toml-unknown-key": _VOL + b'colour = "blue"\n',
    "toml-volume-size": b'[[volumes]]\nname = "v"\nsize = "big"\n',
    "toml-listen-type": _VOL + b"[nbd]\nlisten = 5\n",
    "toml-destage-range": _VOL + b"[destage]\nstart_fill = 2\n",
    "toml-not-utf8": _VOL + b'log_level = "\xff\xfe"\n',
}


@pytest.mark.parametrize("case", [*BAD_ARGS, *CONFIGS])
def test_bad_command_line_or_config_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    d = tmp_path / "d"
    if case in CONFIGS:
        cfg = tmp_path / "gateway.toml"
        cfg.write_bytes(f'data_dir = "{d}"\n'.encode() + CONFIGS[case])
        args = ["--config", str(cfg)]
    else:
        args = [a.format(d=d) for a in BAD_ARGS[case]]
    try:
        proc = subprocess.run(
            [SGW, "gateway", "serve", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sgw gateway serve {args} started instead of refusing")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert "error" in lines[0]
    assert proc.stdout == ""
    assert not d.exists(), "a refused configuration must not create state"


@pytest.mark.parametrize("case", ["data-dir-is-a-file", "bad-listen-host", "bad-socket-dir"])
def test_unusable_path_or_address_fails_in_one_line(tmp_path: Path, case: str) -> None:
    """Values only found wrong at start-up (a data directory that is a file, an address
    that cannot be bound) still give one line on stderr and a failure status, no traceback."""
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    args = {
        "data-dir-is-a-file": ["--data-dir", str(afile), "--volume", "v:64M"],
        "bad-listen-host": [
            "--data-dir",
            str(tmp_path / "d"),
            "--volume",
            "v:64M",
            "--nbd",
            "tcp:999.1.1.1:80",
        ],
        "bad-socket-dir": [
            "--data-dir",
            str(tmp_path / "d"),
            "--volume",
            "v:64M",
            "--nbd",
            "unix:/proc/x/s.sock",
        ],
    }[case]
    try:
        proc = subprocess.run(
            [SGW, "gateway", "serve", *args, "--log-size", "129M"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sgw gateway serve {args} started instead of refusing")
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if '"level": "info"' not in line]
    assert len(errors) == 1, f"expected one error line, got:\n{proc.stderr}"


# --- shutdown -----------------------------------------------------------------------------------


def test_sigterm_with_requests_in_flight_exits_0(gateway: GatewayProcess) -> None:
    h = connect(gateway)
    done: dict[int, int] = {}
    writes: dict[int, tuple[int, bytes]] = {}
    bufs = []
    for i in range(40):
        data = pattern(800 + i, MIB)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append(buf)
        off = (300 + 2 * i) * MIB + 512

        def completed(err: Any, i: int = i) -> int:
            done[i] = int(getattr(err, "value", err))
            return 1

        flags = nbd.CMD_FLAG_FUA if i % 2 else 0
        h.aio_pwrite(buf, off, completion=completed, flags=flags)
        writes[i] = (off, data)
    h.aio_flush(completion=lambda err: 1)
    # Let some of it reach the server, then stop it while the rest is in flight.
    while not done:
        h.poll(1)
    assert len(done) < len(writes), "everything finished before SIGTERM could interrupt"
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    try:
        while h.aio_in_flight() > 0:
            h.poll(1)
    except nbd.Error:
        pass  # the server hung up on what it had not received
    assert gateway.stop() == 0  # already stopping; SIGTERM again is harmless
    ok = [i for i, err in done.items() if err == 0]
    assert ok, "no write completed"
    gateway.start()
    h = connect(gateway)
    for i in ok:
        off, data = writes[i]
        assert h.pread(len(data), off) == data, f"acknowledged write {i} lost in shutdown"
    close(h)


def test_sigterm_answers_what_it_received_then_exits_0(gateway: GatewayProcess) -> None:
    """Raw requests already on the wire when SIGTERM arrives: whatever the server answers is
    a success and durable, the connection then closes, and the daemon exits 0."""
    s, _, _ = raw_go(gateway)
    base = 600 * MIB
    blocks = {i: pattern(900 + i, BLOCK) for i in range(32)}
    wire = bytearray()
    for i, data in blocks.items():
        wire += request(CMD_WRITE, base + i * BLOCK, BLOCK, cookie=i + 1, flags=1) + data  # FUA
    wire += request(CMD_FLUSH, cookie=1000)
    s.sendall(wire)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    answered: dict[int, int] = {}
    s.settimeout(30)
    with contextlib.suppress(EOFError, ConnectionResetError):
        while True:
            cookie, error, _ = recv_reply(s)
            answered[cookie] = error
    s.close()
    assert gateway.stop() == 0
    assert all(err == 0 for err in answered.values()), answered
    gateway.start()
    assert_intact(gateway, {base + (c - 1) * BLOCK: blocks[c - 1] for c in answered if c != 1000})
