"""Calls between control servers, authenticated with a shared secret.

Every control server of one provider reads the same ``DATA_DIR/control.secret`` (32
random bytes as hex, mode 0600, made by ``sgw provider init`` or at first start; copy it
to every machine, like ``master.key``). A call carries ``x-sgw-peer: SERVER_ID TS MAC``,
the MAC an HMAC-SHA256 under the secret over the timestamp, method, path and the
SHA-256 of the body; a call more than ``PEER_SKEW_S`` off the receiver's clock is
refused. Peer calls only ring doorbells (the messages themselves are in the database),
so a replayed call within the window can do no more than wake a poll early.

The hub decides whom to ring (``ControlHub.route``); ``Doorbell`` makes the call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import ssl
import stat
import time
from collections.abc import Sequence

import httpx

from sgw.common.errors import ConfigError
from sgw.common.files import create_exclusively

LOG = logging.getLogger(__name__)

SECRET_FILE = "control.secret"
HEADER = "x-sgw-peer"
DOORBELL_PATH = "/v1/control/doorbell"
# Seconds a peer call's timestamp may differ from the receiver's clock.
PEER_SKEW_S = 60
_SECRET_BYTES = 32
# A server id (a UUID) and an HMAC-SHA256 in hex, as ``sign`` writes them.
_SERVER_ID = re.compile(r"[0-9A-Za-z._-]{1,64}")
_MAC = re.compile(r"[0-9a-f]{64}")


def load_or_create_secret(data_dir: str) -> bytes:
    """The shared secret of the control servers, made (0600) if there is none yet."""
    path = os.path.join(data_dir, SECRET_FILE)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    try:
        created = create_exclusively(path, secrets.token_hex(_SECRET_BYTES).encode() + b"\n")
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror or e}") from e
    if not created:  # another process made it first
        return _read(path)
    LOG.info("control secret created", extra={"path": path})
    return _read(path)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path} has mode {mode:04o}, so other users may read it; restrict it: "
                f"chmod 600 {path}"
            )
        text = os.read(fd, 1024).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ConfigError(
            f"{path} does not hold a control secret (hex, at least 16 bytes); copy it from "
            "another control server of this provider, or delete it to make a new one"
        )
    return secret


def _mac(secret: bytes, server_id: str, ts: int, request: tuple[str, str, bytes]) -> str:
    method, path, body = request
    message = "\n".join(
        [server_id, str(ts), method.upper(), path, hashlib.sha256(body).hexdigest()]
    )
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, server_id: str, method: str, path: str, body: bytes) -> str:
    """The ``x-sgw-peer`` header value of a call."""
    ts = int(time.time())
    return f"{server_id} {ts} {_mac(secret, server_id, ts, (method, path, body))}"


def well_formed(header: str | None, now: float) -> bool:
    """True if ``header`` has the form of an ``x-sgw-peer`` value and a timestamp within
    ``PEER_SKEW_S`` of ``now``: what can be checked before the body is read."""
    if not header:
        return False
    parts = header.split(" ")
    return (
        len(parts) == 3
        and _SERVER_ID.fullmatch(parts[0]) is not None
        and parts[1].isdigit()
        and len(parts[1]) <= 12
        and abs(int(parts[1]) - now) <= PEER_SKEW_S
        and _MAC.fullmatch(parts[2]) is not None
    )


def verify(secret: bytes, header: str | None, method: str, path: str, body: bytes) -> str | None:
    """The calling server's id if ``header`` authenticates the call, else None."""
    if header is None or not well_formed(header, time.time()):
        return None
    parts = header.split(" ")
    server_id, ts, mac = parts[0], int(parts[1]), parts[2]
    expected = _mac(secret, server_id, ts, (method, path, body))
    return server_id if hmac.compare_digest(expected, mac) else None


class Doorbell:
    """Rings peers' doorbells: one signed ``POST /v1/control/doorbell`` per call."""

    def __init__(
        self, secret: bytes, server_id: str, *, timeout_s: float, verify: ssl.SSLContext | bool
    ) -> None:
        self.secret = secret
        self.server_id = server_id
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            verify=verify,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def ring(
        self, url: str, *, gateways: Sequence[str] = (), messages: Sequence[str] = ()
    ) -> list[str]:
        """One doorbell call to a peer; the gateways it holds (empty if it failed)."""
        body = json.dumps({"gateways": list(gateways), "messages": list(messages)}).encode()
        header = sign(self.secret, self.server_id, "POST", DOORBELL_PATH, body)
        try:
            resp = await self._http.post(
                url.rstrip("/") + DOORBELL_PATH,
                content=body,
                headers={HEADER: header, "content-type": "application/json"},
            )
            if resp.status_code != 200:
                LOG.warning(
                    "doorbell refused by peer",
                    extra={"peer": url, "status": resp.status_code, "body": resp.text[:200]},
                )
                return []
            held = resp.json().get("held", [])
            return [str(g) for g in held] if isinstance(held, list) else []
        except (httpx.HTTPError, ValueError) as exc:
            LOG.warning("doorbell to peer failed: %s", exc, extra={"peer": url})
            return []

    async def aclose(self) -> None:
        await self._http.aclose()
