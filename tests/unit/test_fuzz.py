"""Fuzzing the sans-IO handshake state machine.

The live daemon is fuzzed in tests/integration/test_fuzz_live.py; the wire constants and the
stream strategies are in tests/fixtures/nbd_wire.py.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.gateway.nbd.negotiation import ExportInfo, Negotiation
from tests.fixtures.nbd_wire import (
    ERR_TYPES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    KEEP_SIZE,
    MAX_OPTION_DATA,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    VOL_SIZE,
    handshake_stream,
)

EXPORTS = {"vol0": ExportInfo("vol0", VOL_SIZE, "sgw volume vol0"), "": None}
EXPORTS[""] = EXPORTS["vol0"]


def lookup(name: str) -> ExportInfo | None:
    return EXPORTS.get(name)


def listing() -> list[ExportInfo]:
    return [ExportInfo("vol0", VOL_SIZE, "sgw volume vol0"), ExportInfo("keep", KEEP_SIZE)]


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
