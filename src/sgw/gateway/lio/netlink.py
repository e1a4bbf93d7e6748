"""The kernel NBD driver's generic netlink family ("nbd"), as far as the gateway uses it.

``connect`` sets a device up on a socket the caller passes (one end of a socket pair whose
other end the daemon serves), with an I/O timeout, a dead-connection timeout and a backend
identifier; ``reconfigure`` gives a device whose connection died a new socket (a restarted
daemon reattaches: the kernel held its requests meanwhile); ``disconnect`` ends it;
``status`` says whether a device is connected. Messages are built and parsed here (the
attribute numbers are those of include/uapi/linux/nbd-netlink.h); ``NetlinkSocket`` is the
one place that talks to the kernel, so the tests can put a recorder in its place.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from sgw.common.errors import IscsiExportError

# netlink and generic netlink
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_NLA_F_NESTED = 1 << 15
_NETLINK_GENERIC = 16  # not in Python's socket module
_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")

# the nbd family (include/uapi/linux/nbd-netlink.h)
FAMILY = "nbd"
_VERSION = 1
CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_STATUS = 5
ATTR_INDEX = 1
ATTR_SIZE_BYTES = 2
ATTR_BLOCK_SIZE_BYTES = 3
ATTR_TIMEOUT = 4
ATTR_SERVER_FLAGS = 5
ATTR_CLIENT_FLAGS = 6
ATTR_SOCKETS = 7
ATTR_DEAD_CONN_TIMEOUT = 8
ATTR_DEVICE_LIST = 9
ATTR_BACKEND_IDENTIFIER = 10
SOCK_ITEM = 1
SOCK_FD = 1
DEVICE_ITEM = 1
DEVICE_INDEX = 1
DEVICE_CONNECTED = 2


def attr(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    head = _NLATTR.pack(_NLATTR.size + len(payload), kind | (_NLA_F_NESTED if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The attributes in ``data``: (type without flags, payload)."""
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            return
        yield kind & ~_NLA_F_NESTED & 0x7FFF, data[pos + _NLATTR.size : pos + length]
        pos += (length + 3) & ~3


class Transport(Protocol):
    """Sends one request and returns the payloads (after the netlink header) of the
    answers; raises OSError with the kernel's errno for a refused request."""

    def request(self, family: int, cmd: int, payload: bytes) -> list[bytes]: ...

    def family_id(self, name: str) -> int: ...


class NetlinkSocket:
    """A generic netlink socket (AF_NETLINK, NETLINK_GENERIC); blocking, one request at a
    time (the caller runs it in a worker thread)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def family_id(self, name: str) -> int:
        for payload in self._request(
            _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, 1, string(_CTRL_ATTR_FAMILY_NAME, name)
        ):
            for kind, value in attrs(payload[_GENLMSGHDR.size :]):
                if kind == _CTRL_ATTR_FAMILY_ID:
                    return int(struct.unpack_from("=H", value)[0])
        raise OSError(errno.ENOENT, f"no generic netlink family {name!r}")

    def request(self, family: int, cmd: int, payload: bytes) -> list[bytes]:
        return self._request(family, cmd, _VERSION, payload)

    def _request(self, family: int, cmd: int, version: int, payload: bytes) -> list[bytes]:
        self._seq += 1
        body = _GENLMSGHDR.pack(cmd, version, 0) + payload
        head = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), family, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0
        )
        self._sock.send(head + body)
        answers: list[bytes] = []
        while True:
            data = self._sock.recv(65536)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "malformed netlink answer")
                body_at = pos + _NLMSGHDR.size
                pos += (length + 3) & ~3
                if seq != self._seq:
                    continue
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, body_at)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return answers  # the ACK: the request is done
                answers.append(data[body_at : body_at + length - _NLMSGHDR.size])


@dataclass(frozen=True)
class DeviceSettings:
    """How a device is set up: sizes in bytes, timeouts in seconds, the transmission
    flags the server would advertise, and the backend identifier a reattach must match."""

    size: int
    block_size: int
    io_timeout: int
    dead_conn_timeout: int
    server_flags: int
    backend: str


class NbdNetlink:
    """The nbd family's commands (blocking: run them in a worker thread)."""

    def __init__(self, transport: Transport | None = None) -> None:
        self._transport = transport
        self._family: int | None = None

    def _t(self) -> tuple[Transport, int]:
        if self._transport is None:
            try:
                self._transport = NetlinkSocket()
            except OSError as exc:
                raise IscsiExportError(f"cannot open a netlink socket: {exc}") from exc
        if self._family is None:
            try:
                self._family = self._transport.family_id(FAMILY)
            except OSError as exc:
                raise IscsiExportError(
                    "the kernel has no nbd netlink family: the nbd module is not loaded "
                    f"(modprobe nbd): {exc.strerror}"
                ) from exc
        return self._transport, self._family

    def connect(self, index: int, fd: int, settings: DeviceSettings) -> None:
        """Sets /dev/nbd<index> up on the socket ``fd`` (the kernel takes a reference)."""
        transport, family = self._t()
        payload = b"".join(
            [
                u32(ATTR_INDEX, index),
                u64(ATTR_SIZE_BYTES, settings.size),
                u64(ATTR_BLOCK_SIZE_BYTES, settings.block_size),
                u64(ATTR_TIMEOUT, settings.io_timeout),
                u64(ATTR_DEAD_CONN_TIMEOUT, settings.dead_conn_timeout),
                u64(ATTR_SERVER_FLAGS, settings.server_flags),
                string(ATTR_BACKEND_IDENTIFIER, settings.backend),
                _sockets(fd),
            ]
        )
        _call(transport, family, CMD_CONNECT, payload, f"connecting /dev/nbd{index}")

    def reconfigure(self, index: int, fd: int, backend: str) -> None:
        """Gives /dev/nbd<index>, whose connection died, the socket ``fd``; refused by the
        kernel unless ``backend`` is the device's identifier and a connection is dead."""
        transport, family = self._t()
        payload = u32(ATTR_INDEX, index) + string(ATTR_BACKEND_IDENTIFIER, backend) + _sockets(fd)
        _call(transport, family, CMD_RECONFIGURE, payload, f"reattaching /dev/nbd{index}")

    def disconnect(self, index: int) -> None:
        transport, family = self._t()
        _call(transport, family, CMD_DISCONNECT, u32(ATTR_INDEX, index), f"detaching nbd{index}")

    def connected(self, index: int) -> bool:
        """True if /dev/nbd<index> is set up (connected or waiting for a reattach)."""
        transport, family = self._t()
        answers = _call(transport, family, CMD_STATUS, u32(ATTR_INDEX, index), "nbd status")
        for payload in answers:
            for kind, value in attrs(payload[_GENLMSGHDR.size :]):
                if kind != ATTR_DEVICE_LIST:
                    continue
                for item_kind, item in attrs(value):
                    if item_kind != DEVICE_ITEM:
                        continue
                    fields = dict(attrs(item))
                    found = struct.unpack("=I", fields[DEVICE_INDEX][:4])[0]
                    if found == index:
                        return bool(fields.get(DEVICE_CONNECTED, b"\0")[0])
        return False

    def close(self) -> None:
        if isinstance(self._transport, NetlinkSocket):
            self._transport.close()
        self._transport = None
        self._family = None


def _sockets(fd: int) -> bytes:
    return attr(ATTR_SOCKETS, attr(SOCK_ITEM, u32(SOCK_FD, fd), nested=True), nested=True)


def _call(transport: Transport, family: int, cmd: int, payload: bytes, what: str) -> list[bytes]:
    try:
        return transport.request(family, cmd, payload)
    except OSError as exc:
        raise IscsiExportError(f"{what}: the kernel refused ({exc.strerror or exc})") from exc
