"""Activation keys: minted by an unactivated gateway, checked by the provider.

A key binds the gateway's Ed25519 public key to a short validity: it carries the public
key, an expiry time, a random nonce and the activation region, signed with the gateway's
identity key, so it proves that whoever minted it holds that key. The provider checks
the signature, the expiry and that the key was not used before; nothing is stored until
a key is used. Format: ``sgw1.`` + base64url(payload) + ``.`` + base64url(signature),
payload = public key (32 bytes) | expiry (8, big-endian Unix seconds) | nonce (16) |
region (UTF-8).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sgw.common.errors import ActivationKeyError
from sgw.common.signing import CLOCK_SKEW_S

PREFIX = "sgw1"
# How long a key is valid (seconds): long enough to walk to the console, short enough
# that a key left in a browser history is useless.
VALIDITY_S = 30 * 60
_CONTEXT = b"sgw activation key v1\x00"
_FIXED = struct.Struct(">32sQ16s")
_REGION_MAX = 64


@dataclass(frozen=True, slots=True)
class ActivationKey:
    """A checked key: whose it is, until when, for which region; ``digest`` names it."""

    public_key: bytes
    expires: int
    region: str
    digest: str


def mint(key: Ed25519PrivateKey, now: float, region: str = "") -> str:
    """A new key of ``key``'s public key, valid ``VALIDITY_S`` from ``now``."""
    if len(region.encode()) > _REGION_MAX:
        raise ValueError(f"activation region {region[:80]!r} is longer than {_REGION_MAX} bytes")
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    payload = _FIXED.pack(public, int(now) + VALIDITY_S, secrets.token_bytes(16))
    payload += region.encode()
    signature = key.sign(_CONTEXT + payload)
    return f"{PREFIX}.{_b64(payload)}.{_b64(signature)}"


def check(text: str, now: float) -> ActivationKey:
    """The key in ``text`` if it is genuine and unexpired, else ActivationKeyError.

    Whether it was used before is the caller's to check (by ``digest``).
    """
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise ActivationKeyError(
            "the activation key is malformed: copy it whole from the gateway "
            "(`sgw gateway activation-key` or its activation page)"
        )
    try:
        payload = _unb64(parts[1])
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise ActivationKeyError("the activation key is malformed: it is not base64url") from None
    if len(payload) < _FIXED.size or len(payload) > _FIXED.size + _REGION_MAX:
        raise ActivationKeyError("the activation key is malformed: wrong length")
    public, expires, _nonce = _FIXED.unpack_from(payload)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _CONTEXT + payload)
    except (InvalidSignature, ValueError):
        raise ActivationKeyError(
            "the activation key is not genuine (its signature does not match); get a new "
            "one from the gateway"
        ) from None
    if expires <= now:
        raise ActivationKeyError(
            "the activation key has expired (keys are valid for 30 minutes); get a new one "
            "from the gateway"
        )
    if expires > now + VALIDITY_S + CLOCK_SKEW_S:
        raise ActivationKeyError(
            "the activation key is valid for longer than 30 minutes: the gateway's clock "
            "is wrong; set its time (NTP) and get a new key"
        )
    try:
        region = payload[_FIXED.size :].decode()
    except UnicodeDecodeError:
        raise ActivationKeyError("the activation key is malformed: bad region") from None
    digest = hashlib.sha256(payload).hexdigest()
    return ActivationKey(public, expires, region, digest)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or any(c not in _ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
