"""Activation on the gateway's side (DESIGN.md section 4).

While the gateway has no credentials it:

- serves the activation page on its local network (``[activation] listen``; port 80 on
  the appliance): ``GET /?activationRegion=R`` answers ``302 Found`` to the console with
  a fresh one-time activation key in the query (``activationKey=...``), bound to the
  gateway's public key and valid for 30 minutes;
- asks the provider every ``poll_interval`` seconds for its credentials, with a request
  signed by its identity key (the gateway opens every connection; the provider never
  calls in).

Once an admin has activated the key (``sgw activate KEY --name NAME``), the next poll
gets the credentials: they are stored (mode 0600), every later request is signed with
them, and the activation page closes for good (it is not started again once the
credentials exist). The credentials carry the provider's TUF root, pinned then as the
trusted root of updates unless the image has one of its own (``updates.trust.pin_root``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import h11
import httpx

from sgw.common import activation_key
from sgw.common.errors import SgwError
from sgw.gateway.config import ActivationConfig, RemoteConfig
from sgw.gateway.link.identity import (
    Credentials,
    load_or_create_code,
    read_credentials,
    write_credentials,
)
from sgw.gateway.link.release_root import BAKED_ROOT, metadata_dir, pin_root
from sgw.gateway.link.request_signing import GatewayAuth
from sgw.gateway.listening import Listener

LOG = logging.getLogger(__name__)

CREDENTIALS_PATH = "/v1/gateway/credentials"
# Longest request head the activation page reads (bytes) and how long it waits for one
# (seconds): a browser's GET is far smaller and quicker; anything else is dropped.
_MAX_HEAD = 16 * 1024
_READ_TIMEOUT_S = 10.0
# Longest wait between polls after failures (seconds).
_POLL_BACKOFF_MAX_S = 60.0
_REASONS = {302: b"Found", 404: b"Not Found", 405: b"Method Not Allowed"}


def tls_verify(remote: RemoteConfig) -> ssl.SSLContext | bool:
    """What the gateway's HTTP clients verify the provider with: the pinned CA if one
    was given at deploy time, else the system's trust store."""
    if remote.ca is None:
        return True
    return ssl.create_default_context(cafile=remote.ca)


class ActivationPage:
    """The activation HTTP endpoint: redirects a browser to the console with a new key."""

    def __init__(self, auth: GatewayAuth, console_url: str, code: str) -> None:
        self.auth = auth
        self.console_url = console_url.rstrip("/")
        self.code = code  # the confirmation code its keys commit to (never served)
        self.listener: Listener | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Serves the page on ``host:port`` (or on ``sock``, handed over by the daemon
        this one replaced)."""
        address = f"{host}:{port}"
        if sock is None:
            self.listener = Listener.tcp(host, port, self._serve_socket, address=address)
        else:
            self.listener = Listener(address, sock, self._serve_socket)
        await self.listener.start()
        LOG.info("activation page open", extra={"listen": address})

    def _serve_socket(self, sock: socket.socket) -> Awaitable[asyncio.AbstractServer]:
        return asyncio.start_server(self._serve, sock=sock)

    @property
    def port(self) -> int | None:
        return None if self.listener is None else self.listener.port

    async def close(self) -> None:
        if self.listener is None:
            return
        self.listener.close()
        for task in list(self._handlers):
            task.cancel()
        self.listener = None
        LOG.info("activation page closed")

    def answer(self, target: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for a GET of ``target``."""
        parts = urllib.parse.urlsplit(target)
        if parts.path != "/":
            return 404, {"content-type": "text/plain"}, b"not found\n"
        query = urllib.parse.parse_qs(parts.query)
        region = query.get("activationRegion", [""])[0][:64]
        key = activation_key.mint(self.auth.key, time.time(), region, code=self.code)
        location = f"{self.console_url}/?" + urllib.parse.urlencode(
            {"activationKey": key, "activationRegion": region}
        )
        LOG.info("activation key handed out", extra={"region": region})
        return 302, {"location": location, "cache-control": "no-store"}, b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                event = await _next_request(conn, reader)
            if event is None:
                return
            if event.method not in (b"GET", b"HEAD"):
                status, headers, body = 405, {"allow": "GET"}, b"method not allowed\n"
            else:
                status, headers, body = self.answer(event.target.decode("ascii", "replace"))
            headers = {**headers, "content-length": str(len(body)), "connection": "close"}
            reason = _REASONS.get(status, b"")
            response = h11.Response(
                status_code=status, headers=list(headers.items()), reason=reason
            )
            out = conn.send(response)
            if event.method != b"HEAD" and body:
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            writer.write(out)
            await writer.drain()
        except (TimeoutError, h11.ProtocolError, OSError) as exc:
            LOG.debug("activation page: connection dropped: %s", exc)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


async def _next_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        return None


class Activation:
    """Runs the activation page and the credentials poll until the gateway is activated."""

    def __init__(
        self,
        data_dir: str,
        remote: RemoteConfig | None,
        config: ActivationConfig,
        auth: GatewayAuth,
        baked_root: Path = BAKED_ROOT,
    ) -> None:
        self.data_dir = data_dir
        self.baked_root = baked_root
        self.remote = remote
        self.config = config
        self.auth = auth
        self.credentials = read_credentials(data_dir)
        if self.credentials is not None:
            auth.key_id = self.credentials.key_id
        self.page: ActivationPage | None = None
        self._poll: asyncio.Task[None] | None = None
        self.activated = asyncio.Event()

    @property
    def listener(self) -> Listener | None:
        """The activation page's listening socket while the page is open."""
        return None if self.page is None else self.page.listener

    async def start(self, page_socket: socket.socket | None = None) -> None:
        """Activated: nothing to do. Else serves the page (on ``page_socket`` if the daemon
        this one replaced handed it over) and polls for the credentials."""
        if self.credentials is not None:
            self.activated.set()
            LOG.info(
                "gateway activated",
                extra={
                    "gateway": self.credentials.gateway_id,
                    "gateway_name": self.credentials.name,
                },
            )
            return
        if self.remote is None:
            LOG.info("gateway not activated and no provider configured: no activation")
            return
        code = await asyncio.to_thread(load_or_create_code, self.data_dir)
        LOG.info(
            "gateway not activated: activate it with a key from its page and the "
            "confirmation code on its console (`sgw gateway activation-code`)"
        )
        if self.config.host is not None:
            self.page = ActivationPage(self.auth, self.remote.url, code)
            await self.page.listen(self.config.host, self.config.port, page_socket)
        self._poll = asyncio.get_running_loop().create_task(self._poll_loop(), name="activation")

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
            self._poll = None
        if self.page is not None:
            await self.page.close()
            self.page = None

    async def _poll_loop(self) -> None:
        assert self.remote is not None
        candidate = GatewayAuth(self.auth.key, candidate=True)
        wait = self.config.poll_interval
        async with httpx.AsyncClient(
            base_url=self.remote.url,
            auth=candidate,
            verify=tls_verify(self.remote),
            timeout=httpx.Timeout(30.0, connect=5.0),
        ) as client:
            while True:
                try:
                    resp = await client.get(CREDENTIALS_PATH)
                except httpx.HTTPError as exc:
                    LOG.warning("activation: provider unreachable: %s", exc)
                    wait = min(_POLL_BACKOFF_MAX_S, wait * 2)
                else:
                    if resp.status_code == 200:
                        try:
                            await self._activated(resp.json())
                            return
                        except (OSError, SgwError, KeyError, TypeError, ValueError) as exc:
                            LOG.error("activation: cannot store the credentials: %s", exc)
                            wait = min(_POLL_BACKOFF_MAX_S, wait * 2)
                    if resp.status_code == 404:
                        wait = self.config.poll_interval
                    else:
                        LOG.warning(
                            "activation: the provider refused the poll: %s %s",
                            resp.status_code,
                            resp.text[:300],
                        )
                        wait = min(_POLL_BACKOFF_MAX_S, wait * 2)
                await asyncio.sleep(wait)

    async def _activated(self, doc: dict[str, Any]) -> None:
        assert self.remote is not None
        credentials = Credentials(
            gateway_id=str(doc["gateway_id"]),
            account_id=str(doc["account_id"]),
            name=str(doc["name"]),
            key_id=str(doc["key_id"]),
            provider_url=self.remote.url,
            timezone=doc.get("timezone"),
        )
        root = doc.get("release_root")
        delivered = None if root is None else json.dumps(root).encode()
        fingerprint = await asyncio.to_thread(
            pin_root, metadata_dir(self.data_dir), delivered, self.baked_root
        )
        await asyncio.to_thread(write_credentials, self.data_dir, credentials)
        self.credentials = credentials
        self.auth.key_id = credentials.key_id
        if self.page is not None:
            await self.page.close()
            self.page = None
        self.activated.set()
        LOG.info(
            "gateway activated: credentials stored, activation page closed",
            extra={
                "gateway": credentials.gateway_id,
                "gateway_name": credentials.name,
                "release_root": fingerprint,
            },
        )
