"""Activation end to end with real processes: `sgw provider init` and `serve` (HTTPS), a
gateway daemon serving its activation page, `sgw activate`, credentials on the next poll,
signed uploads; and activation keys that must be refused."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sgw.common import activation_key
from sgw.common.errors import ActivationKeyError
from tests.fixtures.daemons import SGW, GatewayProcess, free_port, need
from tests.fixtures.management import FakeGateway, SecureProvider, activate, code_of
from tests.fixtures.waiting import wait_for

MIB = 1 << 20


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def gateway_config(tmp_path: Path, p: SecureProvider, activation_port: int) -> Path:
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f"""
[remote]
url = "{p.url}"
ca = "{p.ca}"

[activation]
listen = "127.0.0.1:{activation_port}"
poll_interval = 0.2

[destage]
idle_seconds = 0.2
"""
    )
    return conf


def test_activation_end_to_end(
    tmp_path: Path,
    secure_provider: SecureProvider,
    gateway_factory: type[GatewayProcess],
) -> None:
    qemu_io = need("qemu-io")
    p = secure_provider
    port = free_port()
    conf = gateway_config(tmp_path, p, port)
    gw = gateway_factory(tmp_path / "gw", ["vol0:16M"], extra_args=["--config", str(conf)])
    gw.start()
    key_file = gw.data_dir / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    wait_for(lambda: port_open(port), timeout=20, what="the activation page")

    # The page hands out a one-time key in a redirect.
    page = httpx.get(f"http://127.0.0.1:{port}/?activationRegion=eu-test")
    assert page.status_code == 302
    location = urllib.parse.urlsplit(page.headers["location"])
    query = urllib.parse.parse_qs(location.query)
    key = query["activationKey"][0]
    assert query["activationRegion"] == ["eu-test"]
    checked = activation_key.check(key, time.time())
    assert checked.region == "eu-test"
    assert 29 * 60 < checked.expires - time.time() <= 30 * 60
    assert httpx.get(f"http://127.0.0.1:{port}/other").status_code == 404
    assert httpx.post(f"http://127.0.0.1:{port}/").status_code == 405
    # The CLI on the appliance prints a key of the same identity.
    cli_key = subprocess.run(
        [SGW, "gateway", "activation-key", "--data-dir", str(gw.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert activation_key.check(cli_key, time.time()).public_key == checked.public_key

    # Before activation, the gateway's uploads are refused (it cannot sign yet).
    done = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 1M", gw.uri()],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    code = code_of(gw)  # what the appliance's console shows
    act = p.sgw(
        "activate",
        key,
        "--name",
        "edge-1",
        "--timezone",
        "UTC",
        "--code",
        code,
        "--output",
        "json",
    )
    assert act.returncode == 0, act.stderr
    gateway_id = json.loads(act.stdout)["id"]

    creds_file = gw.data_dir / "credentials.json"
    wait_for(creds_file.exists, timeout=20, what="the credentials")
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    creds = json.loads(creds_file.read_text())
    assert creds["gateway_id"] == gateway_id and creds["key_id"] == f"gw:{gateway_id}"
    wait_for(lambda: not port_open(port), timeout=20, what="the activation page to close")

    # From now on its uploads are signed and land in the account, bound to the gateway.
    def uploaded() -> bool:
        vols = p.admin().get("/v1/volumes").json()
        return bool(vols) and vols[0]["map_version"] >= 1

    wait_for(uploaded, timeout=60, what="the upload")
    vols = p.admin().get("/v1/volumes").json()
    assert [(v["name"], v["gateway_id"]) for v in vols] == [("vol0", gateway_id)]
    assert p.admin().get(f"/v1/gateways/{gateway_id}").json()["last_seen"] is not None
    refused = p.sgw("activate", key, "--name", "again", "--code", code)
    assert refused.returncode == 1 and "used already" in refused.stderr
    no_more = subprocess.run(
        [SGW, "gateway", "activation-key", "--data-dir", str(gw.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert no_more.returncode == 2 and "activated already" in no_more.stderr

    # After a restart the page stays closed for good and requests are still signed.
    assert gw.stop() == 0
    gw.start()
    # The restarted daemon found its credentials (where it would otherwise open the page)
    # and did not open the page after that.
    messages = gw.log_messages()
    decided = len(messages) - 1 - messages[::-1].index("gateway activated")
    assert "activation page open" not in messages[decided:], messages[decided:]
    assert not port_open(port)
    done = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x33 1M 1M", gw.uri()],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    def uploaded_again() -> bool:
        return int(p.admin().get("/v1/volumes").json()[0]["map_version"]) >= 2

    wait_for(uploaded_again, timeout=60, what="the second upload")
    assert "request refused" not in p.log_text()
    assert gw.stop() == 0


def test_expired_forged_and_reused_keys_are_refused(secure_provider: SecureProvider) -> None:
    p = secure_provider
    admin = p.admin()
    gw = FakeGateway()

    def try_key(key: str, name: str = "g") -> httpx.Response:
        return admin.post(
            "/v1/activations",
            json={"activation_key": key, "name": name, "confirmation_code": gw.code},
        )

    expired = gw.activation_key(now=time.time() - 31 * 60)
    r = try_key(expired)
    assert r.status_code == 400 and "expired" in r.json()["message"]
    with pytest.raises(ActivationKeyError):
        activation_key.check(expired, time.time())

    # Forged: another key's signature over this gateway's public key, a flipped byte,
    # a key claiming a far-future expiry, garbage.
    genuine = gw.activation_key()
    prefix, payload, sig = genuine.split(".")
    other_sig = FakeGateway().activation_key().split(".")[2]
    raw = bytearray(activation_key._unb64(payload))
    raw[-1] ^= 1
    flipped = activation_key._b64(bytes(raw))
    for forged in (
        f"{prefix}.{payload}.{other_sig}",
        f"{prefix}.{flipped}.{sig}",
        "sgw1.AAAA.BBBB",
        "not-a-key",
    ):
        r = try_key(forged)
        assert r.status_code in (400, 422), (forged, r.text)
        assert r.json()["error"] in ("activation_key_invalid", "invalid_request")
    far = gw.activation_key(now=time.time() + 3600)
    assert try_key(far).status_code == 400

    # Used once: the same key again is refused; a fresh key of an activated gateway too.
    assert try_key(genuine, "first").status_code == 201
    again = try_key(genuine, "second")
    assert again.status_code == 400 and "used already" in again.json()["message"]
    fresh = try_key(gw.activation_key(), "third")
    assert fresh.status_code == 409 and fresh.json()["error"] == "already_activated"
    # Nothing above made a gateway besides the first.
    assert [g["name"] for g in admin.get("/v1/gateways").json()] == ["first"]


def test_a_key_activates_into_one_account_only(secure_provider: SecureProvider) -> None:
    from tests.fixtures.management import new_account

    p = secure_provider
    _other, other_token = new_account(p, "other")
    gw = activate(p, p.token, "mine")
    r = p.client(other_token).get(f"/v1/gateways/{gw.gateway_id}")
    assert r.status_code == 404
    stolen = p.client(other_token).post(
        "/v1/activations",
        json={
            "activation_key": gw.activation_key(),
            "name": "theirs",
            "confirmation_code": gw.code,
        },
    )
    assert stolen.status_code == 409


def test_identity_key_with_loose_mode_is_refused(
    tmp_path: Path, gateway_factory: type[GatewayProcess]
) -> None:
    gw = gateway_factory(tmp_path / "gw", ["vol0:16M"])
    gw.start()
    assert gw.stop() == 0
    key_file = gw.data_dir / "identity.key"
    key_file.chmod(0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        gw.start(timeout=20)


def _legacy_key(gw: FakeGateway, now: float) -> str:
    """A key as gateways minted before confirmation codes (``sgw1.``: no commitment)."""
    public = gw.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    payload = struct.pack(">32sQ16s", public, int(now) + activation_key.VALIDITY_S, os.urandom(16))
    signature = gw.key.sign(b"sgw activation key v1\x00" + payload)
    return f"sgw1.{activation_key._b64(payload)}.{activation_key._b64(signature)}"


def test_an_intruder_with_a_key_but_not_the_code_cannot_activate(
    tmp_path: Path, secure_provider: SecureProvider, gateway_factory: type[GatewayProcess]
) -> None:
    """Anyone on the appliance's network can take a key from its activation page; only
    who saw its console has the confirmation code. Without it, or with a wrong one, the
    key activates nothing (and stays good for the admin who has the code)."""
    from tests.fixtures.management import new_account

    p = secure_provider
    port = free_port()
    gw = gateway_factory(
        tmp_path / "gw",
        ["vol0:16M"],
        extra_args=["--config", str(gateway_config(tmp_path, p, port))],
    )
    gw.start()
    wait_for(lambda: port_open(port), timeout=20, what="the activation page")
    page = httpx.get(f"http://127.0.0.1:{port}/")
    key = urllib.parse.parse_qs(urllib.parse.urlsplit(page.headers["location"]).query)[
        "activationKey"
    ][0]
    # The page never shows the code.
    code = code_of(gw)
    assert code.replace("-", "") not in page.text + page.headers["location"]
    assert stat.S_IMODE((gw.data_dir / "activation-code").stat().st_mode) == 0o600

    _, intruder_token = new_account(p, "intruder")
    intruder = p.client(intruder_token)
    wrong = "0000-0000-0000" if code != "0000-0000-0000" else "1111-1111-1111"
    for body in (
        {"activation_key": key, "name": "mine"},
        {"activation_key": key, "name": "mine", "confirmation_code": wrong},
        {"activation_key": key, "name": "mine", "confirmation_code": "nonsense"},
        {"activation_key": key, "name": "mine", "unconfirmed": True},
    ):
        r = intruder.post("/v1/activations", json=body)
        assert r.status_code == 403, (body, r.text)
        assert "confirmation code" in r.json()["message"], r.text
    assert intruder.get("/v1/gateways").json() == []
    # The CLI says the same, and what to do.
    res = p.sgw("activate", key, "--name", "edge")
    assert res.returncode != 0 and "console" in res.stderr, res.stderr
    # The admin who read the console activates with the same key (typed in any case).
    act = p.sgw("activate", key, "--name", "edge", "--code", code.lower(), "--output", "json")
    assert act.returncode == 0, act.stderr
    wait_for((gw.data_dir / "credentials.json").exists, 20, what="credentials")


def test_a_key_of_a_gateway_from_before_codes_needs_an_explicit_flag(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    gw = FakeGateway()
    key = _legacy_key(gw, time.time())
    assert activation_key.check(key, time.time()).commitment is None
    refused = p.admin().post("/v1/activations", json={"activation_key": key, "name": "old"})
    assert refused.status_code == 400 and "--unconfirmed" in refused.json()["message"]
    ok = p.admin().post(
        "/v1/activations", json={"activation_key": key, "name": "old", "unconfirmed": True}
    )
    assert ok.status_code == 201, ok.text
