"""Signed gateway requests against a real provider: what is refused (401, logged) and what
a gateway may touch (its own volumes and snapshots only)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import zstandard

from sgw.common import message_signatures, signing
from sgw.gateway.link.request_signing import GatewayAuth
from sgw.provider.blockstore.maps import ChunkMaps
from sgw.provider.db import schema
from sgw.provider.management.gateways import OWNER_TRUST_S, Gateways
from tests.fixtures.clock import FakeClock
from tests.fixtures.control_db import control_db
from tests.fixtures.daemons import ProviderProcess
from tests.fixtures.management import FakeGateway, SecureProvider, activate, new_account

KIB = 1 << 10
MIB = 1 << 20


def refusals(p: SecureProvider) -> list[dict[str, object]]:
    """The provider's logged refusals (structured log lines)."""
    out = []
    for line in p.log_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("msg", "").startswith("request refused"):
            out.append(doc)
    return out


def send_signed(
    p: SecureProvider,
    gw: FakeGateway,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
    tamper: bool = False,
) -> httpx.Response:
    """A request signed by hand, so that each part of the signature can be spoiled."""
    header = signing.sign(
        gw.key,
        "gw:" + gw.gateway_id,
        method,
        path.encode(),
        body,
        timestamp=int(time.time()) if timestamp is None else timestamp,
        nonce=nonce,
    )
    if tamper:
        body = body + b" "
    headers = {"Authorization": header, "content-type": "application/json"}
    return p.client().request(method, path, content=body, headers=headers)


def test_bad_signature_stale_timestamp_and_replay_are_401_and_logged(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    body = json.dumps({"name": "v", "size": MIB, "mode": "cached"}).encode()
    ok = send_signed(p, gw, "POST", "/v1/volumes", body)
    assert ok.status_code == 201, ok.text

    # The body changed after signing.
    r = send_signed(p, gw, "POST", "/v1/volumes", body, tamper=True)
    assert r.status_code == 401 and "bad signature" in r.json()["message"]
    # Signed by another key under this gateway's id.
    impostor = FakeGateway(gateway_id=gw.gateway_id)
    r = send_signed(p, impostor, "GET", "/v1/volumes/" + ok.json()["id"])
    assert r.status_code == 401 and "bad signature" in r.json()["message"]
    # A path other than the one signed.
    header = signing.sign(
        gw.key, "gw:" + gw.gateway_id, "GET", b"/v1/volumes/x", b"", timestamp=int(time.time())
    )
    r = p.client().get("/v1/volumes/" + ok.json()["id"], headers={"Authorization": header})
    assert r.status_code == 401
    # Outside the clock-skew window, either way.
    for skew in (-signing.CLOCK_SKEW_S - 30, signing.CLOCK_SKEW_S + 30):
        r = send_signed(p, gw, "GET", "/v1/volumes", timestamp=int(time.time()) + skew)
        assert r.status_code == 401 and "stale request" in r.json()["message"]
    # The same request again (same nonce): a replay.
    nonce = uuid.uuid4().hex
    ts = int(time.time())
    path = f"/v1/volumes/{ok.json()['id']}"
    first = send_signed(p, gw, "GET", path, timestamp=ts, nonce=nonce)
    assert first.status_code == 200
    replay = send_signed(p, gw, "GET", path, timestamp=ts, nonce=nonce)
    assert replay.status_code == 401 and "replayed" in replay.json()["message"]
    # Garbage and unknown key ids.
    for header in (
        "SGW1-Ed25519 nonsense",
        f"SGW1-Ed25519 key=gw:{uuid.uuid4()}, ts=1, nonce={'0' * 32}, sig={'A' * 86}",
        "Basic dXNlcjpwYXNz",
    ):
        r = p.client().get("/v1/volumes", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.headers["www-authenticate"]

    reasons = " ".join(str(d["msg"]) for d in refusals(p))
    for word in ("bad signature", "stale request", "replayed", "malformed"):
        assert word in reasons, word
    assert all(d["level"] == "warning" and d["path"] for d in refusals(p))


def test_gateway_touches_only_its_own_volumes_and_snapshots(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    a = activate(p, p.token, "gw-a")
    b = activate(p, p.token, "gw-b")
    ca = p.client(auth=a.auth())
    cb = p.client(auth=b.auth())
    admin = p.admin()

    vol_a = ca.post("/v1/volumes", json={"name": "a", "size": MIB, "mode": "cached"})
    assert vol_a.status_code == 201
    va = vol_a.json()["id"]
    # Bound to the gateway that made it, whatever it asks for.
    listed = admin.get("/v1/volumes").json()
    assert [v["gateway_id"] for v in listed] == [a.gateway_id]
    steal = cb.post(
        "/v1/volumes",
        json={"name": "b", "size": MIB, "mode": "cached", "gateway_id": a.gateway_id},
    )
    assert steal.status_code == 404

    data = b"\x01" * (4 * KIB)
    cid = hashlib.sha256(data).hexdigest()
    put = ca.put(
        f"/v1/volumes/{va}/chunks/{cid}",
        content=data,
        headers={"x-sgw-sha256": cid, "content-type": "application/octet-stream"},
    )
    assert put.status_code == 201, put.text
    commit = ca.post(
        f"/v1/volumes/{va}/commits",
        json={"base_version": 0, "idempotency_key": "k1", "changes": {"0": cid}},
    )
    assert commit.status_code == 200, commit.text
    snap_a = ca.post(f"/v1/volumes/{va}/snapshots").json()["id"]
    block_snap = ca.post("/v1/snapshots", json={"volume_size": MIB}).json()["id"]

    # Gateway B: every read and write of A's volume and snapshots is "not found".
    for method, path, kw in (
        ("GET", f"/v1/volumes/{va}", {}),
        ("GET", f"/v1/volumes/{va}/map", {}),
        ("GET", f"/v1/volumes/{va}/chunks/{cid}", {}),
        (
            "PUT",
            f"/v1/volumes/{va}/chunks/{cid}",
            {"content": data, "headers": {"x-sgw-sha256": cid}},
        ),
        (
            "POST",
            f"/v1/volumes/{va}/commits",
            {"json": {"base_version": 1, "idempotency_key": "x", "changes": {"0": None}}},
        ),
        ("POST", f"/v1/volumes/{va}/snapshots", {}),
        ("DELETE", f"/v1/volumes/{va}", {}),
        ("GET", f"/v1/snapshots/{snap_a}", {}),
        ("GET", f"/v1/snapshots/{snap_a}/blocks/0", {}),
        ("GET", f"/v1/snapshots/{snap_a}/blocks", {}),
        ("GET", f"/v1/snapshots/{block_snap}", {}),
        ("DELETE", f"/v1/snapshots/{snap_a}", {}),
        ("POST", f"/v1/snapshots/{block_snap}/complete", {}),
        ("GET", f"/v1/snapshots/{snap_a}/changed-blocks", {}),
    ):
        r = cb.request(method, path, **kw)
        assert r.status_code == 404, (method, path, r.text)
    # Nor through a snapshot it does not own: as a parent, a source, or a comparison.
    assert (
        cb.post(
            "/v1/snapshots", json={"volume_size": MIB, "parent_snapshot_id": snap_a}
        ).status_code
        == 404
    )
    r = cb.post(
        "/v1/volumes",
        json={"name": "copy", "size": MIB, "mode": "cached", "from_snapshot_id": snap_a},
    )
    assert r.status_code == 404
    own = cb.post("/v1/snapshots", json={"volume_size": MIB}).json()["id"]
    cb.post(f"/v1/snapshots/{own}/complete")
    r = cb.get(f"/v1/snapshots/{own}/changed-blocks", params={"first_snapshot_id": snap_a})
    assert r.status_code == 404

    # A keeps its data; its snapshot outlives the volume and stays A's.
    assert ca.get(f"/v1/volumes/{va}/chunks/{cid}").content == data
    assert ca.delete(f"/v1/volumes/{va}").status_code == 204
    assert ca.get(f"/v1/snapshots/{snap_a}/blocks/0").content == data
    assert cb.get(f"/v1/snapshots/{snap_a}").status_code == 404
    copy = ca.post(
        "/v1/volumes",
        json={"name": "copy", "size": MIB, "mode": "cached", "from_snapshot_id": snap_a},
    )
    assert copy.status_code == 201
    # The account's token sees all of it.
    assert admin.get(f"/v1/snapshots/{snap_a}").status_code == 200


def test_signed_chunk_puts_check_the_data_against_the_chunk_id(
    secure_provider: SecureProvider,
) -> None:
    """A signed plaintext body is checked against its chunk id by the digest its signature
    covered (not hashed again): a body that is not the chunk is refused and stores nothing,
    as is one larger than the chunk size; zstd bodies are inflated and hashed."""
    p = secure_provider
    gw = activate(p, p.token, "gw-chunks")
    c = p.client(auth=gw.auth())
    vid = c.post("/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"}).json()["id"]
    chunk = bytes(range(256)) * (64 * KIB // 256)
    cid = hashlib.sha256(chunk).hexdigest()
    path = f"/v1/volumes/{vid}/chunks/{cid}"

    def put(body: bytes, **headers: str) -> httpx.Response:
        return c.put(path, content=body, headers={"x-sgw-sha256": cid, **headers})

    wrong = put(chunk[:-1] + b"x")
    assert wrong.status_code == 400 and "SHA-256" in wrong.json()["message"], wrong.text
    big = put(chunk * 17)  # 1088 KiB, the chunk size is 1 MiB
    assert big.status_code == 413 and "larger than" in big.json()["message"], big.text
    assert c.get(path).status_code == 404  # nothing stored
    frame = zstandard.ZstdCompressor().compress(chunk[:-1] + b"x")
    assert put(frame, **{"content-encoding": "zstd"}).status_code == 400
    assert c.get(path).status_code == 404
    assert put(chunk).status_code == 201
    assert c.get(path).content == chunk
    frame = zstandard.ZstdCompressor().compress(chunk)
    assert put(frame, **{"content-encoding": "zstd"}).status_code == 200  # there already


def test_gateway_of_another_account_sees_nothing(secure_provider: SecureProvider) -> None:
    p = secure_provider
    a = activate(p, p.token, "gw-a")
    _other, other_token = new_account(p, "other")
    c = activate(p, other_token, "gw-c")
    va = p.client(auth=a.auth()).post(
        "/v1/volumes", json={"name": "a", "size": MIB, "mode": "cached"}
    )
    vid = va.json()["id"]
    cc = p.client(auth=c.auth())
    assert cc.get(f"/v1/volumes/{vid}").status_code == 404
    assert cc.get(f"/v1/volumes/{vid}/map").status_code == 404
    # Its own volume of the same name is fine: names are per account.
    assert (
        cc.post("/v1/volumes", json={"name": "a", "size": MIB, "mode": "cached"}).status_code == 201
    )


def test_unactivated_gateway_may_only_ask_for_its_credentials(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = FakeGateway()
    cand = p.client(auth=gw.candidate_auth())
    assert cand.get("/v1/gateway/credentials").status_code == 404
    assert cand.get("/v1/volumes/" + str(uuid.uuid4())).status_code == 401
    assert (
        cand.post("/v1/volumes", json={"name": "x", "size": MIB, "mode": "cached"}).status_code
        == 401
    )
    r = p.admin().post(
        "/v1/activations",
        json={"activation_key": gw.activation_key(), "name": "g", "confirmation_code": gw.code},
    )
    assert r.status_code == 201
    creds = cand.get("/v1/gateway/credentials")
    assert creds.status_code == 200 and creds.json()["key_id"] == "gw:" + r.json()["id"]
    assert creds.headers["cache-control"] == "no-store"
    # Someone else's key cannot fetch them.
    assert (
        p.client(auth=FakeGateway().candidate_auth()).get("/v1/gateway/credentials").status_code
        == 404
    )


def test_insecure_dev_still_acts_for_dev_but_checks_credentials_sent(
    provider: ProviderProcess,
) -> None:
    """--insecure-dev keeps serving requests without credentials as account dev."""
    p = provider
    r = httpx.post(f"{p.url}/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"})
    assert r.status_code == 201
    bad = httpx.get(f"{p.url}/v1/volumes/{r.json()['id']}", headers={"Authorization": "Bearer x"})
    assert bad.status_code == 401  # credentials, when sent, are checked even here


def checked(req: httpx.Request, key: FakeGateway, **override: object) -> str | None:
    """``message_signatures.verify`` of a request GatewayAuth signed, as the provider
    checks it (``override``: method or target as if the request were altered)."""
    head = message_signatures.parse(req.headers["signature-input"], req.headers["signature"])
    verifier = signing.Verifier(bytes.fromhex(signing.public_key_hex(key.key)))
    return message_signatures.verify(
        verifier,
        head,
        method=str(override.get("method", req.method)),
        authority=req.headers["host"],
        target=bytes(override.get("target", req.url.raw_path)),  # type: ignore[call-overload]
        headers=[(k.lower(), v) for k, v in req.headers.raw],
        scheme="https",
    )


def test_gateway_auth_signs_each_retry_anew() -> None:
    gw = FakeGateway(gateway_id=str(uuid.uuid4()))
    auth = GatewayAuth(gw.key, "gw:" + gw.gateway_id)
    req = httpx.Request("PUT", "https://p/v1/volumes/x/chunks/y?a=1", content=b"data")
    one = next(auth.sync_auth_flow(req)).headers["signature"]
    signed = next(auth.sync_auth_flow(req))
    assert signed.headers["signature"] != one
    assert "authorization" not in signed.headers
    digest = message_signatures.content_digest(hashlib.sha256(b"data").digest())
    assert checked(signed, gw) == digest == signed.headers["content-digest"]
    for override in ({"target": b"/v1/volumes/x/chunks/y?a=2"}, {"method": "GET"}):
        with pytest.raises(message_signatures.SignatureError):
            checked(signed, gw, **override)


def test_gateway_auth_signs_the_digest_its_caller_gives() -> None:
    """A chunk PUT hands its id (the plaintext's SHA-256) to the signer instead of having
    the body hashed again: the Content-Digest the signature covers is that digest."""
    gw = FakeGateway(gateway_id=str(uuid.uuid4()))
    auth = GatewayAuth(gw.key, "gw:" + gw.gateway_id)
    given = hashlib.sha256(b"other").digest()
    req = httpx.Request(
        "PUT",
        "https://p/c",
        content=b"data",
        extensions={signing.BODY_DIGEST_EXTENSION: given.hex()},
    )
    signed = next(auth.sync_auth_flow(req))
    assert checked(signed, gw) == message_signatures.content_digest(given)


def test_gateway_auth_covers_no_digest_without_a_body() -> None:
    gw = FakeGateway(gateway_id=str(uuid.uuid4()))
    signed = next(
        GatewayAuth(gw.key, "gw:" + gw.gateway_id).sync_auth_flow(
            httpx.Request("GET", "https://p/v1/gateway/messages?wait=5")
        )
    )
    assert "content-digest" not in signed.headers
    assert checked(signed, gw) is None


def test_a_volumes_gateway_is_trusted_from_the_cache_for_a_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk uploads do not read the volume's owner each time: a found binding is trusted
    for OWNER_TRUST_S, for that gateway only; nothing is trusted that was not read."""
    url = control_db(tmp_path, "acct", ["gw-a", "gw-b"])
    sessions = schema.session_factory(schema.make_engine(url))
    maps = ChunkMaps(sessions)
    vol = maps.create_volume("acct", "v", MIB, gateway_id="gw-a").id
    gateways = Gateways(sessions)
    clock = FakeClock(1000.0)
    monkeypatch.setattr(time, "monotonic", clock)
    assert not gateways.owns_volume_known("gw-a", vol)  # never read
    assert not gateways.owns_volume("gw-b", vol)
    assert gateways.owns_volume_known("gw-a", vol)  # the read above found gw-a
    assert not gateways.owns_volume_known("gw-b", vol)
    assert not gateways.owns_volume_known("gw-a", "no-such-volume")
    assert not gateways.owns_volume("gw-a", "no-such-volume")
    assert not gateways.owns_volume_known("gw-a", "no-such-volume")
    clock.now += OWNER_TRUST_S
    assert not gateways.owns_volume_known("gw-a", vol)  # stale: asked again
    assert gateways.owns_volume("gw-a", vol)
    assert gateways.owns_volume_known("gw-a", vol)


def test_a_chosen_volume_id_returns_the_volume_only_to_the_request_that_made_it(
    secure_provider: SecureProvider,
) -> None:
    """A caller may choose a new volume's id and ask again after a lost reply. Only the
    same request (account, gateway, name, size, mode) gets the volume back: a second
    gateway of the account, another account's gateway or admin, or a different volume
    get 409 and the same words, which say nothing of whose the id is."""
    p = secure_provider
    one, two = activate(p, p.token, "gw-1"), activate(p, p.token, "gw-2")
    _other, other_token = new_account(p, "other")
    stranger = activate(p, other_token, "gw-x")
    vid = str(uuid.uuid4())
    body = {"id": vid, "name": "v", "size": MIB, "mode": "cached"}
    made = p.client(auth=one.auth()).post("/v1/volumes", json=body)
    assert made.status_code == 201, made.text
    assert made.json()["gateway_id"] == one.gateway_id
    again = p.client(auth=one.auth()).post("/v1/volumes", json=body)
    assert again.status_code == 201 and again.json() == made.json()

    refused = {
        "another gateway of the account": p.client(auth=two.auth()).post("/v1/volumes", json=body),
        "another account's gateway": p.client(auth=stranger.auth()).post("/v1/volumes", json=body),
        "another account's admin": p.client(other_token).post("/v1/volumes", json=body),
        "the account's admin, no gateway": p.admin().post("/v1/volumes", json=body),
        "the same gateway, another size": p.client(auth=one.auth()).post(
            "/v1/volumes", json={**body, "size": 2 * MIB}
        ),
        "the same gateway, another mode": p.client(auth=one.auth()).post(
            "/v1/volumes", json={**body, "mode": "stored"}
        ),
    }
    expected = {
        "error": "name_taken",
        "message": f"volume id {vid} is not available: choose another (a new UUID)",
    }
    for who, r in refused.items():
        assert r.status_code == 409, (who, r.text)
        assert r.json() == expected, who  # the same words whoever holds the id
        for secret in (one.gateway_id, p.account_id, '"v"', "'v'"):
            assert secret not in r.text, (who, secret)
    # With ids of their own: the account's second gateway is refused for the name (names
    # are per account), the other account's gateway gets its volume.
    own = p.client(auth=two.auth()).post("/v1/volumes", json={**body, "id": str(uuid.uuid4())})
    assert own.status_code == 409 and "already has a volume named 'v'" in own.text
    mine = p.client(auth=stranger.auth()).post(
        "/v1/volumes", json={**body, "id": str(uuid.uuid4())}
    )
    assert mine.status_code == 201 and mine.json()["gateway_id"] == stranger.gateway_id
    # Nothing of the first volume changed.
    kept = p.client(auth=one.auth()).get(f"/v1/volumes/{vid}")
    assert kept.status_code == 200 and kept.json() == made.json()
