"""Activation keys: minted by an unactivated gateway, checked by the provider.

A key binds the gateway's Ed25519 public key to a short validity: it carries the public
key, an expiry time, a random nonce and the activation region, signed with the gateway's
identity key, so it proves that whoever minted it holds that key. The provider checks
the signature, the expiry and that the key was not used before; nothing is stored until
a key is used. Format: ``sgw2.`` + base64url(payload) + ``.`` + base64url(signature),
payload = public key (32 bytes) | expiry (8, big-endian Unix seconds) | nonce (16) |
commitment (16) | region (UTF-8).

Anyone who reaches the gateway's activation page gets a key; the *confirmation code*
(``new_code``: 12 characters, 60 bits) is shown only on the appliance's own console, and
the key commits to it: HMAC-SHA256(code, context | public key | nonce), 16 bytes. The
provider activates a key only with its code (``confirms``), so an intruder on the LAN
cannot take the appliance into an account of theirs (docs/adr/0008-activation-code.md).
Keys of gateways from before (``sgw1.``, no commitment) are read as ``commitment=None``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sgw.common.errors import ActivationKeyError
from sgw.common.signing import CLOCK_SKEW_S

PREFIX = "sgw2"
LEGACY_PREFIX = "sgw1"  # before confirmation codes: no commitment
# How long a key is valid (seconds): long enough to walk to the console, short enough
# that a key left in a browser history is useless.
VALIDITY_S = 30 * 60
_CONTEXT = b"sgw activation key v1\x00"
_FIXED = struct.Struct(">32sQ16s")
_COMMIT_SIZE = 16
_COMMIT_CONTEXT = b"sgw activation code v1\x00"
_REGION_MAX = 64
# Confirmation codes: Crockford's base32 (no I, L, O, U), 12 characters, shown in groups
# of four; typed in any case, with or without dashes and spaces.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 12
_CODE_READ = str.maketrans({"O": "0", "I": "1", "L": "1", "-": None, " ": None})


@dataclass(frozen=True, slots=True)
class ActivationKey:
    """A checked key: whose it is, until when, for which region; ``digest`` names it."""

    public_key: bytes
    expires: int
    region: str
    digest: str
    nonce: bytes = b""
    # The confirmation code's commitment; None for a key of a gateway from before codes.
    commitment: bytes | None = None

    def confirms(self, code: str) -> bool:
        """True if ``code`` is the confirmation code this key commits to."""
        if self.commitment is None:
            return False
        normal = normalize_code(code)
        if normal is None:
            return False
        return hmac.compare_digest(_commit(normal, self.public_key, self.nonce), self.commitment)


def new_code() -> str:
    """A new confirmation code: ``CODE_LENGTH`` random characters of ``CODE_ALPHABET``."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(text: str) -> str | None:
    """The code as minted (upper case, no dashes or spaces; O read as 0, I and L as 1), or
    None if it cannot be one."""
    normal = text.upper().translate(_CODE_READ)
    if len(normal) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in normal):
        return None
    return normal


def show_code(code: str) -> str:
    """The code as shown to the admin: groups of four (``ABCD-EFGH-JKMN``)."""
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def _commit(code: str, public: bytes, nonce: bytes) -> bytes:
    mac = hmac.new(code.encode(), _COMMIT_CONTEXT + public + nonce, hashlib.sha256)
    return mac.digest()[:_COMMIT_SIZE]


def mint(key: Ed25519PrivateKey, now: float, region: str = "", *, code: str) -> str:
    """A new key of ``key``'s public key, valid ``VALIDITY_S`` from ``now``, committing to
    the confirmation ``code`` (``new_code``)."""
    if len(region.encode()) > _REGION_MAX:
        raise ValueError(f"activation region {region[:80]!r} is longer than {_REGION_MAX} bytes")
    normal = normalize_code(code)
    if normal is None:
        raise ValueError("the confirmation code is not one new_code() makes")
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    nonce = secrets.token_bytes(16)
    payload = _FIXED.pack(public, int(now) + VALIDITY_S, nonce)
    payload += _commit(normal, public, nonce) + region.encode()
    signature = key.sign(_CONTEXT + payload)
    return f"{PREFIX}.{_b64(payload)}.{_b64(signature)}"


def check(text: str, now: float) -> ActivationKey:
    """The key in ``text`` if it is genuine and unexpired, else ActivationKeyError.

    Whether it was used before is the caller's to check (by ``digest``).
    """
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] not in (PREFIX, LEGACY_PREFIX):
        raise ActivationKeyError(
            "the activation key is malformed: copy it whole from the gateway "
            "(`sgw gateway activation-key` or its activation page)"
        )
    try:
        payload = _unb64(parts[1])
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise ActivationKeyError("the activation key is malformed: it is not base64url") from None
    fixed = _FIXED.size + (_COMMIT_SIZE if parts[0] == PREFIX else 0)
    if len(payload) < fixed or len(payload) > fixed + _REGION_MAX:
        raise ActivationKeyError("the activation key is malformed: wrong length")
    public, expires, nonce = _FIXED.unpack_from(payload)
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
        region = payload[fixed:].decode()
    except UnicodeDecodeError:
        raise ActivationKeyError("the activation key is malformed: bad region") from None
    digest = hashlib.sha256(payload).hexdigest()
    commitment = payload[_FIXED.size : fixed] if fixed > _FIXED.size else None
    return ActivationKey(public, expires, region, digest, nonce, commitment)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or any(c not in _ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
