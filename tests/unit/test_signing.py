"""Request signatures, activation keys and the gateway's identity files, without a server."""

from __future__ import annotations

import base64
import os
import stat
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.common import activation_key, signing
from sgw.common.errors import ActivationKeyError, ConfigError, IdentityError
from sgw.gateway import config as cfg
from sgw.gateway.link.identity import (
    Credentials,
    load_or_create_code,
    load_or_create_key,
    read_credentials,
    write_credentials,
)


def test_signature_covers_every_part() -> None:
    key = Ed25519PrivateKey.generate()
    public = bytes.fromhex(signing.public_key_hex(key))
    header = signing.sign(key, "gw:abc", "post", b"/v1/x?y=1", b"body", timestamp=100)
    parsed = signing.parse_header(header)
    assert parsed is not None and parsed.key_id == "gw:abc" and parsed.timestamp == 100
    digest = signing.body_digest(b"body")
    assert signing.verify(public, parsed, "POST", b"/v1/x?y=1", digest)
    assert not signing.verify(public, parsed, "POST", b"/v1/x?y=1", signing.body_digest(b"x"))
    assert not signing.verify(public, parsed, "PUT", b"/v1/x?y=1", digest)
    assert not signing.verify(public, parsed, "POST", b"/v1/x?y=2", digest)
    for field, value in (("timestamp", 101), ("nonce", "0" * 32), ("key_id", "gw:abd")):
        forged = signing.SignedHeader(
            key_id=str(value) if field == "key_id" else parsed.key_id,
            timestamp=int(value) if field == "timestamp" else parsed.timestamp,
            nonce=str(value) if field == "nonce" else parsed.nonce,
            signature=parsed.signature,
        )
        assert not signing.verify(public, forged, "POST", b"/v1/x?y=1", digest), field
    other = bytes.fromhex(signing.public_key_hex(Ed25519PrivateKey.generate()))
    assert not signing.verify(other, parsed, "POST", b"/v1/x?y=1", digest)
    for bad in ("", "SGW1-Ed25519 key=x", header + ",", header.replace("ts=100", "ts=-1")):
        assert signing.parse_header(bad) is None, bad


@settings(max_examples=200, deadline=None)
@given(message=st.binary(max_size=600), flip=st.integers(min_value=0, max_value=10_000))
def test_verifier_agrees_with_the_signer(message: bytes, flip: int) -> None:
    """libsodium's check (the provider's) accepts what cryptography signs (the gateway's)
    and refuses any altered bit of the message or the signature."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    verifier = signing.Verifier(raw)
    signature = key.sign(message)
    assert verifier.verify(signature, message)
    if message:
        bad = bytearray(message)
        bad[flip % len(bad)] ^= 1 << (flip % 8)
        assert not verifier.verify(signature, bytes(bad))
    bad_sig = bytearray(signature)
    bad_sig[flip % 64] ^= 1 << (flip % 8)
    assert not verifier.verify(bytes(bad_sig), message)
    assert not verifier.verify(signature[:63], message)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert not signing.Verifier(other).verify(signature, message)


def test_verifier_refuses_a_key_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        signing.Verifier(b"\x01" * 31)


def test_canonical_form_and_scheme_are_exact() -> None:
    """The bytes signed are the documented ones (a provider written in another language
    computes the same), and only this scheme's headers are taken for signed ones."""
    canonical = signing.canonical_request(
        "post", b"/v1/x?y=%41", "ab" * 32, timestamp=1700000000, nonce="0f" * 16, key_id="gw:7"
    )
    assert canonical == b"\n".join(
        [b"SGW1-Ed25519", b"POST", b"/v1/x?y=%41", b"ab" * 32, b"1700000000", b"0f" * 16, b"gw:7"]
    )
    key = Ed25519PrivateKey.generate()
    header = signing.sign(key, "gw:7", "GET", b"/v1/x", b"", timestamp=1)
    assert signing.is_signed(header)
    for other in ("Bearer abc", "SGW1-Ed25519key=x", "sgw1-ed25519 key=x", ""):
        assert not signing.is_signed(other), other


def test_verify_takes_a_verifier_and_refuses_a_malformed_key() -> None:
    key = Ed25519PrivateKey.generate()
    raw = bytes.fromhex(signing.public_key_hex(key))
    parsed = signing.parse_header(signing.sign(key, "gw:1", "GET", b"/v1/x", b"", timestamp=9))
    assert parsed is not None
    digest = signing.body_digest(b"")
    assert signing.verify(signing.Verifier(raw), parsed, "GET", b"/v1/x", digest)
    # A stored key of the wrong size (a damaged row) refuses, never accepts.
    assert not signing.verify(raw[:31], parsed, "GET", b"/v1/x", digest)
    assert not signing.verify(b"", parsed, "GET", b"/v1/x", digest)


CODE = activation_key.new_code()


def mint(key: Ed25519PrivateKey, now: float, region: str = "") -> str:
    return activation_key.mint(key, now, region, code=CODE)


def test_a_key_commits_to_the_console_code_and_only_to_it() -> None:
    """The code is never in the key; the key's signed commitment tells the right code
    (in any case, with or without dashes, O/0 and I/L/1 alike) from every other."""
    key = Ed25519PrivateKey.generate()
    now = time.time()
    text = mint(key, now)
    assert text.startswith("sgw2.") and CODE not in text
    checked = activation_key.check(text, now)
    shown = activation_key.show_code(CODE)
    assert len(shown) == 14 and shown.count("-") == 2
    for typed in (CODE, shown, shown.lower(), " " + shown.replace("-", " ") + " "):
        assert checked.confirms(typed), typed
    other = activation_key.new_code()
    assert other != CODE and not checked.confirms(other)
    for bad in ("", "short", CODE + "0", "U" * 12, CODE[:-1] + "!"):
        assert not checked.confirms(bad), bad
    readable = "0O1IL" + CODE[5:]
    assert activation_key.normalize_code(readable) == "00111" + CODE[5:]
    # The commitment is signed: a changed one makes the key not genuine.
    prefix, payload, sig = text.split(".")
    raw = bytearray(activation_key._unb64(payload))
    raw[56] ^= 1  # the commitment's first byte (after key, expiry and nonce)
    with pytest.raises(ActivationKeyError, match="not genuine"):
        activation_key.check(f"{prefix}.{activation_key._b64(bytes(raw))}.{sig}", now)
    with pytest.raises(ValueError, match="confirmation code"):
        activation_key.mint(key, now, code="not a code")


def test_activation_key_round_trip_and_refusals() -> None:
    key = Ed25519PrivateKey.generate()
    now = time.time()
    text = mint(key, now, "eu-1")
    checked = activation_key.check(text, now + 60)
    assert checked.public_key.hex() == signing.public_key_hex(key)
    assert checked.region == "eu-1" and len(checked.digest) == 64
    with pytest.raises(ActivationKeyError, match="expired"):
        activation_key.check(text, now + activation_key.VALIDITY_S + 1)
    with pytest.raises(ActivationKeyError, match="30 minutes"):
        activation_key.check(mint(key, now + 7200), now)
    prefix, payload, sig = text.split(".")
    other = Ed25519PrivateKey.generate()
    resigned = mint(other, now, "eu-1").split(".")[2]
    with pytest.raises(ActivationKeyError, match="not genuine"):
        activation_key.check(f"{prefix}.{payload}.{resigned}", now)
    for bad in ("", "sgw1", "sgw2.a.b", "sgw1.!!.??", f"{prefix}.{payload[:-4]}.{sig}"):
        with pytest.raises(ActivationKeyError):
            activation_key.check(bad, now)
    # Two keys of one gateway differ (a new nonce each) and are used up separately.
    assert activation_key.check(mint(key, now), now).digest != checked.digest


def test_activation_key_limits_are_exact() -> None:
    """Expiry, the clock-skew bound, the region's length and the alphabet, each at its
    edge; each refusal says what is wrong."""
    key = Ed25519PrivateKey.generate()
    minted_at = 1_800_000_000
    text = mint(key, minted_at)
    expires = minted_at + activation_key.VALIDITY_S
    assert activation_key.check(text, expires - 0.5).expires == expires
    with pytest.raises(ActivationKeyError, match="expired"):
        activation_key.check(text, expires)
    earliest = expires - activation_key.VALIDITY_S - signing.CLOCK_SKEW_S
    assert activation_key.check(text, earliest).expires == expires
    with pytest.raises(ActivationKeyError, match="clock is wrong"):
        activation_key.check(text, earliest - 1)
    longest = "r" * 64
    assert activation_key.check(mint(key, minted_at, longest), expires - 1).region
    with pytest.raises(ValueError, match="longer than 64 bytes"):
        mint(key, minted_at, longest + "r")
    prefix, payload, sig = text.split(".")
    # Characters outside base64url are refused, not skipped by a lenient decoder (four, so
    # that the padding still fits and only the alphabet check can refuse the key).
    for bad, message in (
        (f"{prefix}.{payload[:8]}!!!!{payload[8:]}.{sig}", "not base64url"),
        (f"{prefix}.{payload}.{sig}.x", "copy it whole"),
        (f"{prefix}.{payload[:40]}.{sig}", "wrong length"),
    ):
        with pytest.raises(ActivationKeyError, match=message):
            activation_key.check(bad, minted_at)
    # A genuine signature over a region that is not UTF-8.
    public = bytes.fromhex(signing.public_key_hex(key))
    raw = struct.pack(">32sQ16s", public, expires, b"\0" * 16) + b"\0" * 16 + b"\xff"
    signature = key.sign(b"sgw activation key v1\0" + raw)
    forged = ".".join(
        [prefix, *(base64.urlsafe_b64encode(b).decode().rstrip("=") for b in (raw, signature))]
    )
    with pytest.raises(ActivationKeyError, match="bad region"):
        activation_key.check(forged, minted_at)


def test_the_activation_code_is_private_and_stable(tmp_path: Path) -> None:
    code = load_or_create_code(str(tmp_path))
    path = tmp_path / "activation-code"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert activation_key.normalize_code(code) == code
    assert load_or_create_code(str(tmp_path)) == code
    path.write_text("damaged\n")
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_code(str(tmp_path))


def test_identity_key_and_credentials_are_private(tmp_path: Path) -> None:
    key = load_or_create_key(str(tmp_path))
    path = tmp_path / "identity.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key(str(tmp_path))
    assert signing.public_key_hex(again) == signing.public_key_hex(key)
    assert read_credentials(str(tmp_path)) is None
    creds = Credentials("g", "a", "n", "gw:g", "https://p")
    write_credentials(str(tmp_path), creds)
    assert stat.S_IMODE((tmp_path / "credentials.json").stat().st_mode) == 0o600
    assert read_credentials(str(tmp_path)) == creds
    os.chmod(path, 0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_key(str(tmp_path))
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_key(str(tmp_path))


def test_gateway_refuses_plain_http_beyond_loopback(tmp_path: Path) -> None:
    base: dict[str, Any] = {"data_dir": str(tmp_path), "volumes": ["v:1G"]}
    ok = cfg.load(None, provider="http://127.0.0.1:8480", **base)
    assert ok.remote is not None and ok.remote.url == "http://127.0.0.1:8480"
    with pytest.raises(ConfigError, match="plain http"):
        cfg.load(None, provider="http://provider.example:8480", **base)
    conf = tmp_path / "g.toml"
    conf.write_text('[remote]\nurl = "http://10.0.0.5:8480"\ninsecure_http = true\n')
    dev = cfg.load(str(conf), **base)
    assert dev.remote is not None and dev.remote.insecure_http
    with pytest.raises(ConfigError, match="not a file"):
        cfg.load(None, provider="https://p:1", provider_ca=str(tmp_path / "no.pem"), **base)
    act = cfg.load(None, activation_listen="0.0.0.0:80", **base)
    assert (act.activation.host, act.activation.port) == ("0.0.0.0", 80)
    assert cfg.load(None, **base).activation.host is None
    with pytest.raises(ConfigError, match="HOST:PORT"):
        cfg.load(None, activation_listen="80", **base)
