"""HTTP Message Signatures (RFC 9421) against a real provider: what a signed request must
show, what is refused (replays, altered bodies, covered headers changed, other keys), the
old scheme during the transition, and a third party calling the block API with only the
``http-message-signatures`` library and httpx."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms

from sgw.common import message_signatures, signing
from tests.fixtures.management import FakeGateway, SecureProvider, activate

MIB = 1 << 20


def signed(
    p: SecureProvider,
    gw: FakeGateway,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    nonce: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Request:
    """A request signed as the gateway signs it, built (not sent) so a test can spoil it."""
    client = p.client()
    req = client.build_request(method, path, content=body, headers=headers or {})
    req.headers.update(
        message_signatures.sign_headers(
            gw.key,
            "gw:" + gw.gateway_id,
            method,
            req.headers["host"],
            req.url.raw_path,
            body_sha256=hashlib.sha256(body).digest() if body else None,
            created=int(time.time()),
            nonce=nonce,
        )
    )
    return req


def send(p: SecureProvider, req: httpx.Request) -> httpx.Response:
    return p.client().send(req)


def new_volume(p: SecureProvider, gw: FakeGateway, name: str = "v") -> str:
    body = json.dumps({"name": name, "size": MIB, "mode": "cached"}).encode()
    r = send(p, signed(p, gw, "POST", "/v1/volumes", body, headers=_JSON))
    assert r.status_code == 201, r.text
    vid: str = r.json()["id"]
    return vid


_JSON = {"content-type": "application/json"}


def test_replayed_request_is_refused(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    vid = new_volume(p, gw)
    req = signed(p, gw, "GET", f"/v1/volumes/{vid}")
    assert send(p, req).status_code == 200
    again = send(p, req)
    assert again.status_code == 401 and "replayed" in again.json()["message"]


def test_altered_body_is_refused_before_anything_is_stored(
    secure_provider: SecureProvider,
) -> None:
    """A chunk whose body was changed after signing (its Content-Digest no longer the
    body's) is refused, and the chunk is not stored."""
    p = secure_provider
    gw = activate(p, p.token, "gw")
    vid = new_volume(p, gw)
    data = secrets.token_bytes(4096)
    cid = hashlib.sha256(data).hexdigest()
    path = f"/v1/volumes/{vid}/chunks/{cid}"
    octets = {"content-type": "application/octet-stream", "x-sgw-sha256": cid}
    req = signed(p, gw, "PUT", path, data, headers=octets)
    altered = p.client().build_request("PUT", path, content=data[:-1] + b"\0", headers=req.headers)
    r = send(p, altered)
    assert r.status_code == 401
    assert "Content-Digest does not match the body" in r.json()["message"]
    assert send(p, signed(p, gw, "GET", path)).status_code == 404
    # The same chunk, signed over the bytes sent, is stored.
    assert send(p, signed(p, gw, "PUT", path, data, headers=octets)).status_code == 201
    assert send(p, signed(p, gw, "GET", path)).content == data


def test_a_body_without_a_covered_digest_is_refused(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    body = json.dumps({"name": "v", "size": MIB, "mode": "cached"}).encode()
    req = signed(p, gw, "POST", "/v1/volumes", headers=_JSON)  # signed without a body
    headers = {k: v for k, v in req.headers.items() if k != "content-length"}
    sent = p.client().build_request("POST", "/v1/volumes", content=body, headers=headers)
    r = send(p, sent)
    assert r.status_code == 401 and "does not cover content-digest" in r.json()["message"]


def test_uncovered_header_may_change_a_covered_one_may_not(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    vid = new_volume(p, gw)
    req = signed(p, gw, "GET", f"/v1/volumes/{vid}")
    req.headers["user-agent"] = "changed after signing"  # not covered
    assert send(p, req).status_code == 200
    # @authority is covered: the same request signed for another host name.
    req = signed(p, gw, "GET", f"/v1/volumes/{vid}")
    req.headers["host"] = f"localhost:{p.port}"
    r = send(p, req)
    assert r.status_code == 401 and "does not match" in r.json()["message"]
    # content-digest is covered: another digest for the same (empty) body.
    body = json.dumps({"name": "w", "size": MIB, "mode": "cached"}).encode()
    req = signed(p, gw, "POST", "/v1/volumes", body, headers=_JSON)
    req.headers["content-digest"] = message_signatures.content_digest(hashlib.sha256().digest())
    assert send(p, req).status_code == 401
    # @query is covered.
    req = signed(p, gw, "GET", "/v1/volumes?limit=1")
    moved = p.client().build_request("GET", "/v1/volumes?limit=2", headers=req.headers)
    assert send(p, moved).status_code == 401


def test_another_key_under_the_gateways_id_is_refused(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    vid = new_volume(p, gw)
    impostor = FakeGateway(gateway_id=gw.gateway_id)
    r = send(p, signed(p, impostor, "GET", f"/v1/volumes/{vid}"))
    assert r.status_code == 401 and f"bad signature from gw:{gw.gateway_id}" in r.json()["message"]


def test_stale_and_malformed_signatures_are_refused_from_the_head(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    req = signed(p, gw, "GET", "/v1/volumes")
    stale = req.headers["signature-input"].replace(
        f"created={int(time.time())}", f"created={int(time.time()) - signing.CLOCK_SKEW_S - 60}"
    )
    for inp, sig, word in (
        (stale, req.headers["signature"], "stale request"),
        ("sgw=garbage(", req.headers["signature"], "malformed"),
        (
            req.headers["signature-input"].replace('"@authority" ', ""),
            req.headers["signature"],
            "does not cover @authority",
        ),
        (
            req.headers["signature-input"].replace(';nonce="', ';nonce="x'),
            req.headers["signature"],
            "nonce",
        ),
    ):
        r = p.client().get("/v1/volumes", headers={"signature-input": inp, "signature": sig})
        assert r.status_code == 401 and word in r.json()["message"], (word, r.text)


def test_old_scheme_accepted_by_default_and_refused_with_the_setting(
    tmp_path: Path, secure_provider_factory: type[SecureProvider]
) -> None:
    def legacy(p: SecureProvider, gw: FakeGateway, vid: str) -> httpx.Response:
        path = f"/v1/volumes/{vid}"
        header = signing.sign(
            gw.key, "gw:" + gw.gateway_id, "GET", path.encode(), b"", timestamp=int(time.time())
        )
        return p.client().get(path, headers={"Authorization": header})

    p = secure_provider_factory(tmp_path / "default").start()
    gw = activate(p, p.token, "gw")
    assert legacy(p, gw, new_volume(p, gw)).status_code == 200
    strict = secure_provider_factory(
        tmp_path / "strict", extra_args=["--refuse-legacy-signatures"]
    ).start()
    gw = activate(strict, strict.token, "gw")
    vid = new_volume(strict, gw)
    r = legacy(strict, gw, vid)
    assert r.status_code == 401 and "--refuse-legacy-signatures" in r.json()["message"]
    assert send(strict, signed(strict, gw, "GET", f"/v1/volumes/{vid}")).status_code == 200


@dataclass
class _Message:
    """What the library signs: a request's method, URL and (writable) headers."""

    method: str
    url: str
    headers: httpx.Headers


def test_third_party_client_with_only_the_library_calls_the_block_api(
    secure_provider: SecureProvider,
) -> None:
    """An application that signs with ``http-message-signatures`` and httpx alone (sgw is
    used only to make its credentials: a gateway identity activated by the admin) writes
    and reads a block: RFC 9421 with its own label, component order and parameters."""
    p = secure_provider
    gw = activate(p, p.token, "third-party")
    key_id = "gw:" + gw.gateway_id
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: gw.key}),
    )

    def call(
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str],
        sent: bytes | None = None,
    ) -> httpx.Response:
        """``sent``: a body other than the one signed."""
        client = httpx.Client(base_url=p.url, verify=p.tls)
        req = client.build_request(method, path, content=body, headers=headers)
        covered = ["@method", "@path", "@query", "@authority", "content-type"]
        if body:
            covered.append("content-digest")
        signer.sign(
            _Message(req.method, str(req.url), req.headers),
            key_id=key_id,
            nonce=secrets.token_hex(16),
            label="app",
            covered_component_ids=covered,
            body=body or None,
        )
        if sent is not None:
            req = client.build_request(method, path, content=sent, headers=req.headers)
        with client:
            return client.send(req)

    doc = json.dumps({"name": "app-vol", "size": MIB, "mode": "cached"}).encode()
    r = call("POST", "/v1/volumes", doc, headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    data = secrets.token_bytes(8192)
    cid = hashlib.sha256(data).hexdigest()
    octets = {"content-type": "application/octet-stream", "x-sgw-sha256": cid}
    r = call("PUT", f"/v1/volumes/{vid}/chunks/{cid}", data, headers=octets)
    assert r.status_code == 201, r.text
    r = call("GET", f"/v1/volumes/{vid}/chunks/{cid}", headers={"content-type": "none"})
    assert r.status_code == 200 and r.content == data
    # Checked the same way as the gateway's: a body altered after signing is refused.
    other = secrets.token_bytes(8192)
    oid = hashlib.sha256(other).hexdigest()
    octets["x-sgw-sha256"] = oid
    r = call("PUT", f"/v1/volumes/{vid}/chunks/{oid}", other, sent=data, headers=octets)
    assert r.status_code == 401 and "Content-Digest does not match" in r.json()["message"]
