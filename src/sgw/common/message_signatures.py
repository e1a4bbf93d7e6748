"""Signed requests in HTTP Message Signatures (RFC 9421, Ed25519) with a Content-Digest
(RFC 9530): sgw's profile, which gateways send and third parties can make with any
RFC 9421 library (docs/adr/0010-http-message-signatures.md, docs/block-api.md).

A request carries::

    Content-Digest: sha-256=:BASE64(SHA-256(body)):          (when it has a body)
    Signature-Input: sgw=("@method" "@authority" "@path" "@query" "content-digest");\\
        created=UNIX-SECONDS;keyid="gw:ID";alg="ed25519";nonce="32-HEX-DIGITS"
    Signature: sgw=:BASE64(Ed25519 signature of the signature base):

The signature base is RFC 9421 section 2.5's, one line per covered component and the
``@signature-params`` line last. This is the *canonical form*: the components in that
order, the parameters in that order (the order ``http-message-signatures`` writes them).
A request in it is checked by the few lines here (the signature base built by string
concatenation, the signature by libsodium: as cheap as the old scheme); any other valid
RFC 9421 signature of one Ed25519 key (other components as well, another label,
parameters in another order) is checked by the ``http-message-signatures`` library,
5 to 10 times dearer (``bench/signatures``) and so kept off the control channel's hot
path. The tests check that both build the same signature base.

The key id, the clock-skew window and the nonces are the old scheme's
(``sgw.common.signing``): ``gw:ID`` once activated, ``pk:HEX`` for the credentials call,
``created`` within ``CLOCK_SKEW_S`` of the provider's clock, each (key id, nonce) once.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver
from http_message_signatures import InvalidSignature as LibraryInvalidSignature
from http_message_signatures.algorithms import HTTPSignatureAlgorithm

from sgw.common.signing import CLOCK_SKEW_S, NONCE_HEX, Verifier

LABEL = "sgw"
ALGORITHM = "ed25519"
# What every signature must cover; ``content-digest`` too when the request has a body.
REQUIRED = ("@method", "@authority", "@path", "@query")
WITH_BODY = (*REQUIRED, "content-digest")
_KEY_ID_CHARS = r"[!#-\[\]-~]{1,80}"  # printable ASCII but '"' and '\' (no escapes)
_CANONICAL_INPUT = re.compile(
    rf'{LABEL}=(\("@method" "@authority" "@path" "@query"( "content-digest")?\);'
    rf'created=([0-9]{{1,12}});keyid="({_KEY_ID_CHARS})";alg="{ALGORITHM}";'
    rf'nonce="([0-9a-f]{{{NONCE_HEX}}})")'
)
_CANONICAL_SIGNATURE = re.compile(rf"{LABEL}=:([A-Za-z0-9+/]{{86}}==):")
_CANONICAL_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]{43}=):")
_NONCE = re.compile(rf"[0-9a-f]{{{NONCE_HEX}}}")


class SignatureError(ValueError):
    """A signature that cannot be checked or does not hold; the message says why and
    what to send instead."""


@dataclass(frozen=True, slots=True)
class SignatureHead:
    """What a request's Signature-Input and Signature say, read without its body.

    ``params`` is the ``@signature-params`` value when the request is in the canonical
    form (None otherwise: the library checks it). ``timestamp`` is ``created``."""

    key_id: str
    timestamp: int
    nonce: str
    digest_covered: bool
    signature: bytes
    params: str | None
    signature_input: str
    signature_header: str
    expires: int | None = None


def content_digest(sha256: bytes) -> str:
    """The Content-Digest field value of a body whose SHA-256 is ``sha256``."""
    return "sha-256=:" + base64.b64encode(sha256).decode("ascii") + ":"


def signature_base(
    method: str, authority: str, path: str, query: str, *, digest: str | None, params: str
) -> bytes:
    """RFC 9421's signature base of a canonical-form request (``query`` with its "?")."""
    lines = [
        f'"@method": {method}',
        f'"@authority": {authority}',
        f'"@path": {path}',
        f'"@query": {query}',
    ]
    if digest is not None:
        lines.append(f'"content-digest": {digest}')
    lines.append(f'"@signature-params": {params}')
    return "\n".join(lines).encode("ascii")


def sign_headers(
    key: Ed25519PrivateKey,
    key_id: str,
    method: str,
    authority: str,
    target: bytes,
    *,
    body_sha256: bytes | None,
    created: int,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers that sign a request (Content-Digest when ``body_sha256`` is given):
    ``target`` is the path and query as sent, percent-encoding kept."""
    nonce = nonce or secrets.token_hex(NONCE_HEX // 2)
    path, _, query = target.decode("ascii").partition("?")
    digest = None if body_sha256 is None else content_digest(body_sha256)
    covered = WITH_BODY if digest is not None else REQUIRED
    params = (
        "(" + " ".join(f'"{c}"' for c in covered) + ")"
        f';created={created};keyid="{key_id}";alg="{ALGORITHM}";nonce="{nonce}"'
    )
    base = signature_base(
        method.upper(), authority.lower(), path or "/", "?" + query, digest=digest, params=params
    )
    signature = base64.b64encode(key.sign(base)).decode("ascii")
    headers = {"Signature-Input": f"{LABEL}={params}", "Signature": f"{LABEL}=:{signature}:"}
    if digest is not None:
        headers["Content-Digest"] = digest
    return headers


def parse(signature_input: str, signature: str) -> SignatureHead:
    """The parts of a request's signature headers, from their form alone (no key, no
    clock, no body); SignatureError naming what is wrong."""
    m = _CANONICAL_INPUT.fullmatch(signature_input.strip())
    s = _CANONICAL_SIGNATURE.fullmatch(signature.strip())
    if m is not None and s is not None:
        return SignatureHead(
            key_id=m.group(4),
            timestamp=int(m.group(3)),
            nonce=m.group(5),
            digest_covered=m.group(2) is not None,
            signature=base64.b64decode(s.group(1)),
            params=m.group(1),
            signature_input=signature_input,
            signature_header=signature,
        )
    return _parse_general(signature_input, signature)


def _parse_general(signature_input: str, signature: str) -> SignatureHead:
    inputs, signatures = _dictionary(signature_input), _dictionary(signature)
    if inputs is None or signatures is None:
        raise SignatureError(
            "malformed Signature-Input or Signature header: each must be a Structured Field "
            "Dictionary (RFC 9421 section 4)"
        )
    if len(inputs) != 1 or inputs.keys() != signatures.keys():
        raise SignatureError(
            "send exactly one signature: one label, the same in Signature-Input and Signature"
        )
    label = next(iter(inputs))
    members, params = inputs[label]
    sig_value = signatures[label][0]
    if not isinstance(members, list) or not isinstance(sig_value, bytes) or len(sig_value) != 64:
        raise SignatureError(
            f"signature {label!r}: Signature-Input must be an Inner List of components and "
            "Signature a Byte Sequence of the 64-byte Ed25519 signature"
        )
    components = [name for name, item_params in members if not item_params]
    missing = [c for c in REQUIRED if c not in components]
    if missing:
        raise SignatureError(
            f"signature {label!r} does not cover {', '.join(missing)}: cover at least "
            f"{' '.join(REQUIRED)} (and content-digest with a body)"
        )
    key_id, created, nonce, alg = (params.get(p) for p in ("keyid", "created", "nonce", "alg"))
    expires = params.get("expires")
    if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
        raise SignatureError(f"signature {label!r}: expires must be an Integer (Unix seconds)")
    if not isinstance(key_id, str) or not isinstance(created, int) or isinstance(created, bool):
        raise SignatureError(
            f"signature {label!r} needs the parameters keyid (a String) and created (an Integer)"
        )
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise SignatureError(
            f"signature {label!r} needs a nonce parameter of {NONCE_HEX} lowercase hex digits "
            "(128 random bits, new for every request)"
        )
    if alg is not None and alg != ALGORITHM:
        raise SignatureError(f"signature {label!r}: alg {alg!r}; only {ALGORITHM!r} is accepted")
    return SignatureHead(
        key_id=key_id,
        timestamp=created,
        nonce=nonce,
        digest_covered="content-digest" in components,
        signature=sig_value,
        params=None,
        signature_input=signature_input,
        signature_header=signature,
        expires=expires,
    )


def digest_of(value: str) -> bytes:
    """The SHA-256 a Content-Digest field value carries; SignatureError if it carries none."""
    m = _CANONICAL_DIGEST.fullmatch(value.strip())
    if m is not None:
        return base64.b64decode(m.group(1))
    members = _dictionary(value)
    found = members.get("sha-256") if members is not None else None
    if found is None or not isinstance(found[0], bytes) or len(found[0]) != 32:
        raise SignatureError(
            "Content-Digest must carry the body's SHA-256: sha-256=:BASE64:, RFC 9530"
        )
    return found[0]


def verify(
    verifier: Verifier,
    head: SignatureHead,
    *,
    method: str,
    authority: str,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    scheme: str,
) -> str | None:
    """Checks ``head``'s signature of this request by ``verifier``'s key: the value of the
    Content-Digest it covers (None if it covers none; the caller compares it with the
    body's). SignatureError if the signature does not hold."""
    path, _, query = target.decode("latin-1").partition("?")
    if head.params is not None:
        digest = _header(headers, b"content-digest") if head.digest_covered else None
        if head.digest_covered and digest is None:
            raise SignatureError("the signature covers content-digest but there is no such header")
        base = signature_base(
            method, authority.lower(), path or "/", "?" + query, digest=digest, params=head.params
        )
        if not verifier.verify(head.signature, base):
            raise SignatureError("the signature does not match the request")
        return digest
    return _verify_general(verifier, head, method, f"{scheme}://{authority}{path}?{query}", headers)


def _verify_general(
    verifier: Verifier,
    head: SignatureHead,
    method: str,
    url: str,
    headers: Iterable[tuple[bytes, bytes]],
) -> str | None:
    message = _Message(method, url.removesuffix("?"), _Fields(list(headers)))
    checker = _Verifier(signature_algorithm=_SodiumEd25519, key_resolver=_OneKey(verifier))
    try:
        results = checker.verify(message, max_age=None, require_components=REQUIRED)
    except LibraryInvalidSignature as exc:
        raise SignatureError(f"the signature does not hold: {exc}") from None
    covered = results[0].covered_components
    return covered.get('"content-digest"')


def _dictionary(value: str) -> dict[str, Any] | None:
    """A Structured Field Dictionary (RFC 9651) as ``http_sf`` parses it; None if malformed."""
    try:
        parsed: Any = http_sf.parse(value.encode("latin-1"), tltype="dictionary")
    except (ValueError, TypeError, UnicodeEncodeError, binascii.Error):
        return None
    return parsed if isinstance(parsed, dict) else None


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in headers if k.lower() == name]
    return ", ".join(values) if values else None


@dataclass
class _Message:
    """A request as ``http-message-signatures`` reads it."""

    method: str
    url: str
    headers: _Fields


class _Fields:
    """A request's header lines (ASGI's byte pairs), read-only, as the library reads them."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def items(self) -> Iterator[tuple[str, str]]:
        return ((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self.items())


class _SodiumEd25519(HTTPSignatureAlgorithm):
    """The library's ``ed25519`` checked by our libsodium ``Verifier`` (the provider's)."""

    algorithm_id = ALGORITHM

    def __init__(self, public_key: Any = None, private_key: Any = None) -> None:
        if not isinstance(public_key, Verifier):
            raise SignatureError("no verification key")
        self.verifier = public_key

    def sign(self, message: bytes) -> bytes:
        raise NotImplementedError("verification only")

    def verify(self, signature: bytes, message: bytes) -> None:
        if not self.verifier.verify(signature, message):
            raise LibraryInvalidSignature("the signature does not match the request")


class _OneKey(HTTPSignatureKeyResolver):
    """The key the provider looked up from the key id before the body was read."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def resolve_public_key(self, key_id: str) -> Verifier:
        return self.verifier

    def resolve_private_key(self, key_id: str) -> Any:
        raise NotImplementedError("verification only")


class _Verifier(HTTPMessageVerifier):
    """The library's verifier without its own clock checks: the provider checked
    ``created`` against its clock and the skew window before the body was read."""

    max_clock_skew = datetime.timedelta(seconds=CLOCK_SKEW_S)

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        return None
