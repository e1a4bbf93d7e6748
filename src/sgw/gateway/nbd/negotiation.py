"""The server side of the fixed newstyle handshake, without I/O.

Feed it the bytes received; it consumes whole messages, queues the bytes to send in
``out`` and ends in one of two states: ``export`` set (transmission begins, with
``structured`` and ``meta_contexts`` as negotiated) or ``closed`` (hard disconnect). It
never raises on bad input: a bad option gets the protocol's error reply, a violation of a
MUST, or an absurd length, closes the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from sgw.gateway.nbd import protocol as p


@dataclass(frozen=True)
class ExportInfo:
    """What a client learns about an export before transmission."""

    name: str
    size: int
    description: str = ""


Lookup = Callable[[str], ExportInfo | None]
Listing = Callable[[], list[ExportInfo]]

_AWAIT_FLAGS = 0
_OPTIONS = 1
_DONE = 2
_CLOSED = 3

META_CONTEXT_ID = 1  # the id of base:allocation on every connection


def transmission_flags(structured: bool) -> int:
    """The transmission flags this server advertises."""
    flags = (
        p.FLAG_HAS_FLAGS
        | p.FLAG_SEND_FLUSH
        | p.FLAG_SEND_FUA
        | p.FLAG_SEND_TRIM
        | p.FLAG_SEND_WRITE_ZEROES
        | p.FLAG_CAN_MULTI_CONN
        | p.FLAG_SEND_FAST_ZERO
    )
    if structured:
        flags |= p.FLAG_SEND_DF
    return flags


def greeting() -> bytes:
    """What the server sends first."""
    return p.NBDMAGIC + struct.pack(">QH", p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


class Negotiation:
    """State machine of one connection's handshake."""

    def __init__(self, lookup: Lookup, listing: Listing, shutting_down: Callable[[], bool]):
        self._lookup = lookup
        self._listing = listing
        self._shutting_down = shutting_down
        self._state = _AWAIT_FLAGS
        self.out: list[bytes] = []
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.meta_contexts: dict[int, str] = {}
        self._meta_export: str | None = None
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        """True once the connection must be dropped."""
        return self._state == _CLOSED

    @property
    def done(self) -> bool:
        """True once an export was chosen and transmission begins."""
        return self._state == _DONE

    def feed(self, data: memoryview | bytes) -> int:
        """Consumes as many whole messages of ``data`` as possible; returns bytes used."""
        used = 0
        while self._state in (_AWAIT_FLAGS, _OPTIONS):
            n = self._step(data[used:])
            if n == 0:
                break
            used += n
        return used

    def _close(self, reason: str) -> None:
        self._state = _CLOSED
        self.close_reason = reason

    def _step(self, data: memoryview | bytes) -> int:
        if self._state == _AWAIT_FLAGS:
            if len(data) < 4:
                return 0
            flags: int = struct.unpack_from(">I", data)[0]
            if flags & ~p.CLIENT_FLAGS_KNOWN:
                self._close(f"unknown client flags {flags:#x}")
            elif not flags & p.FLAG_FIXED_NEWSTYLE:
                # Only fixed newstyle is served: plain newstyle clients could not be told of
                # errors without dropping them anyway.
                self._close("client does not speak fixed newstyle")
            else:
                self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
                self._state = _OPTIONS
            return 4
        if len(data) < p.OPTION_HEADER.size:
            return 0
        magic, option, length = p.OPTION_HEADER.unpack_from(data)
        if magic != p.IHAVEOPT:
            self._close("bad option magic")
            return p.OPTION_HEADER.size
        if length > p.MAX_OPTION_DATA:
            self._close(f"option data of {length} bytes is too large")
            return p.OPTION_HEADER.size
        total: int = p.OPTION_HEADER.size + length
        if len(data) < total:
            return 0
        self._option(option, bytes(data[p.OPTION_HEADER.size : total]))
        return total

    # -- replies --------------------------------------------------------------------

    def _reply(self, option: int, rtype: int, payload: bytes = b"") -> None:
        self.out.append(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, rtype, len(payload)))
        if payload:
            self.out.append(payload)

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode())

    # -- options ------------------------------------------------------------------

    def _option(self, option: int, data: bytes) -> None:
        if self._shutting_down() and option != p.OPT_ABORT:
            if option == p.OPT_EXPORT_NAME:
                self._close("server is shutting down")
            else:
                self._error(option, p.REP_ERR_SHUTDOWN, "server is shutting down")
            return
        if option == p.OPT_EXPORT_NAME:
            self._export_name(data)
        elif option == p.OPT_ABORT:
            self._reply(option, p.REP_ACK)
            self._close("client aborted")
        elif option == p.OPT_LIST:
            self._list(option, data)
        elif option in (p.OPT_INFO, p.OPT_GO):
            self._info_go(option, data)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._reply(option, p.REP_ACK)
        elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == p.OPT_STARTTLS:
            self._error(option, p.REP_ERR_POLICY, "TLS is not offered on this socket")
        else:
            self._error(option, p.REP_ERR_UNSUP, f"option {option} is not supported")

    def _export_name(self, data: bytes) -> None:
        name = _decode(data)
        info = self._lookup(name) if name is not None else None
        if info is None:
            # The protocol has no error reply for EXPORT_NAME: the session must end.
            self._close(f"unknown export {name!r}")
            return
        reply = struct.pack(">QH", info.size, transmission_flags(self.structured))
        if not self.no_zeroes:
            reply += bytes(124)
        self.out.append(reply)
        self._finish(info)

    def _finish(self, info: ExportInfo) -> None:
        if self._meta_export is not None and self._meta_export != info.name:
            self.meta_contexts = {}
        self.export = info
        self._state = _DONE

    def _list(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, p.REP_ERR_INVALID, "LIST takes no data")
            return
        for info in self._listing():
            name = info.name.encode()
            self._reply(
                option,
                p.REP_SERVER,
                struct.pack(">I", len(name)) + name + info.description.encode(),
            )
        self._reply(option, p.REP_ACK)

    def _info_go(self, option: int, data: bytes) -> None:
        if len(data) < 4:
            self._error(option, p.REP_ERR_INVALID, "option data too short")
            return
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > p.MAX_STRING or len(data) < 4 + nlen + 2:
            self._error(option, p.REP_ERR_INVALID, "bad export name length")
            return
        name = _decode(data[4 : 4 + nlen])
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._error(option, p.REP_ERR_INVALID, "bad information request count")
            return
        if name is None:
            self._error(option, p.REP_ERR_INVALID, "export name is not valid UTF-8")
            return
        requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        info = self._lookup(name)
        if info is None:
            self._error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        flags = transmission_flags(self.structured)
        self._reply(option, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, info.size, flags))
        if p.INFO_NAME in requests:
            self._reply(option, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + info.name.encode())
        if p.INFO_DESCRIPTION in requests:
            self._reply(
                option,
                p.REP_INFO,
                struct.pack(">H", p.INFO_DESCRIPTION) + info.description.encode(),
            )
        # Always sent: the constraints hold whether or not the client asked.
        self._reply(
            option,
            p.REP_INFO,
            struct.pack(">HIII", p.INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD),
        )
        self._reply(option, p.REP_ACK)
        if option == p.OPT_GO:
            self._finish(info)

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == p.OPT_SET_META_CONTEXT and not self.structured:
            self._error(option, p.REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(option, p.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        target = self._lookup(name)
        if target is None:
            self._error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        matched = False
        if option == p.OPT_LIST_META_CONTEXT:
            matched = not queries or any(q in ("base:", p.META_BASE_ALLOCATION) for q in queries)
        else:
            matched = p.META_BASE_ALLOCATION in queries
        if matched:
            ctx_id = META_CONTEXT_ID if option == p.OPT_SET_META_CONTEXT else 0
            body = struct.pack(">I", ctx_id) + p.META_BASE_ALLOCATION.encode()
            self._reply(option, p.REP_META_CONTEXT, body)
        if option == p.OPT_SET_META_CONTEXT:
            self.meta_contexts = {META_CONTEXT_ID: p.META_BASE_ALLOCATION} if matched else {}
            self._meta_export = target.name  # "" and the default export's name agree
        self._reply(option, p.REP_ACK)


def _decode(raw: bytes) -> str | None:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (nlen,) = struct.unpack_from(">I", data)
    if nlen > p.MAX_STRING or len(data) < 4 + nlen + 4:
        return None
    name = _decode(data[4 : 4 + nlen])
    (count,) = struct.unpack_from(">I", data, 4 + nlen)
    pos = 8 + nlen
    queries: list[str] = []
    for _ in range(count):
        if len(data) < pos + 4:
            return None
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if qlen > p.MAX_STRING or len(data) < pos + qlen:
            return None
        query = _decode(data[pos : pos + qlen])
        if query is None:
            return None
        queries.append(query)
        pos += qlen
    if pos != len(data) or name is None:
        return None
    return name, queries
