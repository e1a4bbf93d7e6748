"""Base stores: where a volume's blocks live once destaged.

Stored mode keeps the whole volume on a local disk: a regular file (sparse) or a block
device. Cached mode (a chunk cache backed by the remote store) implements the same
protocol.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from typing import Protocol

from sgw.common.errors import StorageError

LOG = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_WRITE_CHUNK = 8 * 1024 * 1024
_COPY_CHUNK = 4 * 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BaseStore(Protocol):
    """What the volume engine needs from the store under the write log."""

    size: int

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fills ``buf`` with the bytes at ``offset``."""

    def read(self, offset: int, length: int) -> bytes:
        """Returns ``length`` bytes at ``offset``."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` at ``offset`` (not yet durable)."""

    def zero(self, offset: int, length: int, punch: bool) -> None:
        """Makes the range read as zeroes; ``punch`` allows releasing the space."""

    def copy_from(self, src_fd: int, src_offset: int, offset: int, length: int) -> None:
        """Writes ``length`` bytes read from ``src_fd`` at ``src_offset`` (not yet durable)."""

    def sync(self) -> None:
        """Makes every write and zero so far durable."""

    def allocated(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Splits the range into ``(length, is_hole)`` runs; holes read as zeroes."""

    def close(self) -> None:
        """Releases the store."""


class FileBaseStore:
    """A volume on a local file or block device; the stored-mode base store."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open volume disk {path}: {exc.strerror}") from exc
        self.path = path
        st = os.fstat(self._fd)
        self.is_device = stat.S_ISBLK(st.st_mode)
        if self.is_device:
            actual = os.lseek(self._fd, 0, os.SEEK_END)
            if actual < size:
                os.close(self._fd)
                raise StorageError(
                    f"volume disk {path} holds {actual} bytes, less than the volume's {size}"
                )
        elif st.st_size < size:
            os.ftruncate(self._fd, size)
        self.size = size
        self._kernel_copy = True

    def readinto(self, buf: memoryview, offset: int) -> None:
        n = os.preadv(self._fd, [buf], offset)
        if n < len(buf):  # beyond the end of a shorter file: zeroes
            buf[n:] = bytes(len(buf) - n)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int, punch: bool) -> None:
        mode = _FALLOC_FL_KEEP_SIZE | (_FALLOC_FL_PUNCH_HOLE if punch else _FALLOC_FL_ZERO_RANGE)
        try:
            _fallocate(self._fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise
        chunk = bytes(min(length, _ZERO_WRITE_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, memoryview(chunk)[:n])
            offset += n

    def copy_from(self, src_fd: int, src_offset: int, offset: int, length: int) -> None:
        if self._kernel_copy:
            try:
                while length:
                    n = os.copy_file_range(src_fd, self._fd, length, src_offset, offset)
                    if n <= 0:
                        break
                    src_offset, offset, length = src_offset + n, offset + n, length - n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._kernel_copy = False
                LOG.info(
                    "copy_file_range unavailable; copying through memory",
                    extra={"path": self.path, "error": exc.strerror},
                )
        while length:
            data = os.pread(src_fd, min(length, _COPY_CHUNK), src_offset)
            if not data:
                raise StorageError(f"short read from the write log at {src_offset}")
            self.write(offset, data)
            n = len(data)
            src_offset, offset, length = src_offset + n, offset + n, length - n

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def allocated(self, offset: int, length: int) -> list[tuple[int, bool]]:
        if self.is_device:
            return [(length, False)]
        out: list[tuple[int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    return [*out, (end - pos, False)]
                data = end
            if data > pos:
                n = min(data, end) - pos
                out.append((n, True))
                pos += n
                continue
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            n = min(max(hole, pos + 1), end) - pos
            out.append((n, False))
            pos += n
        return out

    def close(self) -> None:
        os.close(self._fd)
