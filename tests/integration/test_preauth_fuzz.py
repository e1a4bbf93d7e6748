"""Bounded fuzzing of what anyone on the network reaches without credentials: the
provider's whole HTTP surface (every route of its OpenAPI document, and paths it does not
know) called with no credentials or with forged and malformed ones, and the appliance's
activation page fed arbitrary and mutated requests.

Nothing sent without valid credentials may be served (2xx) except the open routes, nor
make a server error (5xx) or a traceback, and both servers go on answering legitimate
callers after every example. Bounded by hypothesis' example counts (well under a minute
each on loopback)."""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.daemons import GatewayProcess, free_port
from tests.fixtures.management import SecureProvider, activate
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 300
# Served without credentials (sgw.provider.api.gate.OPEN_PATHS), GET and HEAD only.
OPEN = {"/", "/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
REFUSALS = {400, 401, 404, 405, 411, 413, 414, 415, 422, 431}
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


@pytest.fixture(scope="module")
def provider(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SecureProvider, list[str]]]:
    """A provider with something to find (a gateway and a volume), and its routes."""
    p = SecureProvider(Path(tmp_path_factory.mktemp("preauth")) / "provider").start()
    try:
        gw = activate(p, p.token, "fuzz-gw")
        vol = p.admin().post(
            "/v1/volumes",
            json={"name": "v", "size": 1 << 20, "mode": "cached", "gateway_id": gw.gateway_id},
        )
        assert vol.status_code == 201
        spec = httpx.get(f"{p.url}/openapi.json", verify=p.tls).json()
        routes = [
            path.replace("{volume_id}", vol.json()["id"]).replace("{gateway_id}", gw.gateway_id)
            for path in spec["paths"]
        ]
        assert len(routes) > 20
        yield p, routes
    finally:
        for c in p.clients:
            c.close()
        p.kill()


def _fill(path: str, filler: str) -> str:
    """A route template with every remaining ``{param}`` replaced."""
    return re.sub(r"\{[^}]+\}", lambda _: filler or "x", path)


_TOKEN_CHARS = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=80
)
# What a caller without credentials may put in Authorization: nothing, other schemes,
# malformed API tokens and signed headers, stale or future timestamps, unknown key ids.
_AUTHORIZATION = st.one_of(
    st.none(),
    st.just(""),
    _TOKEN_CHARS,
    st.builds(lambda t: f"Bearer {t}", _TOKEN_CHARS),
    st.builds(lambda t: f"Bearer sgw_{t}", st.from_regex(r"[A-Za-z0-9_-]{1,60}", fullmatch=True)),
    st.builds(lambda t: f"Basic {base64.b64encode(t.encode()).decode()}", _TOKEN_CHARS),
    st.builds(
        lambda key, ts, nonce, sig: f"SGW-Ed25519 keyid={key},ts={ts},nonce={nonce},sig={sig}",
        st.one_of(
            st.from_regex(r"gw:[0-9a-f-]{1,40}", fullmatch=True),
            st.from_regex(r"pk:[0-9a-f]{0,70}", fullmatch=True),
            _TOKEN_CHARS,
        ),
        st.one_of(st.integers(-(2**40), 2**40).map(str), st.just(str(int(time.time())))),
        _TOKEN_CHARS,
        _TOKEN_CHARS,
    ),
)

_NONCE = st.one_of(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), _TOKEN_CHARS)
# RFC 9421 signature headers (Signature-Input, Signature) a caller without a key may send:
# garbage, the canonical form with forged parameters and signature, other forms.
_SIGNATURE = st.one_of(
    st.none(),
    st.tuples(_TOKEN_CHARS, _TOKEN_CHARS),
    st.builds(
        lambda comps, created, key, nonce, sig: (
            f'sgw=({comps});created={created};keyid="{key}";alg="ed25519";nonce="{nonce}"',
            f"sgw=:{base64.b64encode(sig).decode()}:",
        ),
        st.sampled_from(
            [
                '"@method" "@authority" "@path" "@query"',
                '"@method" "@authority" "@path" "@query" "content-digest"',
                '"@path" "@method" "@query" "@authority" "content-type"',
                '"@method"',
                "",
            ]
        ),
        st.one_of(st.integers(-(2**40), 2**40), st.just(int(time.time()))),
        st.one_of(
            st.from_regex(r"gw:[0-9a-f-]{1,40}", fullmatch=True),
            st.from_regex(r"pk:[0-9a-f]{0,70}", fullmatch=True),
        ),
        _NONCE,
        st.binary(min_size=0, max_size=70),
    ),
)


def test_the_provider_serves_nothing_without_credentials(
    provider: tuple[SecureProvider, list[str]],
) -> None:
    p, routes = provider
    seen: dict[int, int] = {}
    bad: list[str] = []
    client = httpx.Client(base_url=p.url, verify=p.tls, timeout=30)

    @given(
        method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        path=st.one_of(
            st.sampled_from(routes),
            st.sampled_from(routes).map(lambda r: r + "/.."),
            st.builds(
                _fill, st.sampled_from(routes), st.from_regex(r"[a-z0-9%./-]{0,20}", fullmatch=True)
            ),
            st.from_regex(r"/[ -~]{0,40}", fullmatch=True).map(lambda s: s.replace("#", "")),
        ),
        authorization=_AUTHORIZATION,
        signature=_SIGNATURE,
        peer=st.one_of(st.none(), _TOKEN_CHARS),
        body=st.one_of(st.just(b""), st.binary(max_size=2048), st.just(b'{"name": "x"}')),
    )
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(
        *,
        method: str,
        path: str,
        authorization: str | None,
        signature: tuple[str, str] | None,
        peer: str | None,
        body: bytes,
    ) -> None:
        headers = {"content-type": "application/json"}
        if authorization is not None:
            headers["authorization"] = authorization
        if signature is not None:
            headers["signature-input"], headers["signature"] = signature
        if peer is not None:
            headers["x-sgw-peer"] = peer
        try:
            res = client.request(method, path, headers=headers, content=body or None)
        except (
            httpx.InvalidURL,
            httpx.UnsupportedProtocol,
            httpx.LocalProtocolError,
            UnicodeError,
        ):
            return  # the client would not send it
        seen[res.status_code] = seen.get(res.status_code, 0) + 1
        plain = path.split("?", 1)[0]
        served = 200 <= res.status_code < 300
        if res.status_code >= 500 or (served and not (plain in OPEN and method in ("GET", "HEAD"))):
            bad.append(
                f"{method} {path!r} auth={authorization!r} sig={signature!r}: "
                f"{res.status_code} {res.text[:200]}"
            )
        elif not served and res.status_code not in REFUSALS:
            bad.append(f"{method} {path!r}: unexpected {res.status_code} {res.text[:200]}")

    try:
        call()
    finally:
        client.close()
    assert not bad, bad[:5]
    # The refusals came from the gate (401) for most calls: evidence the examples reached it.
    assert seen.get(401, 0) > EXAMPLES // 3, seen
    assert httpx.get(f"{p.url}/v1/health", verify=p.tls).status_code == 200
    assert p.admin().get("/v1/gateways").status_code == 200
    assert p.stderr_path is not None
    assert "Traceback" not in p.stderr_path.read_text(errors="replace")


def _raw(p: SecureProvider, data: bytes) -> bytes:
    """``data`` sent as is over TLS; what the provider answers before closing or within
    2 s (a head that promises a body the server waits for gets no answer: fine)."""
    ctx = p.tls
    with (
        socket.create_connection(("127.0.0.1", p.port), timeout=2) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError, ssl.SSLError, ConnectionError):
            while chunk := s.recv(65536):
                out += chunk
        return out


_HEAD_LINE = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda m, t, v: m + b" " + t + b" " + v,
        st.sampled_from([b"GET", b"POST", b"PUT", b"BREW", b"", b"G\x00T"]),
        st.binary(max_size=120),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/9.9", b""]),
    ),
)


def test_malformed_requests_are_refused_without_server_errors(
    provider: tuple[SecureProvider, list[str]],
) -> None:
    """Request heads no HTTP client would send: the server answers 4xx or closes."""
    p, _ = provider
    bad: list[str] = []

    @given(
        line=_HEAD_LINE,
        headers=st.lists(st.binary(max_size=120), max_size=6),
        length=st.one_of(
            st.none(), st.integers(-5, 1 << 40).map(str).map(str.encode), st.binary(max_size=8)
        ),
        body=st.binary(max_size=512),
    )
    @settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def send(line: bytes, headers: list[bytes], length: bytes | None, body: bytes) -> None:
        head = [line, b"Host: 127.0.0.1", *headers]
        if length is not None:
            head.append(b"Content-Length: " + length)
        answer = _raw(p, b"\r\n".join(head) + b"\r\n\r\n" + body)
        m = _STATUS.match(answer)
        if m is None:
            if answer:
                bad.append(f"{line[:60]!r}: not HTTP: {answer[:80]!r}")
            return
        status = int(m.group(1))
        if status >= 500 or (200 <= status < 300 and not answer.startswith(b"HTTP/1.1 200")):
            bad.append(f"{line[:60]!r}: {answer[:200]!r}")
        if 200 <= status < 300:
            target = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
            if target.split(b"?")[0].decode(errors="replace") not in OPEN:
                bad.append(f"{line[:60]!r} served: {answer[:200]!r}")

    send()
    assert not bad, bad[:5]
    assert httpx.get(f"{p.url}/v1/health", verify=p.tls).status_code == 200
    assert p.stderr_path is not None
    assert "Traceback" not in p.stderr_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    """A gateway that is not activated, serving its activation page on loopback (its
    provider's address answers nothing: the page does not need it)."""
    tmp = Path(tmp_path_factory.mktemp("page"))
    port = free_port()
    conf = tmp / "gateway.toml"
    conf.write_text(
        f'[remote]\nurl = "https://127.0.0.1:{free_port()}"\n\n'
        f'[activation]\nlisten = "127.0.0.1:{port}"\npoll_interval = 5\n'
    )
    gw = GatewayProcess(tmp / "gw", ["vol0:1M"], extra_args=["--config", str(conf)])
    gw.start()
    try:
        wait_for(lambda: _page_answers(port) == 302, 20, what="the activation page")
        yield gw, port
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(10)


def _page_answers(port: int) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/?activationRegion=r", timeout=5).status_code
    return None


def _plain(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_the_activation_page_survives_arbitrary_requests(page: tuple[GatewayProcess, int]) -> None:
    """Only ``GET /`` (with or without a query) hands out a key (302); anything else gets
    a 4xx or a closed connection, and the page keeps working for the admin."""
    gw, port = page
    bad: list[str] = []
    keys: list[bytes] = []
    refused: list[int] = []
    dropped: list[bytes] = []

    @given(
        data=st.one_of(
            st.binary(max_size=600),
            st.builds(
                lambda line, headers, body: (
                    line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
                ),
                _HEAD_LINE,
                st.lists(st.binary(max_size=100), max_size=5),
                st.binary(max_size=200),
            ),
            st.builds(
                lambda m, t: m + b" " + t + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
                st.from_regex(rb"/[!-~]{0,60}", fullmatch=True),
            ),
            st.builds(
                lambda q: b"GET /?" + q + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                st.binary(max_size=300).map(
                    lambda b: b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")
                ),
            ),
        )
    )
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def send(data: bytes) -> None:
        answer = _plain(port, data)
        m = _STATUS.match(answer)
        if m is None:
            if answer:
                bad.append(f"{data[:60]!r}: not HTTP: {answer[:80]!r}")
            dropped.append(data)
            return
        status = int(m.group(1))
        if status == 302:
            keys.append(data)
            if not data.startswith((b"GET /", b"HEAD /")):
                bad.append(f"{data[:60]!r}: handed out a key")
        elif status not in REFUSALS | {408}:
            bad.append(f"{data[:60]!r}: {answer[:200]!r}")
        else:
            refused.append(status)

    send()
    assert not bad, bad[:5]
    # Every kind of answer was reached: keys for well-formed GETs of /, refusals for other
    # well-formed requests, a closed connection for what is not HTTP.
    assert keys and refused and dropped, (len(keys), sorted(set(refused)), len(dropped))
    assert _page_answers(port) == 302
    assert gw.proc is not None and gw.proc.poll() is None
    assert "Traceback" not in gw.log_text()
