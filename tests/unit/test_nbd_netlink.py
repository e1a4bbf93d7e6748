"""The nbd netlink family's messages, checked against the layout of
include/uapi/linux/nbd-netlink.h (the numbers are written out here, not imported), with a
transport that records what would go to the kernel and answers as the kernel does."""

from __future__ import annotations

import errno
import struct

import pytest

from sgw.common.errors import IscsiExportError
from sgw.gateway.lio import netlink
from sgw.gateway.lio.netlink import DeviceSettings, NbdNetlink

FAMILY_ID = 0x1D


def parse(data: bytes) -> dict[int, bytes]:
    out = {}
    pos = 0
    while pos < len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        out[kind & 0x3FFF] = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out


class Recorder:
    def __init__(self, answers: list[bytes] | None = None, error: int = 0) -> None:
        self.sent: list[tuple[int, int, bytes]] = []
        self.answers = answers or []
        self.error = error

    def family_id(self, name: str) -> int:
        assert name == "nbd"
        return FAMILY_ID

    def request(self, family: int, cmd: int, payload: bytes) -> list[bytes]:
        self.sent.append((family, cmd, payload))
        if self.error:
            raise OSError(self.error, "refused")
        return self.answers


def test_connect_names_the_device_its_socket_timeouts_and_backend() -> None:
    rec = Recorder()
    settings = DeviceSettings(
        size=1 << 30,
        block_size=512,
        io_timeout=8,
        dead_conn_timeout=120,
        server_flags=0x1 | 0x4,
        backend="sgw:abcd:vol0",
    )
    NbdNetlink(rec).connect(3, 17, settings)
    [(family, cmd, payload)] = rec.sent
    assert family == FAMILY_ID and cmd == 1  # NBD_CMD_CONNECT
    a = parse(payload)
    assert struct.unpack("=I", a[1]) == (3,)  # NBD_ATTR_INDEX
    assert struct.unpack("=Q", a[2]) == (1 << 30,)  # SIZE_BYTES
    assert struct.unpack("=Q", a[3]) == (512,)  # BLOCK_SIZE_BYTES
    assert struct.unpack("=Q", a[4]) == (8,)  # TIMEOUT
    assert struct.unpack("=Q", a[5]) == (0x5,)  # SERVER_FLAGS
    assert struct.unpack("=Q", a[8]) == (120,)  # DEAD_CONN_TIMEOUT
    assert a[10] == b"sgw:abcd:vol0\0"  # BACKEND_IDENTIFIER
    item = parse(a[7])[1]  # SOCKETS -> SOCK_ITEM
    assert struct.unpack("=I", parse(item)[1]) == (17,)  # SOCK_FD
    # Nested attributes carry the nested flag.
    pos = payload.index(a[7]) - 4
    assert struct.unpack_from("=H", payload, pos + 2)[0] & (1 << 15)


def test_reconfigure_names_the_device_the_backend_and_the_new_socket() -> None:
    rec = Recorder()
    NbdNetlink(rec).reconfigure(0, 9, "sgw:abcd:vol0")
    [(_family, cmd, payload)] = rec.sent
    assert cmd == 3  # NBD_CMD_RECONFIGURE
    a = parse(payload)
    assert struct.unpack("=I", a[1]) == (0,)
    assert a[10] == b"sgw:abcd:vol0\0"
    assert struct.unpack("=I", parse(parse(a[7])[1])[1]) == (9,)
    assert 2 not in a and 4 not in a  # nothing else changes


def test_status_reads_the_device_list() -> None:
    def device(index: int, connected: int) -> bytes:
        fields = netlink.u32(1, index) + netlink.attr(2, bytes([connected]))
        return netlink.attr(1, fields, nested=True)

    answer = struct.pack("=BBH", 5, 1, 0) + netlink.attr(
        9, device(0, 0) + device(4, 1), nested=True
    )
    rec = Recorder([answer])
    nl = NbdNetlink(rec)
    assert nl.connected(4) is True
    assert nl.connected(0) is False
    assert nl.connected(7) is False


def test_a_refusal_names_what_was_asked_and_why() -> None:
    rec = Recorder(error=errno.EINVAL)
    with pytest.raises(IscsiExportError, match=r"reattaching /dev/nbd2: the kernel refused"):
        NbdNetlink(rec).reconfigure(2, 5, "x")
