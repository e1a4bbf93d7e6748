"""Provider configuration: where its state lives and where it listens."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sgw.common.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:8480"


@dataclass(frozen=True)
class ProviderConfig:
    """Everything ``sgw provider serve`` needs.

    ``db_url`` is an SQLAlchemy URL (SQLite by default, PostgreSQL when one machine is
    outgrown); ``store_url`` names the object store (``file:///dir`` or ``s3://bucket``).
    ``insecure_dev``: serve the API without authentication, every request acting for the
    built-in account ``dev`` (development machines only, until the management plane).
    """

    data_dir: str
    host: str
    port: int
    db_url: str
    store_url: str
    insecure_dev: bool = False


def load(
    data_dir: str | None,
    *,
    listen: str | None = None,
    db_url: str | None = None,
    store_url: str | None = None,
    insecure_dev: bool = False,
) -> ProviderConfig:
    """Builds the configuration from flags, with embedded defaults under ``data_dir``."""
    if not data_dir:
        raise ConfigError("no data directory: pass --data-dir DIR")
    ddir = os.path.abspath(data_dir)
    host, sep, port = (listen or DEFAULT_LISTEN).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8480")
    return ProviderConfig(
        data_dir=ddir,
        host=host,
        port=int(port),
        db_url=db_url or f"sqlite:///{os.path.join(ddir, 'provider.db')}",
        store_url=store_url or f"file://{os.path.join(ddir, 'objects')}",
        insecure_dev=insecure_dev,
    )
