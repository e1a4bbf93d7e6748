"""Provider configuration: where its state lives and where it listens."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sgw.common.errors import ConfigError
from sgw.common.transport import is_loopback
from sgw.provider.auth.tls import tls_files

DEFAULT_LISTEN = "127.0.0.1:8480"


@dataclass(frozen=True)
class ProviderConfig:
    """Everything ``sgw provider serve`` needs.

    ``db_url`` is an SQLAlchemy URL (SQLite by default, PostgreSQL when one machine is
    outgrown); ``store_url`` names the object store (``file:///dir`` or ``s3://bucket``).
    ``insecure_dev``: requests without credentials act for the built-in account ``dev``
    (development machines only, so it listens on loopback only). ``tls_cert``/``tls_key``:
    serve HTTPS with them (made by ``sgw provider init``); plain HTTP is served only on
    loopback or with ``insecure_http``. ``accept_legacy_signatures``: accept gateways'
    old ``SGW1-Ed25519`` signatures besides HTTP Message Signatures (RFC 9421) during the
    transition (docs/adr/0010-http-message-signatures.md); ``--refuse-legacy-signatures``
    turns it off.
    """

    data_dir: str
    host: str
    port: int
    db_url: str
    store_url: str
    insecure_dev: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False
    # Where the other control servers reach this one (``--advertise-url``); default: the
    # listening address (this machine's name when it listens on every address).
    advertise_url: str | None = None
    accept_legacy_signatures: bool = True
    # How long health data is kept (days; docs/health.md, "Retention"): raw samples, their
    # hourly aggregates, events, daily aggregates (``--health-raw-days`` and so on).
    health_raw_days: float = 2.0
    health_hourly_days: float = 31.0
    health_events_days: float = 396.0
    health_daily_days: float = 396.0

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def control_url(self) -> str:
        """The URL peers ring this server's doorbell at."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def check_transport(self) -> None:
        """ConfigError if the API would be served without authentication, or in plain
        HTTP, beyond this machine."""
        if self.insecure_dev and not is_loopback(self.host):
            raise ConfigError(
                f"--listen {self.host}:{self.port} is not loopback, and --insecure-dev "
                "serves every caller without authentication: listen on 127.0.0.1 (or ::1) "
                "in development, or serve without --insecure-dev (`sgw provider init` makes "
                "the first API token)"
            )
        if self.tls_cert or self.insecure_http or is_loopback(self.host):
            return
        raise ConfigError(
            f"--listen {self.host}:{self.port} is not loopback and there is no TLS "
            f"certificate in {self.data_dir}/tls: run `sgw provider init`, or pass "
            "--insecure-http on a development network"
        )


def load(
    data_dir: str | None,
    *,
    listen: str | None = None,
    db_url: str | None = None,
    store_url: str | None = None,
    insecure_dev: bool = False,
    insecure_http: bool = False,
    advertise_url: str | None = None,
    accept_legacy_signatures: bool = True,
    health_days: tuple[float | None, ...] = (None, None, None, None),
) -> ProviderConfig:
    """Builds the configuration from flags, with embedded defaults under ``data_dir``."""
    if not data_dir:
        raise ConfigError("no data directory: pass --data-dir DIR")
    ddir = os.path.abspath(data_dir)
    host, sep, port = (listen or DEFAULT_LISTEN).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8480")
    tls = tls_files(ddir)
    return ProviderConfig(
        data_dir=ddir,
        host=host,
        port=int(port),
        db_url=db_url or f"sqlite:///{os.path.join(ddir, 'provider.db')}",
        store_url=store_url or f"file://{os.path.join(ddir, 'objects')}",
        insecure_dev=insecure_dev,
        tls_cert=None if insecure_http or not tls.exist() else tls.server_cert,
        tls_key=None if insecure_http or not tls.exist() else tls.server_key,
        insecure_http=insecure_http,
        advertise_url=advertise_url,
        accept_legacy_signatures=accept_legacy_signatures,
        **{
            f"health_{kind}_days": days
            for kind, days in zip(("raw", "hourly", "events", "daily"), health_days, strict=False)
            if days is not None
        },
    )
