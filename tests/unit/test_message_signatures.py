"""sgw's RFC 9421 profile (``sgw.common.message_signatures``) against the
``http-message-signatures`` library: the canonical form's signature base is the
library's byte for byte, what the library signs in any other form is checked by it, and
what is altered is refused either way."""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    MappingKeyResolver,
    algorithms,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common import message_signatures as ms
from sgw.common import signing

KEY = Ed25519PrivateKey.generate()
VERIFIER = signing.Verifier(bytes.fromhex(signing.public_key_hex(KEY)))
SIGNER = HTTPMessageSigner(
    signature_algorithm=algorithms.ED25519,
    key_resolver=MappingKeyResolver(public_keys={}, private_keys={"gw:g1": KEY}),
)


@dataclass
class _Message:
    method: str
    url: str
    headers: httpx.Headers


def _raw(req: httpx.Request) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in req.headers.raw]


def _check(
    req: httpx.Request, *, method: str | None = None, target: bytes | None = None
) -> str | None:
    head = ms.parse(req.headers["signature-input"], req.headers["signature"])
    return ms.verify(
        VERIFIER,
        head,
        method=method or req.method,
        authority=req.headers["host"],
        target=target if target is not None else req.url.raw_path,
        headers=_raw(req),
        scheme=req.url.scheme,
    )


_SEGMENT = st.text("abcXYZ09-._~%20", min_size=1, max_size=12).filter(
    lambda s: "%" not in s.replace("%20", "")
)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
    segments=st.lists(_SEGMENT, min_size=1, max_size=4),
    query=st.sampled_from(["", "a=1", "wait=5&ack=x,y", "q=%2F%20&z"]),
    body=st.binary(max_size=64),
    port=st.sampled_from([None, 443, 8443]),
)
def test_canonical_base_is_the_librarys(
    method: str, segments: list[str], query: str, body: bytes, port: int | None
) -> None:
    """What the gateway signs is what the library would sign: the same signature base for
    the same components and parameters (so any RFC 9421 verifier accepts it)."""
    authority = "Provider.Example" + (f":{port}" if port else "")
    url = f"https://{authority}/" + "/".join(segments) + (f"?{query}" if query else "")
    req = httpx.Request(method, url, content=body)
    nonce = secrets.token_hex(16)
    created = 1_800_000_000
    ours = ms.sign_headers(
        KEY,
        "gw:g1",
        method,
        req.headers["host"],
        req.url.raw_path,
        body_sha256=hashlib.sha256(body).digest() if body else None,
        created=created,
        nonce=nonce,
    )
    prepared = SIGNER.prepare(
        _Message(method, str(req.url), req.headers),
        key_id="gw:g1",
        created=datetime.datetime.fromtimestamp(created, datetime.UTC),
        nonce=nonce,
        label=ms.LABEL,
        covered_component_ids=ms.WITH_BODY if body else ms.REQUIRED,
        body=body or None,
    )
    assert ours["Signature-Input"] == f"{ms.LABEL}={prepared.signature_params}"
    head = ms.parse(ours["Signature-Input"], ours["Signature"])
    assert head.params is not None  # the canonical form: checked without the library
    digest = ours.get("Content-Digest")
    assert digest == req.headers.get("content-digest")
    path, _, q = req.url.raw_path.decode().partition("?")
    base = ms.signature_base(
        method,
        req.headers["host"].lower().removesuffix(":443"),
        path,
        "?" + q,
        digest=digest,
        params=head.params,
    )
    assert base == prepared.signature_base
    assert VERIFIER.verify(head.signature, base)


def _library_signed(req: httpx.Request, covered: list[str], *, label: str = "app") -> httpx.Request:
    SIGNER.sign(
        _Message(req.method, str(req.url), req.headers),
        key_id="gw:g1",
        nonce=secrets.token_hex(16),
        label=label,
        covered_component_ids=covered,
        body=req.content or None,
    )
    return req


def test_other_forms_are_checked_by_the_library() -> None:
    req = _library_signed(
        httpx.Request(
            "POST",
            "https://p:8443/v1/volumes?x=1",
            content=b"{}",
            headers={"content-type": "application/json"},
        ),
        ["content-type", "@path", "@method", "@authority", "@query", "content-digest"],
    )
    head = ms.parse(req.headers["signature-input"], req.headers["signature"])
    assert head.params is None and head.key_id == "gw:g1" and head.digest_covered
    assert _check(req) == req.headers["content-digest"]
    with pytest.raises(ms.SignatureError):
        _check(req, target=b"/v1/volumes?x=2")
    req.headers["content-type"] = "text/plain"  # covered
    with pytest.raises(ms.SignatureError):
        _check(req)


def test_canonical_form_refuses_what_was_altered() -> None:
    req = httpx.Request("PUT", "https://p/v1/volumes/v/chunks/c", content=b"data")
    req.headers.update(
        ms.sign_headers(
            KEY,
            "gw:g1",
            "PUT",
            "p",
            req.url.raw_path,
            body_sha256=hashlib.sha256(b"data").digest(),
            created=1_800_000_000,
        )
    )
    assert _check(req) == ms.content_digest(hashlib.sha256(b"data").digest())
    for altered in ({"method": "POST"}, {"target": b"/v1/volumes/v/chunks/d"}):
        with pytest.raises(ms.SignatureError):
            _check(req, **altered)
    req.headers["content-digest"] = ms.content_digest(hashlib.sha256(b"other").digest())
    with pytest.raises(ms.SignatureError):
        _check(req)
    other = signing.Verifier(bytes.fromhex(signing.public_key_hex(Ed25519PrivateKey.generate())))
    req.headers["content-digest"] = ms.content_digest(hashlib.sha256(b"data").digest())
    head = ms.parse(req.headers["signature-input"], req.headers["signature"])
    with pytest.raises(ms.SignatureError):
        ms.verify(
            other,
            head,
            method="PUT",
            authority="p",
            target=req.url.raw_path,
            headers=_raw(req),
            scheme="https",
        )


@pytest.mark.parametrize(
    ("signature_input", "word"),
    [
        ("sgw=(", "malformed"),
        ('a=("@method");created=1;keyid="gw:x";nonce="' + "0" * 32 + '"', "does not cover"),
        (
            'sgw=("@method" "@authority" "@path" "@query");created=1;keyid="gw:x";nonce="short"',
            "nonce",
        ),
        (
            'sgw=("@method" "@authority" "@path" "@query");keyid="gw:x";nonce="' + "0" * 32 + '"',
            "created",
        ),
        (
            'sgw=("@method" "@authority" "@path" "@query");created=1;keyid="gw:x";'
            'alg="hmac-sha256";'
            'nonce="' + "0" * 32 + '"',
            "only 'ed25519'",
        ),
    ],
)
def test_malformed_signature_inputs_are_named(signature_input: str, word: str) -> None:
    signature = "sgw=:" + "A" * 86 + "==:"
    if signature_input.startswith("a="):
        signature = "a=:" + "A" * 86 + "==:"
    with pytest.raises(ms.SignatureError, match=word):
        ms.parse(signature_input, signature)


def test_digest_of_reads_rfc_9530_fields() -> None:
    sha = hashlib.sha256(b"x").digest()
    assert ms.digest_of(ms.content_digest(sha)) == sha
    sha512 = "sha-512=:" + "A" * 86 + "==:"
    assert ms.digest_of(f"{sha512}, {ms.content_digest(sha)}") == sha
    with pytest.raises(ms.SignatureError, match="sha-256"):
        ms.digest_of(sha512)


def test_the_worked_example_in_the_block_api_docs_verifies_with_the_library() -> None:
    """docs/block-api.md's example (key 00..1f): what sgw signs is what the library
    accepts, and the docs' headers are the ones sgw makes."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    key_id = "gw:5f0c8a52-0d7e-4c8e-9d1a-3b6f2e9a7c41"
    body = b'{"name": "app-vol", "size": 1073741824, "mode": "cached"}'
    ours = ms.sign_headers(
        key,
        key_id,
        "POST",
        "provider.example:8480",
        b"/v1/volumes",
        body_sha256=hashlib.sha256(body).digest(),
        created=1796600000,
        nonce="8f1d2c3b4a5968778695a4b3c2d1e0f0",
    )
    docs = (Path(__file__).parents[2] / "docs" / "block-api.md").read_text()
    for name, value in ours.items():
        assert f"{name}: {value}\n" in docs, name
    headers = httpx.Headers({"host": "provider.example:8480", **ours})
    library = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={key_id: key.public_key()}, private_keys={}),
    )
    message = _Message("POST", "https://provider.example:8480/v1/volumes", headers)
    (result,) = library.verify(message, max_age=None, body=body)
    assert result.parameters["nonce"] == "8f1d2c3b4a5968778695a4b3c2d1e0f0"
