"""Signed gateway requests: the canonical form both sides compute, signing and verifying.

A gateway signs every request to the provider with its Ed25519 identity key
(docs/adr/0003-gateway-authentication.md). The signature covers::

    SGW1-Ed25519 \\n METHOD \\n PATH?QUERY \\n SHA-256(body) hex \\n TIMESTAMP \\n NONCE \\n KEY-ID

``PATH?QUERY`` is the request target exactly as sent (percent-encoding kept), the
timestamp whole Unix seconds, the nonce 32 hex digits (128 random bits), the key id the
gateway's id (``gw:<id>``) once activated or its public key (``pk:<hex>``) while it asks
for its credentials. The header is
``Authorization: SGW1-Ed25519 key=<key id>, ts=<timestamp>, nonce=<nonce>, sig=<base64url>``.
The provider accepts a timestamp within ``CLOCK_SKEW_S`` of its own clock and each
(key id, nonce) once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

SCHEME = "SGW1-Ed25519"
# Seconds a request's timestamp may differ from the provider's clock, either way. Five
# minutes, as in AWS SigV4: wide enough for an appliance whose NTP is a little off, and
# the nonces of that window are what the provider must remember.
CLOCK_SKEW_S = 300
NONCE_HEX = 32
GATEWAY_PREFIX = "gw:"
PUBLIC_KEY_PREFIX = "pk:"
# An httpx request extension: the body's SHA-256 (hex) where the caller knows it (a chunk's
# id is the SHA-256 of its plaintext), so that the signer does not hash the body again.
BODY_DIGEST_EXTENSION = "sgw_body_sha256"
_HEADER = re.compile(
    rf"{SCHEME}\s+key=([!-~]{{1,80}}?),\s*ts=([0-9]{{1,12}}),\s*"
    rf"nonce=([0-9a-f]{{{NONCE_HEX}}}),\s*sig=([A-Za-z0-9_-]{{86}})"
)


@dataclass(frozen=True, slots=True)
class SignedHeader:
    """The parts of a signed request's Authorization header."""

    key_id: str
    timestamp: int
    nonce: str
    signature: bytes


def body_digest(body: bytes) -> str:
    """Lowercase hex SHA-256 of a request body (of the empty string for none)."""
    return hashlib.sha256(body).hexdigest()


def canonical_request(
    method: str, target: bytes, digest: str, *, timestamp: int, nonce: str, key_id: str
) -> bytes:
    """The bytes a signature covers (see the module doc)."""
    return b"\n".join(
        [
            SCHEME.encode(),
            method.upper().encode("ascii"),
            target,
            digest.encode("ascii"),
            str(timestamp).encode("ascii"),
            nonce.encode("ascii"),
            key_id.encode("utf-8"),
        ]
    )


def sign(
    key: Ed25519PrivateKey,
    key_id: str,
    method: str,
    target: bytes,
    body: bytes,
    *,
    timestamp: int,
    nonce: str | None = None,
    digest: str | None = None,
) -> str:
    """The Authorization header value of a request. ``digest``: ``body_digest(body)`` if
    the caller has it already (a plaintext chunk's id is that very hash)."""
    nonce = nonce or secrets.token_hex(NONCE_HEX // 2)
    message = canonical_request(
        method,
        target,
        digest or body_digest(body),
        timestamp=timestamp,
        nonce=nonce,
        key_id=key_id,
    )
    sig = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode("ascii")
    return f"{SCHEME} key={key_id}, ts={timestamp}, nonce={nonce}, sig={sig}"


def is_signed(header: str) -> bool:
    """True if an Authorization header value claims this scheme."""
    return header.startswith(SCHEME + " ")


def parse_header(header: str) -> SignedHeader | None:
    """The parts of a header value of this scheme; None if it is malformed."""
    m = _HEADER.fullmatch(header.strip())
    if m is None:
        return None
    try:
        sig = base64.urlsafe_b64decode(m.group(4) + "==")
    except (binascii.Error, ValueError):
        return None
    return SignedHeader(m.group(1), int(m.group(2)), m.group(3), sig)


def verify(
    public_key: bytes | Verifier, header: SignedHeader, method: str, target: bytes, digest: str
) -> bool:
    """True if ``header``'s signature over this request is by ``public_key``."""
    message = canonical_request(
        method,
        target,
        digest,
        timestamp=header.timestamp,
        nonce=header.nonce,
        key_id=header.key_id,
    )
    if isinstance(public_key, Verifier):
        verifier = public_key
    else:
        try:
            verifier = Verifier(public_key)
        except ValueError:
            return False
    return verifier.verify(header.signature, message)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw public key of ``key`` as 64 lowercase hex digits."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class Verifier:
    """An Ed25519 public key that checks signatures (RFC 8032) with libsodium through
    PyNaCl: 45 us a check here against OpenSSL's 94 us, and the GIL released meanwhile.
    The provider checks every gateway request with it."""

    __slots__ = ("_key",)

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(public_key)}")
        self._key = bytes(public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is this key's over ``message``."""
        if len(signature) != 64:
            return False
        try:
            crypto_sign_open(signature + message, self._key)
        except (BadSignatureError, ValueError):
            return False
        return True
