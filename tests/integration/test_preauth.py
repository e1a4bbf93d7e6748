"""What a request must show before the provider reads its body (sgw.provider.api.gate),
against real provider processes over real sockets.

The refusals before the body are shown by what was sent when the answer came: each such
request announces a large body (64 MiB, or chunked) and sends only its first piece, then
waits for the answer. A provider that read, let alone parsed, the body would still be
waiting for the rest, and the socket's timeout would fail the test; an answer means it
decided on the head (and on at most the piece that was sent)."""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from dataclasses import dataclass

import httpx

from sgw.common import message_signatures, signing
from sgw.provider.control import peers
from tests.fixtures.daemons import ProviderProcess
from tests.fixtures.management import FakeGateway, SecureProvider, activate

KIB = 1 << 10
MIB = 1 << 20
# What such a request announces, and the piece of it that is sent.
ANNOUNCED = 64 * MIB
PIECE = 64 * KIB
# How long a test waits for an answer that must come without the body: only a failing
# provider (one waiting for the rest of the body) makes it pass.
ANSWER_TIMEOUT_S = 30.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.body)
        return doc

    @property
    def message(self) -> str:
        return str(self.json()["message"])


def _connect(url: str, tls: ssl.SSLContext | None) -> socket.socket:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT_S)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    return sock


def _read_answer(sock: socket.socket, what: str) -> Answer:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                raise AssertionError(f"{what}: the connection closed without an answer")
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            part = sock.recv(65536)
            if not part:
                break
            rest += part
    except TimeoutError:
        raise AssertionError(
            f"{what}: no answer while only the head and the body's first {PIECE} bytes were "
            "sent: the provider waited for the body"
        ) from None
    return Answer(int(lines[0].split(" ", 2)[1]), headers, rest[:length])


def send_partially(
    url: str,
    tls: ssl.SSLContext | None,
    method: str,
    target: str,
    headers: dict[str, str],
    *,
    chunked: bool = False,
    announced: int = ANNOUNCED,
    sent: int = PIECE,
) -> Answer:
    """Sends the head of a request announcing ``announced`` bytes of body (or a chunked
    body), then ``sent`` bytes of it, and reads the answer without sending the rest."""
    head = [f"{method} {target} HTTP/1.1", f"host: {url.split('://', 1)[1]}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append("transfer-encoding: chunked" if chunked else f"content-length: {announced}")
    piece = b"[" * PIECE  # the start of a JSON document, as a parser would want more of
    body = b""
    while len(body) < sent:
        part = piece[: sent - len(body)]
        body += b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    with _connect(url, tls) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return _read_answer(sock, f"{method} {target}")


def signed_header(gw: FakeGateway, key_id: str, method: str, target: str, digest: str) -> str:
    return signing.sign(
        gw.key, key_id, method, target.encode(), b"", timestamp=int(time.time()), digest=digest
    )


# Calls that read a JSON document or a binary body, both on the framework's side and on
# the control channel's lean path.
BODY_CALLS = [
    ("POST", "/v1/volumes"),
    ("POST", "/v1/accounts"),
    ("POST", "/v1/activations"),
    ("POST", "/v1/gateway/messages/replies"),
    ("POST", "/v1/gateway/health"),
    ("POST", "/v1/gateways/gw-1/commands?wait=1"),
    ("PUT", "/v1/volumes/v-1/chunks/" + "0" * 64),
    ("POST", "/v1/volumes/v-1/chunk-packs"),
    ("POST", "/v1/volumes/v-1/commits"),
    ("PUT", "/v1/no/such/route"),
]


def test_requests_without_credentials_are_refused_before_their_body(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    for method, target in BODY_CALLS:
        for chunked in (False, True):
            a = send_partially(p.url, p.tls, method, target, {}, chunked=chunked)
            assert a.status == 401, (method, target, a.body)
            assert a.json()["error"] == "unauthenticated"
            assert "no credentials" in a.message and "Bearer" in a.message
            assert a.headers["www-authenticate"]
    # Nor do the held polls' calls wait for anything without credentials.
    r = httpx.get(f"{p.url}/v1/gateway/messages?wait=30", verify=p.tls, timeout=10)
    assert r.status_code == 401 and "no credentials" in r.json()["message"]


def test_malformed_credentials_are_refused_before_the_body(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    good = signed_header(gw, "gw:" + gw.gateway_id, "POST", "/v1/volumes", "0" * 64)
    parsed = signing.parse_header(good)
    assert parsed is not None
    ts, nonce = int(time.time()), "ab" * 16
    sig = good.rsplit("sig=", 1)[1]
    cases = {
        "SGW1-Ed25519 nonsense": "malformed SGW1-Ed25519 Authorization header",
        f"SGW1-Ed25519 key=gw:x, ts={ts}, nonce=abc, sig={sig}": "malformed",
        f"SGW1-Ed25519 key=gw:x, ts={ts}, nonce={nonce}, sig={sig[:40]}": "malformed",
        f"SGW1-Ed25519 key=xx:abc, ts={ts}, nonce={nonce}, sig={sig}": "expected gw:GATEWAY-ID",
        f"SGW1-Ed25519 key=pk:abcd, ts={ts}, nonce={nonce}, sig={sig}": "64 hex digits",
        good.replace(f"ts={parsed.timestamp}", "ts=1"): "stale request",
        f"SGW1-Ed25519 key=gw:{uuid.uuid4()}, ts={ts}, nonce={nonce}, sig={sig}": (
            "unknown gateway"
        ),
        "Bearer not-a-token": "malformed API token",
        "Bearer sgw_has spaces": "malformed API token",
        "Basic dXNlcjpwYXNz": "unknown Authorization scheme 'Basic'",
    }
    for header, reason in cases.items():
        for chunked in (False, True):
            a = send_partially(
                p.url, p.tls, "POST", "/v1/volumes", {"authorization": header}, chunked=chunked
            )
            assert a.status == 401 and reason in a.message, (header, a.body)
    # A deactivated gateway's own key, properly signed: refused before the body too.
    assert p.admin().post(f"/v1/gateways/{gw.gateway_id}/deactivate").status_code == 200
    a = send_partially(p.url, p.tls, "POST", "/v1/volumes", {"authorization": good})
    assert a.status == 401 and "credentials are revoked" in a.message, a.body
    # Logged as refusals (credentials that were sent), with the reason.
    assert p.stderr_path is not None
    log = p.stderr_path.read_text()
    for word in ("malformed SGW1-Ed25519", "stale request", "malformed API token", "revoked"):
        assert word in log, word


def test_malformed_message_signatures_are_refused_before_the_body(
    secure_provider: SecureProvider,
) -> None:
    """RFC 9421 headers (docs/adr/0010): their form, created, the key id and its key are
    judged from the head; so is a pk: key outside the credentials call."""
    p = secure_provider
    gw = activate(p, p.token, "gw")
    now = int(time.time())

    def headers(key_id: str, created: int = now, gateway: FakeGateway = gw) -> dict[str, str]:
        return message_signatures.sign_headers(
            gateway.key,
            key_id,
            "POST",
            p.url.split("://", 1)[1],
            b"/v1/volumes",
            body_sha256=bytes(32),
            created=created,
        )

    good = headers("gw:" + gw.gateway_id)
    stranger = FakeGateway()
    cases: list[tuple[dict[str, str], str]] = [
        ({**good, "Signature-Input": "sgw=("}, "malformed Signature-Input"),
        ({"Signature-Input": good["Signature-Input"]}, "without Signature"),
        (
            {**good, "Signature-Input": good["Signature-Input"].replace('"@path" ', "")},
            "does not cover @path",
        ),
        (headers("gw:" + gw.gateway_id, now - signing.CLOCK_SKEW_S - 60), "stale request"),
        (headers(f"gw:{uuid.uuid4()}"), "unknown gateway"),
        (headers("xx:abc"), "expected gw:GATEWAY-ID"),
        (
            headers(
                signing.PUBLIC_KEY_PREFIX + signing.public_key_hex(stranger.key), now, stranger
            ),
            "may only fetch its credentials",
        ),
    ]
    for sent, reason in cases:
        for chunked in (False, True):
            a = send_partially(p.url, p.tls, "POST", "/v1/volumes", sent, chunked=chunked)
            assert a.status == 401 and reason in a.message, (reason, a.body)
    assert p.admin().post(f"/v1/gateways/{gw.gateway_id}/deactivate").status_code == 200
    a = send_partially(p.url, p.tls, "POST", "/v1/volumes", good)
    assert a.status == 401 and "credentials are revoked" in a.message, a.body


def test_a_candidate_key_may_only_fetch_its_credentials(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = FakeGateway()
    key_id = signing.PUBLIC_KEY_PREFIX + signing.public_key_hex(gw.key)
    # Properly signed (over the digest of the body announced), but not the credentials call.
    for method, target in BODY_CALLS:
        header = signed_header(gw, key_id, method, target, "0" * 64)
        a = send_partially(p.url, p.tls, method, target, {"authorization": header})
        assert a.status == 401, (method, target, a.body)
        assert "not activated" in a.message and "GET /v1/gateway/credentials" in a.message
    cand = p.client(auth=gw.candidate_auth())
    for method, path in (("GET", "/v1/volumes"), ("GET", "/v1/gateway/messages?wait=0")):
        r = cand.request(method, path)
        assert r.status_code == 401 and "not activated" in r.json()["message"], path
    # Its credentials call, with more than a small body: 413 before the body is read.
    target = "/v1/gateway/credentials"
    header = signed_header(gw, key_id, "GET", target, "0" * 64)
    a = send_partially(
        p.url, p.tls, "GET", target, {"authorization": header}, announced=2 * KIB, sent=KIB
    )
    assert a.status == 413 and "1024 bytes" in a.message, a.body
    # Without one: answered (not activated yet), then with its credentials once activated.
    assert cand.get(target).status_code == 404
    r = p.admin().post(
        "/v1/activations",
        json={"activation_key": gw.activation_key(), "name": "g", "confirmation_code": gw.code},
    )
    assert r.status_code == 201
    assert cand.get(target).json()["key_id"] == "gw:" + r.json()["id"]


def test_json_bodies_over_their_cap_are_refused_with_413(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    admin = {"authorization": f"Bearer {p.token}", "content-type": "application/json"}
    # Announced over 1 MiB: refused before it is read.
    a = send_partially(p.url, p.tls, "POST", "/v1/volumes", admin, announced=MIB + 1)
    assert a.status == 413 and a.json()["error"] == "payload_too_large"
    assert "1048576 bytes (1 MiB)" in a.message, a.body
    # Chunked: refused once the route read past 1 MiB, the rest never sent.
    a = send_partially(
        p.url, p.tls, "POST", "/v1/volumes", admin, chunked=True, sent=MIB + 4 * PIECE
    )
    assert a.status == 413 and "1048576 bytes (1 MiB)" in a.message, a.body
    a = send_partially(p.url, p.tls, "POST", "/v1/gateways/gw-1/commands", admin, announced=MIB + 1)
    assert a.status == 413 and "1 MiB" in a.message, a.body
    # Within the cap, a document is parsed as before (here: refused for its content).
    c = p.admin()
    r = c.post("/v1/volumes", json={"name": "n" * (MIB - 100), "size": MIB, "mode": "cached"})
    assert r.status_code in (400, 422) and r.json()["error"] != "payload_too_large", r.text
    # Commits may carry more than 1 MiB of changes (up to 64 MiB).
    vol = c.post("/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"}).json()["id"]
    changes = {str(i): None for i in range(100_000)}  # about 1.5 MiB of JSON
    r = c.post(
        f"/v1/volumes/{vol}/commits",
        json={"base_version": 0, "idempotency_key": "k", "changes": changes},
    )
    assert r.status_code == 400 and "out of range" in r.json()["message"], r.text[:300]
    a = send_partially(
        p.url, p.tls, "POST", f"/v1/volumes/{vol}/commits", admin, announced=64 * MIB + 1
    )
    assert a.status == 413 and "67108864 bytes (64 MiB)" in a.message, a.body


def test_the_control_channels_replies_take_a_diagnostics_bundle_and_no_more(
    secure_provider: SecureProvider,
) -> None:
    """Replies are capped at 12 MiB: a reply with a 3 MiB result (a large diagnostics
    bundle) is taken on the lean path; over 12 MiB is refused before it is read."""
    p = secure_provider
    gw = activate(p, p.token, "gw")
    c = p.client(auth=gw.auth())
    target = "/v1/gateway/messages/replies"
    result = {"bundle": "A" * (3 * MIB)}
    r = c.post(
        target, json={"replies": [{"id": "no-such", "status": "succeeded", "result": result}]}
    )
    assert r.status_code == 200 and r.json()["refused"] == ["no-such"], r.text
    header = signed_header(gw, "gw:" + gw.gateway_id, "POST", target, "0" * 64)
    a = send_partially(
        p.url, p.tls, "POST", target, {"authorization": header}, announced=12 * MIB + 1
    )
    assert a.status == 413 and "12582912 bytes (12 MiB)" in a.message, a.body


def test_open_routes_answer_without_credentials(secure_provider: SecureProvider) -> None:
    p = secure_provider
    c = p.client()
    health = c.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert c.head("/v1/health").status_code == 405  # past the gate: the framework's answer
    assert c.get("/openapi.json").json()["info"]["title"] == "sgw provider"
    for page in ("/docs", "/redoc"):
        r = c.get(page)
        assert r.status_code == 200 and "/openapi.json" in r.text, page
    # The activation landing: open, and answered as before (the console will serve it).
    landing = c.get("/", params={"activationKey": "k", "activationRegion": "r"})
    assert landing.status_code == 404 and landing.json()["error"] == "not_found"
    # Open for reading only: other methods need credentials, and a body is refused.
    assert c.post("/v1/health").status_code == 401
    a = send_partially(p.url, p.tls, "GET", "/v1/health", {})
    assert a.status == 413 and "take no request body" in a.message, a.body


def test_the_doorbell_is_open_to_its_own_signature_only(secure_provider: SecureProvider) -> None:
    p = secure_provider
    secret = peers.load_or_create_secret(str(p.data_dir))
    c = p.client()
    body = json.dumps({"gateways": ["gw-x"], "messages": []}).encode()
    header = peers.sign(secret, "peer-1", "POST", peers.DOORBELL_PATH, body)
    r = c.post(peers.DOORBELL_PATH, content=body, headers={peers.HEADER: header})
    assert r.status_code == 200 and r.json()["held"] == [], r.text
    # Without its header, with a malformed or an old one: refused before the body.
    old = f"peer-1 {int(time.time()) - 3600} {'0' * 64}"
    for headers in ({}, {peers.HEADER: "garbage"}, {peers.HEADER: old}):
        a = send_partially(p.url, p.tls, "POST", peers.DOORBELL_PATH, headers)
        assert a.status == 401 and "doorbell refused" in a.message, (headers, a.body)
    # A well-formed header with a wrong MAC: refused by the route, after its small body.
    forged = f"peer-1 {int(time.time())} {'0' * 64}"
    r = c.post(peers.DOORBELL_PATH, content=body, headers={peers.HEADER: forged})
    assert r.status_code == 401 and "doorbell refused" in r.json()["message"]


def test_insecure_dev_serves_without_credentials_within_the_caps(
    provider: ProviderProcess,
) -> None:
    p = provider
    r = httpx.post(f"{p.url}/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"})
    assert r.status_code == 201
    a = send_partially(p.url, None, "POST", "/v1/volumes", {}, announced=2 * MIB)
    assert a.status == 413 and "1 MiB" in a.message, a.body
