"""Durable file updates: what must survive a crash is written atomically and synced."""

from __future__ import annotations

import os


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
