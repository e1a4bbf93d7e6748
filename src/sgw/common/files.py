"""Durable file updates: what must survive a crash is written atomically and synced."""

from __future__ import annotations

import contextlib
import os
import secrets


def fsync_directory(path: str) -> None:
    """Makes the entries of the directory holding ``path`` durable (after a rename)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path)


def create_exclusively(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Writes ``data`` to a new file ``path`` unless one exists; True if this call made it.

    The data goes to a private temporary file that is fsynced and then hard-linked to
    ``path``: a link never replaces an existing file, so processes starting at once agree
    on one file, and a crash leaves no half-written file behind. Raises OSError.
    """
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_directory(path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
