"""The optional local Prometheus endpoint: ``GET /metrics`` with a bearer token.

Off unless ``[metrics] listen`` is set (the primary path to Prometheus is the
provider's). The token file must be readable by its owner only (mode 0600 or stricter),
else the listener does not start and says why. Requests from outside ``allow`` (and
loopback) are dropped before anything is read, as the appliance's firewall does; a
request without the token (compared in constant time) gets 401, whatever it asks for.
One small request per connection: a scraper's GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import stat

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from sgw.common.errors import ConfigError
from sgw.gateway.config import MetricsConfig

LOG = logging.getLogger(__name__)

# A scraper's request head is a few hundred bytes; anything longer or slower is dropped.
MAX_HEAD = 8 * 1024
READ_TIMEOUT_S = 5.0


def load_token(path: str) -> str:
    """The bearer token from ``path``; ConfigError (naming the file and the fix) if it is
    missing, empty or readable by others."""
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(
            f"metrics.token_file {path}: cannot read it ({exc.strerror}); create it with a "
            "random token, mode 0600"
        ) from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"metrics.token_file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may "
            f"read the token; chmod 600 {path}"
        )
    if len(token) < 16:
        raise ConfigError(
            f"metrics.token_file {path}: the token is empty or shorter than 16 characters; "
            "put a long random one in it (e.g. openssl rand -hex 32)"
        )
    return token


class MetricsServer:
    """Serves ``registry`` on ``config.host:config.port`` to holders of the token."""

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry) -> None:
        assert config.host is not None
        self.config = config
        self.registry = registry
        self._token = load_token(config.token_file).encode()
        self._allow = [ipaddress.ip_network(n) for n in config.allow]
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.config.host, self.config.port, limit=MAX_HEAD
        )
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        LOG.info("metrics endpoint listening", extra={"address": f"{self.address}"})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _allowed(self, peer: str) -> bool:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_loopback or any(addr in net for net in self._allow)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("peername")
            if not peer or not self._allowed(str(peer[0])):
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            auth = b""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "authorization":
                    auth = value.strip().encode("latin-1")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._token):
                _respond(writer, 401, b"a bearer token is required\n", b"text/plain")
            elif method != "GET" or path.partition("?")[0] != "/metrics":
                _respond(writer, 404, b"only GET /metrics is served here\n", b"text/plain")
            else:
                body = generate_latest(self.registry)
                _respond(writer, 200, body, CONTENT_TYPE_LATEST.encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: bytes) -> None:
    reason = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found"}[status]
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n" % (
        status,
        reason,
        ctype,
        len(body),
    )
    if status == 401:
        head += b'WWW-Authenticate: Bearer realm="sgw"\r\n'
    writer.write(head + b"\r\n" + body)
