"""The blue-green swap's wire: length-prefixed JSON messages over a unix stream socket, the
handover message carrying file descriptors (SCM_RIGHTS, ``socket.send_fds``).

Each message is an 8-byte header (payload length, number of descriptors) and a JSON
object. Descriptors travel with the header's first byte, so the receiver asks for them in
the same ``recvmsg`` that reads the header. The socket is used in blocking mode from a
worker thread: messages are few and small, except the handover record, and nothing here
is on the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from sgw.common.errors import HandoverError

_HEADER = struct.Struct(">II")
# Largest message accepted (bytes): the record holds at most a partly received write
# (32 MiB, base64) per connection being handed over; anything beyond this is a bug.
MAX_MESSAGE = 1 << 30
# Most descriptors in one message: every NBD connection and listener of a gateway.
MAX_FDS = 4096


class Channel:
    """One end of the socket between the running daemon (blue) and its successor (green)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Sends one message (and descriptors, which stay open here too)."""
        await asyncio.to_thread(self._send, message, list(fds))

    async def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it (owned by the caller).

        HandoverError if the peer closed the socket, sent garbage, or said nothing within
        ``timeout`` seconds (the socket is then shut down: the peer is not waited for)."""
        task = asyncio.ensure_future(asyncio.to_thread(self._recv))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            # The blocked recv in the worker thread ends with the shutdown.
            self.sock.shutdown(socket.SHUT_RDWR)
            await asyncio.gather(task, return_exceptions=True)
            raise HandoverError(f"no answer from the other daemon within {timeout:.0f} s") from None

    def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        header = _HEADER.pack(len(body), len(fds))
        try:
            if fds:
                socket.send_fds(self.sock, [header], fds)
            else:
                self.sock.sendall(header)
            self.sock.sendall(body)
        except OSError as exc:
            raise HandoverError(f"the other daemon is gone ({exc.strerror or exc})") from exc

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        try:
            head, fds, _flags, _addr = socket.recv_fds(self.sock, 1, MAX_FDS)
            for fd in fds:
                # Received descriptors are inheritable: a release this daemon starts later
                # would keep every socket open (a client's close would never end).
                os.set_inheritable(fd, False)
            if not head:
                raise HandoverError("the other daemon closed the handover socket")
            head += self._exactly(_HEADER.size - len(head))
            length, nfds = _HEADER.unpack(head)
            if length > MAX_MESSAGE or nfds != len(fds):
                for fd in fds:
                    _close(fd)
                raise HandoverError(
                    f"malformed handover message ({length} bytes, {len(fds)} of {nfds} descriptors)"
                )
            body = self._exactly(length)
        except OSError as exc:
            raise HandoverError(f"the other daemon is gone ({exc.strerror or exc})") from exc
        try:
            message = json.loads(body)
        except ValueError as exc:
            for fd in fds:
                _close(fd)
            raise HandoverError(f"the other daemon sent a message that is not JSON: {exc}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            for fd in fds:
                _close(fd)
            raise HandoverError("the other daemon sent a message without an op")
        return message, fds

    def _exactly(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise HandoverError("the other daemon closed the handover socket mid-message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
