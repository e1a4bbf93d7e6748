"""Fuzzing: the sans-IO handshake state machine, and the live daemon through a socket.

The wire constants are written out from the NBD protocol document (doc/proto.md) rather
than imported from the server, so that a wrong constant there is caught here.
"""

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

from sgw.gateway.nbd.negotiation import ExportInfo, Negotiation
from tests.fixtures.daemons import GatewayProcess

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
KNOWN_OPTIONS = [1, 2, 3, 5, 6, 7, 8, 9, 10]

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
ERR_TYPES = {REP_ERR + i for i in range(1, 10)}
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3
MAX_OPTION_DATA = 64 * 1024  # the server's documented cap (closes the connection above it)

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

MIB = 1 << 20
VOL_SIZE = 64 * MIB
KEEP_SIZE = 4 * MIB

EXPORTS = {"vol0": ExportInfo("vol0", VOL_SIZE, "sgw volume vol0"), "": None}
EXPORTS[""] = EXPORTS["vol0"]


def lookup(name: str) -> ExportInfo | None:
    return EXPORTS.get(name)


def listing() -> list[ExportInfo]:
    return [ExportInfo("vol0", VOL_SIZE, "sgw volume vol0"), ExportInfo("keep", KEEP_SIZE)]


# -- strategies --------------------------------------------------------------------------

names = st.sampled_from(["vol0", "", "keep", "nope", "vol0\0", "v" * 5000]).map(str.encode) | (
    st.binary(max_size=12)
)
queries = st.lists(
    st.sampled_from([b"base:allocation", b"base:", b"qemu:dirty-bitmap:x", b""])
    | st.binary(max_size=8),
    max_size=3,
)


@st.composite
def info_go_data(draw: st.DrawFn) -> bytes:
    name = draw(names)
    reqs = draw(st.lists(st.integers(0, 5), max_size=4))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs))
    data += b"".join(struct.pack(">H", r) for r in reqs)
    return draw(st.sampled_from([data, data[:-1], data + b"x"]))


@st.composite
def meta_data(draw: st.DrawFn) -> bytes:
    name = draw(names)
    qs = draw(queries)
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs))
    data += b"".join(struct.pack(">I", len(q)) + q for q in qs)
    return draw(st.sampled_from([data, data[:-1], data + b"\0", data[:8]]))


@st.composite
def option(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from(KNOWN_OPTIONS) | st.integers(0, 2**32 - 1))
    if code in (OPT_INFO, OPT_GO):
        data = draw(info_go_data())
    elif code in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
        data = draw(meta_data())
    elif code == OPT_EXPORT_NAME:
        data = draw(names)
    else:
        data = draw(st.just(b"") | st.binary(max_size=16))
    magic = draw(st.just(IHAVEOPT) | st.integers(0, 2**64 - 1))
    length = draw(
        st.just(len(data)) | st.integers(0, 2**32 - 1) | st.integers(MAX_OPTION_DATA - 2, 2**17)
    )
    body = data if length >= len(data) else data[:length]
    return struct.pack(">QII", magic, code, length) + body


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([1, 3, 0, 2, 7]) | st.integers(0, 2**32 - 1))
    opts = draw(st.lists(option(), max_size=8))
    return struct.pack(">I", flags) + b"".join(opts)


streams = handshake_stream() | st.binary(max_size=400)


# -- the sans-IO handshake -----------------------------------------------------------------


def messages(stream: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Independent parse of a client stream: ``(end, option, length, data)`` of each
    complete option after the 4-byte flags, as a server that never closed would see them."""
    pos = 4
    while len(stream) >= pos + 16:
        magic, code, length = struct.unpack_from(">QII", stream, pos)
        if magic != IHAVEOPT or length > MAX_OPTION_DATA or len(stream) < pos + 16 + length:
            return  # a bad magic or an absurd length ends the session
        yield pos + 16 + length, code, length, stream[pos + 16 : pos + 16 + length]
        pos += 16 + length


def parse_replies(out: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """Option replies ``(option, type, payload)`` and whatever follows them."""
    replies = []
    pos = 0
    while len(out) - pos >= 20:
        magic, code, rtype, length = struct.unpack_from(">QIII", out, pos)
        if magic != OPT_REPLY_MAGIC:
            break
        assert len(out) >= pos + 20 + length, "option reply shorter than its length field"
        replies.append((code, rtype, out[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return replies, out[pos:]


def check_reply(code: int, rtype: int, payload: bytes) -> None:
    if rtype in ERR_TYPES:
        payload.decode()  # an error message is UTF-8 text
    elif rtype == REP_ACK:
        assert payload == b""
    elif rtype == REP_SERVER:
        assert code == OPT_LIST and len(payload) >= 4
        (n,) = struct.unpack_from(">I", payload)
        assert 4 + n <= len(payload)
    elif rtype == REP_INFO:
        assert code in (OPT_INFO, OPT_GO) and len(payload) >= 2
        (itype,) = struct.unpack_from(">H", payload)
        if itype == INFO_EXPORT:
            assert len(payload) == 12
            _, size, flags = struct.unpack(">HQH", payload)
            assert size == VOL_SIZE and flags & 1
        elif itype == INFO_BLOCK_SIZE:
            assert len(payload) == 14
            _, lo, pref, hi = struct.unpack(">HIII", payload)
            assert 1 <= lo <= pref <= hi
    elif rtype == REP_META_CONTEXT:
        assert code in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT) and len(payload) > 4
        payload[4:].decode()
    else:
        pytest.fail(f"unknown reply type {rtype:#x} to option {code}")


@settings(max_examples=1500, deadline=None)
@given(
    stream=streams,
    cuts=st.lists(st.integers(0, 500), max_size=8),
    shutting_down=st.booleans(),
    as_view=st.booleans(),
)
def test_negotiation_never_raises_and_answers_every_option(
    stream: bytes, cuts: list[int], shutting_down: bool, as_view: bool
) -> None:
    neg = Negotiation(lookup, listing, lambda: shutting_down)
    edges = sorted({c for c in cuts if c < len(stream)} | {len(stream)})
    buf = b""
    consumed = 0
    sent = 0
    boundaries = {0, 4} | {end for end, *_ in messages(stream)}
    for edge in edges:
        buf += stream[sent:edge]
        sent = edge
        used = neg.feed(memoryview(buf) if as_view else buf)
        assert 0 <= used <= len(buf)
        consumed += used
        buf = buf[used:]
        if neg.closed or neg.done:
            break
        assert consumed in boundaries, f"consumed {consumed}: not a message boundary"
    assert not (neg.closed and neg.done)
    if not neg.closed and not neg.done:
        # Every complete message was consumed: nothing whole is left waiting.
        whole = max([e for e in boundaries if e <= len(stream)] + [0])
        if len(stream) >= 4:
            assert consumed == whole
        else:
            assert consumed == 0
    if neg.closed:
        assert neg.close_reason

    out = b"".join(neg.out)
    replies, rest = parse_replies(out)
    for code, rtype, payload in replies:
        check_reply(code, rtype, payload)

    # Match the replies to the options the machine consumed, in order.
    processed = [(code, data) for end, code, _, data in messages(stream) if end <= consumed]
    i = 0
    for code, data in processed:
        if code == OPT_EXPORT_NAME:
            assert i == len(replies), "EXPORT_NAME gets no option reply"
            continue
        while i < len(replies) and replies[i][1] in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
            assert replies[i][0] == code
            i += 1
        assert i < len(replies), f"option {code} ({data[:20]!r}) got no final reply"
        assert replies[i][0] == code, f"reply to option {replies[i][0]} for option {code}"
        assert replies[i][1] == REP_ACK or replies[i][1] in ERR_TYPES
        if code in (OPT_INFO, OPT_GO) and replies[i][1] == REP_ACK:
            infos = [r for r in replies[:i] if r[0] == code and r[1] == REP_INFO]
            assert any(struct.unpack_from(">H", p)[0] == INFO_EXPORT for _, _, p in infos)
        i += 1
    assert i == len(replies), "more replies than options"

    if neg.done:
        assert neg.export is not None and neg.export.name == "vol0"
        last = processed[-1][0]
        if last == OPT_EXPORT_NAME:
            assert len(rest) in (10, 134)
            size, _flags = struct.unpack_from(">QH", rest)
            assert size == VOL_SIZE
        else:
            assert last == OPT_GO and rest == b""
    else:
        assert rest == b""
    if neg.meta_contexts:
        assert neg.structured
        assert list(neg.meta_contexts.values()) == ["base:allocation"]


def test_negotiation_byte_by_byte_equals_all_at_once() -> None:
    """The same valid handshake fed whole and fed one byte at a time ends the same way."""
    name = b"vol0"
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_NAME)
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 15) + b"base:allocation"
    stream = struct.pack(">I", 3)
    for code, data in [
        (OPT_LIST, b""),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_SET_META_CONTEXT, meta),
        (99, b"?"),
        (OPT_GO, go),
    ]:
        stream += struct.pack(">QII", IHAVEOPT, code, len(data)) + data
    whole = Negotiation(lookup, listing, lambda: False)
    assert whole.feed(stream + b"tail") == len(stream)
    single = Negotiation(lookup, listing, lambda: False)
    buf = b""
    for b in stream:
        buf += bytes([b])
        buf = buf[single.feed(buf) :]
    assert buf == b""
    assert whole.done and single.done
    assert b"".join(whole.out) == b"".join(single.out)
    assert whole.structured and whole.meta_contexts == {1: "base:allocation"}


# -- the live daemon ------------------------------------------------------------------------


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
