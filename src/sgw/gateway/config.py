"""Gateway configuration: a TOML file and/or quick-start flags, validated into a dataclass.

Example (every key optional except what a volume needs)::

    data_dir = "/var/lib/sgw"
    log_level = "info"

    [write_log]
    path = "/dev/disk/by-label/sgw-log"   # default: DATA_DIR/writelog
    size = "1G"                           # for a file; a device is used whole

    [destage]
    start_fill = 0.5      # destage while writes go on once the log is this full (0..1)
    idle_seconds = 1.0    # ...or when it has been idle this long
    batch = "32M"         # log bytes per destage batch
    pass_through_after = 60  # provider away this long with the log full: stored volumes
                             # are written to their disks only (re-synced later)

    [nbd]
    listen = ["unix:/run/sgw/nbd.sock", "tcp:127.0.0.1:10809"]

    [remote]                              # upload to a provider (default: local only)
    url = "http://127.0.0.1:8480"         # the provider's block API
    concurrency = 8                       # upload requests in flight
    pack_chunks = 4                       # chunks per upload request (1: one each)
    bandwidth = "100M"                    # bytes per second (default: unlimited)
    ca = "/etc/sgw/provider-ca.pem"       # pin the provider's CA (https URLs)
    insecure_http = false                 # allow http:// beyond loopback (development),
                                          # for this url and [control] urls

    [activation]                          # while not activated (docs/gateway.md)
    listen = "0.0.0.0:80"                 # the activation page (default: none)
    poll_interval = 5.0                   # seconds between asks for the credentials

    [control]                             # commands from the provider's console
    urls = ["https://p2.example.net:8480"]  # more control servers to fail over to
                                          # (http:// as for [remote] url; not after https)
    wait = 50                             # seconds a long-poll is held at most

    [cache]                               # the chunk cache of cached volumes
    path = "/var/cache/sgw"               # a directory (default: DATA_DIR/cache)
    size = "4G"                           # bytes of chunk data it keeps (LRU)
    read_ahead = 4                        # chunks fetched ahead of sequential reads

    [updates]                             # the update agent (docs/updates.md)
    enabled = true                        # false: the agent checks nothing, installs nothing
    check_interval = 900                  # seconds between its checks of the provider's plan
    socket = "/run/sgw/update-agent.sock" # where it listens for the daemon's `update` command
    root = "/opt/sgw"                     # the release slots' root (releases/, current)

    [health]                              # the health reporter (docs/health.md)
    interval = 60                         # seconds between reports to the provider

    [metrics]                             # a local Prometheus /metrics (default: off)
    listen = "192.0.2.10:9750"            # ADDR:PORT to serve it on
    token_file = "/etc/sgw/metrics.token" # the bearer token scrapers send (mode 0600)
    allow = ["192.0.2.0/24"]              # source networks (the appliance's firewall)

    [[volumes]]
    name = "vol0"
    size = "10G"
    mode = "stored"                       # or "cached" (needs [remote]; no path)
    path = "/dev/disk/by-label/sgw-vol0"  # default: DATA_DIR/volumes/NAME.img
    snapshot = "..."                      # optional: created from this snapshot (an id)
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from sgw.common.errors import ConfigError
from sgw.common.names import VOLUME_NAME_HELP, is_volume_name
from sgw.common.transport import DOWNGRADE, HTTPS, transport_refusal
from sgw.gateway.lio.settings import LIO_KEYS, LioConfig, parse_lio
from sgw.gateway.volume.engine import MODE_CACHED, MODE_STORED, MODES, VolumeSpec
from sgw.gateway.volume.wal import DATA_START, MIN_DATA_SIZE

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_SIZE = 1 << 30
# Most chunks the uploads may hold in memory at once ([remote] concurrency x pack_chunks):
# 512 MiB at the default chunk size.
MAX_CHUNKS_IN_FLIGHT = 512
DEFAULT_CACHE_SIZE = 4 << 30
# The cache must hold the chunks of a few reads in flight (1 MiB chunks by default).
MIN_CACHE_SIZE = 16 << 20


def parse_size(text: str | int, what: str) -> int:
    """Parses ``4096``, ``512M``, ``10G``, ``1TiB`` (binary units) into bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise ConfigError(f"{what}: {text!r} is not a size (examples: 4096, 512M, 10G)")
        value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ConfigError(f"{what}: size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class Listener:
    """An NBD listening address: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Listener:
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls("unix", path=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if host and port.isdigit() and 0 <= int(port) < 65536:
                return cls("tcp", host=host, port=int(port))
        raise ConfigError(
            f"--nbd {text!r}: expected unix:PATH or tcp:HOST:PORT (e.g. tcp:127.0.0.1:10809)"
        )

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class DestageConfig:
    """When and how much the destager moves from the log to the base stores."""

    start_fill: float = 0.5  # fraction of the log that starts a destage
    idle_seconds: float = 1.0  # or: seconds without writes with anything in the log
    batch_bytes: int = 32 << 20  # log bytes per batch
    # Stored volumes go to pass-through once uploads have failed this long (seconds) while
    # writers wait for log space.
    pass_through_after: float = 60.0


@dataclass(frozen=True)
class RemoteConfig:
    """Where and how fast the destager uploads: each volume is bound to a remote volume
    that the gateway creates at the provider on first use (its id kept in volumes.json)."""

    url: str  # the provider's base URL, e.g. http://127.0.0.1:8480
    concurrency: int = 8  # upload requests in flight at once
    pack_chunks: int = 4  # most chunks per upload request (a chunk pack); 1: one each
    bandwidth: int | None = None  # bytes per second on the wire; None: unlimited
    ca: str | None = None  # PEM file of the provider's CA to pin; None: the system's CAs
    insecure_http: bool = False  # plain http:// to a host beyond loopback


@dataclass(frozen=True)
class ActivationConfig:
    """The activation page an unactivated gateway serves on its local network, and how
    often it asks the provider for its credentials."""

    host: str | None = None  # None: no activation page (the key from the CLI only)
    port: int = 80
    poll_interval: float = 5.0  # seconds


@dataclass(frozen=True)
class ControlConfig:
    """The control channel: the gateway long-polls the provider for commands."""

    # Other control servers of the provider to fail over to (besides [remote] url and
    # those the provider names in its answers).
    urls: tuple[str, ...] = ()
    # Seconds a poll is held at most. Each poll is a signed request the provider checks
    # (about 2 ms of its CPU): 10,000 gateways cost it 200 a second at 50 s, 500 at 20 s.
    # Below the 60 s idle timeout of common proxies and load balancers.
    wait: float = 50.0


@dataclass(frozen=True)
class CacheConfig:
    """The chunk cache that cached volumes share: a directory of chunk files for now (a
    raw cache device later), bounded to ``size`` bytes of chunk data."""

    path: str
    size: int = DEFAULT_CACHE_SIZE
    read_ahead: int = 4  # chunks fetched ahead of a sequential reader; 0: off


DEFAULT_UPDATE_SOCKET = "/run/sgw/update-agent.sock"


@dataclass(frozen=True)
class UpdatesConfig:
    """The update agent (sgw.gateway.updates.agent): how often it asks the provider which
    release to run, where the daemon reaches it, and where release slots live."""

    enabled: bool = True
    # Seconds between checks of the provider's plan: 15 minutes, so that a window of an
    # hour is not missed; `sgw updates now` reaches the agent at once through the daemon.
    check_interval: float = 900.0
    socket: str = DEFAULT_UPDATE_SOCKET
    root: str = "/opt/sgw"  # <root>/releases/<version>, <root>/current


@dataclass(frozen=True)
class HealthConfig:
    """The health reporter (sgw.gateway.health): how often it samples and uploads."""

    # Seconds between reports: the provider notices a silent gateway after a few of them
    # (its heartbeat), and 1,440 reports a day stay well inside the on-disk buffer.
    interval: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    """The optional local Prometheus endpoint (off unless ``listen`` is set)."""

    host: str | None = None
    port: int = 0
    token_file: str = ""
    allow: tuple[str, ...] = ()  # source networks (CIDR); empty: nobody beyond loopback


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``sgw gateway serve`` needs."""

    data_dir: str
    volumes: tuple[VolumeSpec, ...]
    listeners: tuple[Listener, ...]
    log_path: str
    log_size: int = DEFAULT_LOG_SIZE
    destage: DestageConfig = field(default_factory=DestageConfig)
    log_level: str = "info"
    remote: RemoteConfig | None = None
    cache: CacheConfig | None = None  # set when a volume is cached or [remote] is set
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    lio: LioConfig | None = None  # [lio]: iSCSI export through LIO (the appliance)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def parse_volume_flag(text: str) -> tuple[str, int]:
    """``NAME:SIZE`` from ``--volume``."""
    name, size, _mode = parse_volume_flag_mode(text)
    return name, size


def parse_volume_flag_mode(text: str) -> tuple[str, int, str]:
    """``NAME:SIZE[:MODE]`` from ``--volume``; MODE is stored (default) or cached."""
    name, size, mode, _snapshot = parse_volume_flag_full(text)
    return name, size, mode


def parse_volume_flag_full(text: str) -> tuple[str, int, str, str | None]:
    """``NAME:SIZE[:MODE[:SNAPSHOT]]`` from ``--volume``: MODE is stored (default) or
    cached; SNAPSHOT, the id of a snapshot to create the volume from."""
    name, sep, rest = text.partition(":")
    if not sep:
        raise ConfigError(f"--volume {text!r}: expected NAME:SIZE, for example vol0:10G")
    size, _, rest = rest.partition(":")
    mode, _, snapshot = rest.partition(":")
    mode = mode or MODE_STORED
    if mode not in MODES:
        raise ConfigError(
            f"--volume {text!r}: mode {mode!r} is not stored or cached (e.g. vol0:10G:cached)"
        )
    snap = _check_snapshot(snapshot, f"--volume {text!r}") if snapshot else None
    return _check_name(name), parse_size(size, f"--volume {name}"), mode, snap


def _check_snapshot(value: object, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ConfigError(f"{what}: snapshot {value!r} is not a snapshot id (a UUID)") from None


def _check_name(name: str) -> str:
    if not is_volume_name(name):
        raise ConfigError(f"volume name {name!r} is not valid: use {VOLUME_NAME_HELP}")
    return name


def load(
    config_file: str | None = None,
    *,
    data_dir: str | None = None,
    volumes: list[str] | None = None,
    nbd: list[str] | None = None,
    log_size: str | None = None,
    log_level: str | None = None,
    provider: str | None = None,
    provider_ca: str | None = None,
    activation_listen: str | None = None,
) -> GatewayConfig:
    """Builds the configuration from a TOML file, then applies the flags on top."""
    doc: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
    known = {
        *("data_dir", "log_level", "write_log", "destage", "nbd", "volumes", "remote", "cache"),
        *("activation", "control", "lio", "updates", "health", "metrics"),
    }
    for key in doc:
        if key not in known:
            raise ConfigError(f"config: unknown key {key!r} (known: {', '.join(sorted(known))})")

    ddir = data_dir or doc.get("data_dir")
    if not ddir or not isinstance(ddir, str):
        raise ConfigError("no data directory: pass --data-dir DIR or set data_dir in the config")
    ddir = os.path.abspath(ddir)

    wl = _table(doc, "write_log", {"path", "size"})
    log_path = str(wl.get("path") or os.path.join(ddir, "writelog"))
    lsize = parse_size(log_size or wl.get("size", DEFAULT_LOG_SIZE), "write_log.size")
    if lsize < MIN_DATA_SIZE + DATA_START:
        raise ConfigError(
            f"write_log.size: {lsize} bytes is too small; use at least "
            f"{(MIN_DATA_SIZE + DATA_START + (1 << 20) - 1) >> 20}M"
        )

    ds = _table(doc, "destage", {"start_fill", "idle_seconds", "batch", "pass_through_after"})
    destage = DestageConfig(
        start_fill=_number(ds, "start_fill", 0.5, 0.0, 1.0),
        idle_seconds=_number(ds, "idle_seconds", 1.0, 0.0, 86400.0),
        batch_bytes=parse_size(ds.get("batch", 32 << 20), "destage.batch"),
        pass_through_after=_number(ds, "pass_through_after", 60.0, 0.0, 86400.0),
    )

    specs: list[VolumeSpec] = []
    raw_vols = doc.get("volumes", [])
    if not isinstance(raw_vols, list):
        raise ConfigError("config: volumes must be an array of tables ([[volumes]])")
    for i, entry in enumerate(raw_vols):
        if not isinstance(entry, dict):
            raise ConfigError(f"config: volumes[{i}] must be a table")
        extra = set(entry) - {"name", "size", "path", "mode", "snapshot"}
        if extra:
            raise ConfigError(f"config: volumes[{i}] has unknown key(s) {sorted(extra)}")
        if "name" not in entry or "size" not in entry:
            raise ConfigError(f"config: volumes[{i}] needs a name and a size")
        name = _check_name(str(entry["name"]))
        size = parse_size(entry["size"], f"volume {name} size")
        mode = entry.get("mode", MODE_STORED)
        if mode not in MODES:
            raise ConfigError(f'volume {name}: mode {mode!r} is not "stored" or "cached"')
        if mode == MODE_CACHED:
            if entry.get("path"):
                raise ConfigError(
                    f"volume {name} is cached: it has no disk of its own (its data lives at "
                    "the provider and in [cache]); remove its path"
                )
            path = ""
        else:
            path = str(entry.get("path") or os.path.join(ddir, "volumes", f"{name}.img"))
        snap = entry.get("snapshot")
        snap = None if snap is None else _check_snapshot(snap, f"volume {name}")
        specs.append(VolumeSpec(name, size, path, mode, snap))
    for text in volumes or []:
        name, size, mode, snap = parse_volume_flag_full(text)
        path = "" if mode == MODE_CACHED else os.path.join(ddir, "volumes", f"{name}.img")
        specs.append(VolumeSpec(name, size, path, mode, snap))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"volume {spec.name} is configured twice")
        if spec.size % 4096:
            raise ConfigError(f"volume {spec.name}: size {spec.size} is not a multiple of 4 KiB")
        seen.add(spec.name)

    nbd_table = _table(doc, "nbd", {"listen"})
    listen = nbd_table.get("listen", [])
    if not isinstance(listen, list) or not all(isinstance(a, str) for a in listen):
        raise ConfigError('config: nbd.listen must be a list of strings like "unix:/run/x.sock"')
    addrs = list(listen) + list(nbd or [])
    if not addrs:
        addrs = [f"unix:{os.path.join(ddir, 'nbd.sock')}"]
    listeners = tuple(Listener.parse(str(a)) for a in addrs)

    remote = _remote(
        _table(
            doc, "remote", {"url", "concurrency", "pack_chunks", "bandwidth", "ca", "insecure_http"}
        ),
        provider,
        provider_ca,
    )
    activation = _activation(
        _table(doc, "activation", {"listen", "poll_interval"}), activation_listen
    )
    if not specs and remote is None:
        raise ConfigError(
            "no volumes: pass --volume NAME:SIZE or add [[volumes]] to the config (or "
            "connect a provider with [remote] url to create them from its console)"
        )
    control = _control(_table(doc, "control", {"urls", "wait"}), remote)
    cached = [s.name for s in specs if s.mode == MODE_CACHED]
    if cached and remote is None:
        raise ConfigError(
            f"volume {cached[0]} is cached, so it needs a provider: set [remote] url or "
            "pass --provider URL"
        )
    restored = [s.name for s in specs if s.snapshot]
    if restored and remote is None:
        raise ConfigError(
            f"volume {restored[0]} is created from a snapshot, which the provider keeps: "
            "set [remote] url or pass --provider URL"
        )
    # With a provider, cached volumes may also be created from its console at any time.
    cache_table = _table(doc, "cache", {"path", "size", "read_ahead"})
    cache = _cache(cache_table, ddir) if cached or remote is not None else None

    level = str(log_level or doc.get("log_level", "info")).lower()
    if level not in _LEVELS:
        raise ConfigError(f"log_level {level!r} is not one of {', '.join(_LEVELS)}")
    return GatewayConfig(
        data_dir=ddir,
        volumes=tuple(specs),
        listeners=listeners,
        log_path=log_path,
        log_size=lsize,
        destage=destage,
        log_level=level,
        remote=remote,
        cache=cache,
        activation=activation,
        control=control,
        lio=parse_lio(_table(doc, "lio", LIO_KEYS)),
        updates=_updates(_table(doc, "updates", {"enabled", "check_interval", "socket", "root"})),
        health=_health(_table(doc, "health", {"interval"})),
        metrics=_metrics(_table(doc, "metrics", {"listen", "token_file", "allow"})),
    )


def _health(table: dict[str, Any]) -> HealthConfig:
    interval = table.get("interval", 60.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        interval = -1
    if not 0.1 <= interval <= 3600:
        raise ConfigError(
            f"health.interval: {table.get('interval')!r} must be 0.1 to 3600 seconds (default 60)"
        )
    return HealthConfig(float(interval))


def _metrics(table: dict[str, Any]) -> MetricsConfig:
    listen = table.get("listen")
    if listen is None:
        if table:
            raise ConfigError('[metrics] needs listen = "ADDR:PORT" (or remove the table)')
        return MetricsConfig()
    host, sep, port = str(listen).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"metrics.listen {listen!r}: expected ADDR:PORT, e.g. 192.0.2.10:9750")
    token_file = table.get("token_file")
    if not isinstance(token_file, str) or not token_file:
        raise ConfigError(
            "metrics.token_file: give the file (mode 0600) that holds the bearer token "
            "scrapers must send; /metrics is never served without one"
        )
    allow = table.get("allow", [])
    if not isinstance(allow, list):
        raise ConfigError('metrics.allow: must be a list of networks like ["192.0.2.0/24"]')
    nets = []
    for item in allow:
        try:
            nets.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise ConfigError(
                f"metrics.allow: {item!r} is not a network (CIDR, e.g. 192.0.2.0/24)"
            ) from None
    return MetricsConfig(host, int(port), os.path.abspath(token_file), tuple(nets))


def _updates(table: dict[str, Any]) -> UpdatesConfig:
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("updates.enabled: must be true or false")
    interval = table.get("check_interval", 900.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        interval = -1
    if not 0.1 <= interval <= 86400:
        raise ConfigError(
            f"updates.check_interval: {table.get('check_interval')!r} must be 0.1 to 86400 "
            "seconds (default 900)"
        )
    paths = {}
    for key, default in (("socket", DEFAULT_UPDATE_SOCKET), ("root", "/opt/sgw")):
        value = table.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f'updates.{key}: must be a path like "{default}"')
        paths[key] = os.path.abspath(value)
    return UpdatesConfig(enabled, float(interval), paths["socket"], paths["root"])


def _control(table: dict[str, Any], remote: RemoteConfig | None) -> ControlConfig:
    urls = table.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ConfigError('control.urls: must be a list of URLs like ["https://p2:8480"]')
    wait = table.get("wait", 50.0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 1 <= wait <= 60:
        raise ConfigError(f"control.wait: {wait!r} must be 1 to 60 seconds")
    checked = tuple(check_url(u, "control.urls") for u in urls)
    if remote is not None:
        https_only = urllib.parse.urlsplit(remote.url).scheme == HTTPS
        for url in checked:
            _check_transport(url, "control.urls", remote.insecure_http, https_only)
    return ControlConfig(checked, float(wait))


def _check_transport(url: str, what: str, insecure_http: bool, https_only: bool) -> None:
    """ConfigError if the gateway's requests to ``url`` would go in plain http where that
    is not allowed (sgw.common.transport: loopback, or remote.insecure_http; never after
    an https provider URL)."""
    why = transport_refusal(url, insecure_http=insecure_http, https_only=https_only)
    if why is None:
        return
    if why == DOWNGRADE:
        fix = "use https, as remote.url does"
    else:
        fix = (
            "use https (with remote.ca) or set remote.insecure_http = true on a development network"
        )
    raise ConfigError(f"{what}: {url} is {why}; {fix}")


def _cache(table: dict[str, Any], ddir: str) -> CacheConfig:
    path = table.get("path") or os.path.join(ddir, "cache")
    if not isinstance(path, str):
        raise ConfigError('cache.path: must be a string like "/var/cache/sgw"')
    size = parse_size(table.get("size", DEFAULT_CACHE_SIZE), "cache.size")
    if size < MIN_CACHE_SIZE:
        raise ConfigError(
            f"cache.size: {size} bytes is too small; use at least {MIN_CACHE_SIZE >> 20}M"
        )
    ahead = table.get("read_ahead", 4)
    if isinstance(ahead, bool) or not isinstance(ahead, int) or not 0 <= ahead <= 256:
        raise ConfigError(f"cache.read_ahead: {ahead!r} must be a whole number of chunks, 0-256")
    return CacheConfig(os.path.abspath(path), size, ahead)


def check_url(text: str, what: str) -> str:
    """An ``http(s)://HOST[:PORT][/PATH]`` base URL, without a trailing slash."""
    parts = urllib.parse.urlsplit(text.strip())
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(
            f"{what}: {text!r} is not an http(s) URL (example: http://127.0.0.1:8480)"
        )
    return urllib.parse.urlunsplit(parts).rstrip("/")


def _activation(table: dict[str, Any], listen: str | None) -> ActivationConfig:
    interval = table.get("poll_interval", 5.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        interval = -1
    if not 0.05 <= interval <= 3600:
        raise ConfigError(f"activation.poll_interval: {interval!r} must be 0.05 to 3600 seconds")
    text = listen or table.get("listen")
    if text is None:
        return ActivationConfig(poll_interval=float(interval))
    what = "--activation-listen" if listen else "activation.listen"
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT, e.g. 0.0.0.0:80")
    return ActivationConfig(host, int(port), float(interval))


def _remote(
    table: dict[str, Any], provider: str | None, provider_ca: str | None = None
) -> RemoteConfig | None:
    url = provider or table.get("url")
    if url is None:
        if table:
            raise ConfigError("config: [remote] needs a url (the provider's block API)")
        return None
    what = "--provider" if provider else "remote.url"
    if not isinstance(url, str):
        raise ConfigError(f'{what}: must be a string like "http://127.0.0.1:8480"')
    conc = table.get("concurrency", 8)
    if isinstance(conc, bool) or not isinstance(conc, int) or not 1 <= conc <= 256:
        raise ConfigError(f"remote.concurrency: {conc!r} must be a whole number from 1 to 256")
    pack = table.get("pack_chunks", 4)
    if isinstance(pack, bool) or not isinstance(pack, int) or not 1 <= pack <= 64:
        raise ConfigError(f"remote.pack_chunks: {pack!r} must be a whole number from 1 to 64")
    if conc * pack > MAX_CHUNKS_IN_FLIGHT:
        raise ConfigError(
            f"remote.concurrency x remote.pack_chunks = {conc * pack}: at most "
            f"{MAX_CHUNKS_IN_FLIGHT} chunks may be in flight (each is held in memory)"
        )
    bw = table.get("bandwidth")
    bandwidth = None if bw is None else parse_size(bw, "remote.bandwidth (bytes per second)")
    ca = provider_ca or table.get("ca")
    if ca is not None and (not isinstance(ca, str) or not os.path.isfile(ca)):
        raise ConfigError(
            f"remote.ca: {ca!r} is not a file; give the provider's CA certificate (PEM), "
            "the tls/ca.pem that `sgw provider init` made"
        )
    insecure = table.get("insecure_http", False)
    if not isinstance(insecure, bool):
        raise ConfigError("remote.insecure_http: must be true or false")
    url = check_url(url, what)
    _check_transport(url, what, insecure, https_only=False)
    return RemoteConfig(
        url,
        concurrency=conc,
        pack_chunks=pack,
        bandwidth=bandwidth,
        ca=None if ca is None else os.path.abspath(ca),
        insecure_http=insecure,
    )


def _table(doc: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: [{key}] must be a table")
    extra = set(value) - allowed
    if extra:
        raise ConfigError(f"config: [{key}] has unknown key(s) {sorted(extra)}")
    return value


def _number(table: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"destage.{key}: {value!r} must be a number from {lo} to {hi}")
    return float(value)
