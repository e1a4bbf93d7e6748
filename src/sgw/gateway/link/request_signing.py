"""Signs the gateway's requests to the provider as an httpx Auth: HTTP Message Signatures
(RFC 9421, Ed25519) with a Content-Digest (RFC 9530), ``sgw.common.message_signatures``.

One ``GatewayAuth`` is shared by every client of a gateway. Until activation it has no
key id and sends requests unsigned (a development provider in ``--insecure-dev`` mode
accepts them); the activation agent sets the key id once the credentials arrive, and
every request from then on is signed. ``candidate=True`` signs with the bare public key,
which only the call that fetches the credentials accepts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Generator

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sgw.common import message_signatures, signing


class GatewayAuth(httpx.Auth):
    """Adds ``Signature-Input``, ``Signature`` and (with a body) ``Content-Digest`` to each
    request (a new nonce every time, so a retried request is signed anew)."""

    requires_request_body = True

    def __init__(
        self,
        key: Ed25519PrivateKey,
        key_id: str | None = None,
        *,
        candidate: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.key_id = key_id
        if candidate:
            self.key_id = signing.PUBLIC_KEY_PREFIX + signing.public_key_hex(key)
        self.clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.key_id is not None:
            body = request.content
            known = request.extensions.get(signing.BODY_DIGEST_EXTENSION)
            sha256: bytes | None = None
            if known is not None:  # a plaintext chunk's id is its body's SHA-256
                sha256 = bytes.fromhex(known)
            elif body:
                sha256 = hashlib.sha256(body).digest()
            request.headers.update(
                message_signatures.sign_headers(
                    self.key,
                    self.key_id,
                    request.method,
                    request.headers["host"],
                    request.url.raw_path,
                    body_sha256=sha256,
                    created=int(self.clock()),
                )
            )
        yield request
