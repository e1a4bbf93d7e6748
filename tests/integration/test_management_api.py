"""The management API and the admin CLI against a real provider (`sgw provider init`, then
`sgw provider serve` over HTTPS with its own CA), on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from sgw.provider.management.accounts import token_hash
from tests.fixtures.daemons import SGW
from tests.fixtures.management import SecureProvider, activate, init_provider, new_account

MIB = 1 << 20


def test_init_makes_operator_token_and_tls_files_once(tmp_path: Path) -> None:
    data = tmp_path / "prov"
    doc = init_provider(data)
    assert doc["token"].startswith("sgw_")
    for name, mode in (("ca.key", 0o600), ("server.key", 0o600), ("ca.pem", 0o644)):
        assert stat.S_IMODE((data / "tls" / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((data / "master.key").stat().st_mode) == 0o600
    # Only the token's hash is stored.
    db = sqlite3.connect(data / "provider.db")
    (stored,) = db.execute("SELECT token_hash FROM api_tokens").fetchone()
    assert stored == token_hash(doc["token"])
    assert doc["token"] not in (data / "provider.db").read_bytes().decode("latin-1")
    db.close()
    # A second init refuses (it would mint a token nobody asked for).
    res = subprocess.run(
        [SGW, "provider", "init", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "initialized already" in res.stderr


def test_admin_calls_need_a_token_and_see_only_their_account(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    anonymous = p.client()
    for method, path in (
        ("GET", "/v1/account"),
        ("GET", "/v1/gateways"),
        ("GET", "/v1/volumes"),
        ("GET", "/v1/snapshots"),
        ("POST", "/v1/tokens"),
        ("POST", "/v1/activations"),
    ):
        r = anonymous.request(method, path)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthenticated"
    bogus = p.client("sgw_" + "A" * 43)
    assert bogus.get("/v1/account").status_code == 401

    admin = p.admin()
    me = admin.get("/v1/account").json()
    assert me["operator"] is True and me["id"] == p.account_id
    other_id, other_token = new_account(p, "other")
    other = p.client(other_token)
    assert other.get("/v1/account").json()["id"] == other_id
    # Only the operator manages accounts.
    assert other.get("/v1/accounts").status_code == 403
    assert other.post("/v1/accounts", json={"name": "x"}).status_code == 403

    # Resources of one account are 404 to the other.
    vol = admin.post("/v1/volumes", json={"name": "v1", "size": MIB, "mode": "cached"}).json()
    snap = admin.post(f"/v1/volumes/{vol['id']}/snapshots").json()
    gw = activate(p, p.token, "gw-a")
    for method, path, body in (
        ("GET", f"/v1/volumes/{vol['id']}", None),
        ("DELETE", f"/v1/volumes/{vol['id']}", None),
        ("GET", f"/v1/volumes/{vol['id']}/chap", None),
        ("PUT", f"/v1/volumes/{vol['id']}/chap", {"initiator": "iqn.x:y", "secret": "s" * 12}),
        ("GET", f"/v1/volumes/{vol['id']}/access", None),
        ("GET", f"/v1/volumes/{vol['id']}/acl", None),
        ("PUT", f"/v1/volumes/{vol['id']}/acl", {"initiator": "iqn.2024-01.x:y"}),
        ("DELETE", f"/v1/volumes/{vol['id']}/acl/iqn.2024-01.x:y", None),
        ("PUT", f"/v1/volumes/{vol['id']}/open", {"open": True}),
        ("GET", f"/v1/volumes/{vol['id']}/snapshot-schedule", None),
        (
            "PUT",
            f"/v1/volumes/{vol['id']}/snapshot-schedule",
            {"start_hour": 1, "recurrence_hours": 24},
        ),
        ("GET", f"/v1/snapshots/{snap['id']}", None),
        ("DELETE", f"/v1/snapshots/{snap['id']}", None),
        ("GET", f"/v1/gateways/{gw.gateway_id}", None),
        ("PATCH", f"/v1/gateways/{gw.gateway_id}", {"name": "mine"}),
        ("POST", f"/v1/gateways/{gw.gateway_id}/deactivate", None),
        ("DELETE", f"/v1/tokens/{uuid.uuid4()}", None),
    ):
        r = other.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert other.get("/v1/volumes").json() == []
    assert other.get("/v1/snapshots").json() == []
    assert other.get("/v1/gateways").json() == []
    # A volume may not be bound to another account's gateway.
    r = other.post(
        "/v1/volumes",
        json={"name": "v", "size": MIB, "mode": "cached", "gateway_id": gw.gateway_id},
    )
    assert r.status_code == 404
    # ...and the owner still has everything.
    assert admin.get(f"/v1/volumes/{vol['id']}").status_code == 200
    assert admin.get(f"/v1/gateways/{gw.gateway_id}").json()["status"] == "active"


def test_tokens_create_list_revoke(secure_provider: SecureProvider) -> None:
    p = secure_provider
    admin = p.admin()
    made = admin.post("/v1/tokens", json={"name": "ci"})
    assert made.status_code == 201
    token = made.json()["token"]
    listed = admin.get("/v1/tokens").json()
    assert {t["name"] for t in listed} == {"initial", "ci"}
    assert all("token" not in t for t in listed)
    second = p.client(token)
    assert second.get("/v1/account").json()["id"] == p.account_id
    assert admin.delete(f"/v1/tokens/{made.json()['id']}").status_code == 204
    assert second.get("/v1/account").status_code == 401


def test_gateways_rename_deactivate_volumes_chap_schedules(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    admin = p.admin()
    gw = activate(p, p.token, "gw-a")
    assert (
        admin.patch(f"/v1/gateways/{gw.gateway_id}", json={"name": "edge-1"}).json()["name"]
        == "edge-1"
    )
    bad_tz = admin.patch(f"/v1/gateways/{gw.gateway_id}", json={"timezone": "Mars/Base"})
    assert bad_tz.status_code == 400 and "time zone" in bad_tz.json()["message"]
    other = activate(p, p.token, "gw-b")
    taken = admin.patch(f"/v1/gateways/{other.gateway_id}", json={"name": "edge-1"})
    assert taken.status_code == 409

    vol = admin.post(
        "/v1/volumes",
        json={"name": "data", "size": 4 * MIB, "mode": "stored", "gateway_id": gw.gateway_id},
    ).json()
    listed = admin.get("/v1/volumes", params={"gateway_id": gw.gateway_id}).json()
    assert [v["id"] for v in listed] == [vol["id"]] and listed[0]["gateway_id"] == gw.gateway_id
    assert admin.get(f"/v1/gateways/{gw.gateway_id}").json()["volumes"] == 1

    chap = {"initiator": "iqn.1994-05.com.redhat:host1", "secret": "abcdefghijkl"}
    assert admin.put(f"/v1/volumes/{vol['id']}/chap", json=chap).json()["mutual"] is False
    mutual = {**chap, "initiator": "iqn.x:h2", "target_secret": "mnopqrstuvwx"}
    assert admin.put(f"/v1/volumes/{vol['id']}/chap", json=mutual).json()["mutual"] is True
    short = admin.put(f"/v1/volumes/{vol['id']}/chap", json={**chap, "secret": "short"})
    assert short.status_code == 400 and "12 to 16" in short.json()["message"]
    rows = admin.get(f"/v1/volumes/{vol['id']}/chap").json()
    assert [r["initiator"] for r in rows] == ["iqn.1994-05.com.redhat:host1", "iqn.x:h2"]
    assert "abcdefghijkl" not in json.dumps(rows)
    # Secrets are encrypted at rest.
    assert b"abcdefghijkl" not in (p.data_dir / "provider.db").read_bytes()
    assert admin.delete(f"/v1/volumes/{vol['id']}/chap/iqn.x:h2").status_code == 204

    assert admin.get(f"/v1/volumes/{vol['id']}/snapshot-schedule").status_code == 404
    sched = {"start_hour": 2, "recurrence_hours": 12, "retain": 7}
    put = admin.put(f"/v1/volumes/{vol['id']}/snapshot-schedule", json=sched)
    assert put.status_code == 200 and put.json()["retain"] == 7
    bad = admin.put(
        f"/v1/volumes/{vol['id']}/snapshot-schedule", json={**sched, "recurrence_hours": 5}
    )
    assert bad.status_code == 422
    assert admin.get(f"/v1/volumes/{vol['id']}/snapshot-schedule").json()["start_hour"] == 2

    snap = admin.post(f"/v1/volumes/{vol['id']}/snapshots", json={"description": "d"}).json()
    snaps = admin.get("/v1/snapshots", params={"volume_id": vol["id"]}).json()
    assert [s["id"] for s in snaps] == [snap["id"]]

    deact = admin.post(f"/v1/gateways/{gw.gateway_id}/deactivate").json()
    assert deact["status"] == "deactivated" and deact["deactivated"]
    # A deactivated gateway's signed requests are refused.
    r = p.client(auth=gw.auth()).get(f"/v1/volumes/{vol['id']}")
    assert r.status_code == 401 and "deactivated" in r.json()["message"]
    assert admin.delete(f"/v1/volumes/{vol['id']}").status_code == 204


HOST1 = "iqn.1994-05.com.redhat:host1"
HOST2 = "iqn.1994-05.com.redhat:host2"


def test_iscsi_access_is_closed_until_a_rule_and_reaches_only_the_gateway(
    secure_provider: SecureProvider,
) -> None:
    """A new volume is closed; initiators with CHAP, without CHAP and the open flag are
    stored and listed (an initiator is held to CHAP once it has credentials); removing the
    last rule closes the volume again; the rules with their secrets go to the volume's
    gateway only, and another account sees nothing."""
    p = secure_provider
    admin = p.admin()
    gw = activate(p, p.token, "gw-a")
    vol = admin.post(
        "/v1/volumes",
        json={"name": "data", "size": 4 * MIB, "mode": "stored", "gateway_id": gw.gateway_id},
    ).json()
    vid = vol["id"]

    def listed() -> dict[str, Any]:
        rows = {v["id"]: v for v in admin.get("/v1/volumes").json()}
        return dict(rows[vid])

    def access() -> dict[str, Any]:
        r = admin.get(f"/v1/volumes/{vid}/access")
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert listed()["access"] == "closed" and access()["access"] == "closed"
    assert (listed()["iscsi_open"], listed()["iscsi_legacy_open"]) == (False, False)

    # Without CHAP, by name: normalised to lower case, checked as LIO would.
    added = admin.put(f"/v1/volumes/{vid}/acl", json={"initiator": " " + HOST2.upper()})
    assert added.status_code == 200 and added.json()["initiator"] == HOST2, added.text
    for bad in ("iqn.x:y", "host1", HOST2 + "\nx", "iqn.2024-01.x:" + "a" * 220):
        r = admin.put(f"/v1/volumes/{vid}/acl", json={"initiator": bad})
        assert r.status_code == 400 and "iSCSI initiator name" in r.json()["message"], bad
    assert [a["initiator"] for a in admin.get(f"/v1/volumes/{vid}/acl").json()] == [HOST2]
    assert listed()["access"] == "acl 1"

    # With CHAP: an initiator allowed without it gets credentials and needs them from now.
    chap = {"initiator": HOST2, "secret": "abcdefghijkl"}
    assert admin.put(f"/v1/volumes/{vid}/chap", json=chap).status_code == 200
    assert admin.get(f"/v1/volumes/{vid}/acl").json() == []
    refused = admin.put(f"/v1/volumes/{vid}/acl", json={"initiator": HOST2})
    assert refused.status_code == 400 and "chap-delete" in refused.json()["message"]
    assert admin.put(f"/v1/volumes/{vid}/acl", json={"initiator": HOST1}).status_code == 200
    got = access()
    assert got["access"] == "chap 1, acl 1" and got["open"] is False
    assert [c["initiator"] for c in got["chap"]] == [HOST2]
    assert [a["initiator"] for a in got["acl"]] == [HOST1]
    assert "abcdefghijkl" not in json.dumps(got)

    # Open: any initiator, the rules kept aside; closed again: the rules apply.
    opened = admin.put(f"/v1/volumes/{vid}/open", json={"open": True})
    assert opened.status_code == 200 and opened.json()["access"] == "OPEN"
    assert listed()["access"] == "OPEN" and listed()["iscsi_open"] is True
    assert admin.put(f"/v1/volumes/{vid}/open", json={"open": "yes"}).status_code == 422
    assert admin.put(f"/v1/volumes/{vid}/open", json={"open": False}).json()["open"] is False
    assert listed()["access"] == "chap 1, acl 1"

    # The volume's gateway fetches the rules, secrets in the clear; nobody else does.
    signed = p.client(auth=gw.auth())
    r = signed.get(f"/v1/gateway/volumes/{vid}/access")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text
    assert r.json() == {
        "chap": [{"initiator": HOST2, "secret": "abcdefghijkl", "target_secret": None}],
        "acl": [HOST1],
        "open": False,
    }
    assert admin.get(f"/v1/gateway/volumes/{vid}/access").status_code == 403
    other_gw = activate(p, p.token, "gw-b")
    assert (
        p.client(auth=other_gw.auth()).get(f"/v1/gateway/volumes/{vid}/access").status_code == 404
    )
    _other_id, other_token = new_account(p, "other")
    other = p.client(other_token)
    for method, path, body in (
        ("GET", f"/v1/volumes/{vid}/access", None),
        ("PUT", f"/v1/volumes/{vid}/acl", {"initiator": HOST1}),
        ("DELETE", f"/v1/volumes/{vid}/acl/{HOST1}", None),
        ("PUT", f"/v1/volumes/{vid}/open", {"open": True}),
    ):
        r = other.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert listed()["access"] == "chap 1, acl 1"  # nothing changed

    # Removing the last rule closes the volume.
    assert admin.delete(f"/v1/volumes/{vid}/acl/{HOST1.upper()}").status_code == 204
    assert admin.delete(f"/v1/volumes/{vid}/acl/{HOST1}").status_code == 404
    assert admin.delete(f"/v1/volumes/{vid}/chap/{HOST2}").status_code == 204
    assert listed()["access"] == "closed" and access()["chap"] == access()["acl"] == []
    assert signed.get(f"/v1/gateway/volumes/{vid}/access").json() == {
        "chap": [],
        "acl": [],
        "open": False,
    }


def test_gateways_cannot_make_admin_calls(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    signed = p.client(auth=gw.auth())
    for method, path in (
        ("GET", "/v1/account"),
        ("GET", "/v1/gateways"),
        ("GET", "/v1/volumes"),
        ("POST", "/v1/tokens"),
        ("GET", f"/v1/gateways/{gw.gateway_id}"),
    ):
        r = signed.request(method, path)
        assert r.status_code == 403, (method, path, r.text)


def test_management_on_postgresql(
    tmp_path: Path, secure_provider_factory: type[SecureProvider], empty_db_url: str
) -> None:
    p = secure_provider_factory(tmp_path / "prov", db_url=empty_db_url).start()
    admin = p.admin()
    gw = activate(p, p.token, "gw")
    vol = admin.post(
        "/v1/volumes",
        json={"name": "v", "size": MIB, "mode": "cached", "gateway_id": gw.gateway_id},
    ).json()
    signed = p.client(auth=gw.auth())
    assert signed.get(f"/v1/volumes/{vol['id']}").status_code == 200
    # The nonce ledger is shared through the database: a replay is refused.
    req = signed.build_request("GET", f"/v1/volumes/{vol['id']}")
    flow = gw.auth().sync_auth_flow(req)
    signed_req = next(flow)
    raw = httpx.Client(base_url=p.url, verify=p.tls)
    assert raw.send(signed_req).status_code == 200
    assert raw.send(signed_req).status_code == 401
    raw.close()
    put = admin.put(
        f"/v1/volumes/{vol['id']}/chap", json={"initiator": "iqn.a:b", "secret": "x" * 14}
    )
    assert put.status_code == 200
    # iSCSI access on PostgreSQL: the listing counts each volume's initiators.
    acl = admin.put(f"/v1/volumes/{vol['id']}/acl", json={"initiator": HOST1})
    assert acl.status_code == 200, acl.text
    assert [v["access"] for v in admin.get("/v1/volumes").json()] == ["chap 1, acl 1"]
    assert admin.put(f"/v1/volumes/{vol['id']}/open", json={"open": True}).status_code == 200
    assert signed.get(f"/v1/gateway/volumes/{vol['id']}/access").json()["open"] is True
    _other_id, other_token = new_account(p, "other")
    assert p.client(other_token).get(f"/v1/volumes/{vol['id']}").status_code == 404


def test_cli_tables_json_and_exit_codes(secure_provider: SecureProvider) -> None:
    p = secure_provider
    shown = p.sgw("accounts", "show", "--output", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == p.account_id
    table = p.sgw("accounts", "show")
    assert table.returncode == 0 and p.account_id in table.stdout

    gw = activate(p, p.token, "gw-cli")
    listed = p.sgw("gateways", "list", "--output", "json")
    assert [g["id"] for g in json.loads(listed.stdout)] == [gw.gateway_id]
    assert "gw-cli" in p.sgw("gateways", "list").stdout
    renamed = p.sgw("gateways", "rename", gw.gateway_id, "edge", "--output", "json")
    assert json.loads(renamed.stdout)["name"] == "edge"

    # A volume on a gateway is made by the gateway (the control channel): this one never
    # connects, so that is refused at once (6: offline); a volume at the provider only
    # needs no gateway.
    offline = p.sgw("volumes", "create", "cli-vol", "16M", "--gateway", gw.gateway_id)
    assert offline.returncode == 6 and "offline" in offline.stderr, offline.stderr
    made = p.sgw("volumes", "create", "cli-vol", "16M", "--output", "json")
    assert made.returncode == 0, made.stderr
    vid = json.loads(made.stdout)["id"]
    chap = subprocess_input(p, ["volumes", "chap-set", vid, "--initiator", "iqn.z:1"], "a" * 13)
    assert chap.returncode == 0, chap.stderr
    sched = p.sgw("volumes", "schedule-set", vid, "--start-hour", "3", "--every", "24")
    assert sched.returncode == 0, sched.stderr
    described = json.loads(p.sgw("volumes", "describe", vid, "--output", "json").stdout)
    assert described["chap"][0]["initiator"] == "iqn.z:1"
    assert described["snapshot_schedule"]["start_hour"] == 3
    snap = p.sgw("snapshots", "create", vid, "--description", "now", "--output", "json")
    assert snap.returncode == 0, snap.stderr
    sid = json.loads(snap.stdout)["id"]
    assert sid in p.sgw("snapshots", "list", "--volume", vid, "--output", "json").stdout

    # Exit codes: 4 not found, 3 unauthenticated, 1 refused, 2 usage.
    missing = p.sgw("volumes", "describe", str(uuid.uuid4()))
    assert missing.returncode == 4 and "not found" in missing.stderr
    assert p.sgw("accounts", "show", token="sgw_nope").returncode == 3
    dup = p.sgw("volumes", "create", "cli-vol", "16M")
    assert dup.returncode == 1 and "409" in dup.stderr
    assert p.sgw("volumes", "frobnicate").returncode == 2
    for args in (["--help"], ["volumes", "--help"], ["volumes", "chap-set", "--help"],
                 ["activate", "--help"], ["provider", "init", "--help"]):  # fmt: skip
        res = p.sgw(*args)
        assert res.returncode == 0 and "usage" in res.stdout, args
    deact = p.sgw("gateways", "deactivate", gw.gateway_id, "--output", "json")
    assert json.loads(deact.stdout)["status"] == "deactivated"


def subprocess_input(
    p: SecureProvider, args: list[str], stdin: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SGW, *args],
        input=stdin + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=p.cli_env(),
        check=False,
    )


def test_cli_reads_endpoint_and_token_from_a_private_config_file(
    secure_provider: SecureProvider, tmp_path: Path
) -> None:
    p = secure_provider
    conf = tmp_path / "cli.toml"
    conf.write_text(f'endpoint = "{p.url}"\ntoken = "{p.token}"\nca = "{p.ca}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGW_")}
    env["SGW_CONFIG"] = str(conf)
    conf.chmod(0o644)
    loose = subprocess.run(
        [SGW, "accounts", "show"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    conf.chmod(0o600)
    ok = subprocess.run(
        [SGW, "accounts", "show", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["id"] == p.account_id


@pytest.mark.parametrize("path", ["/openapi.json"])
def test_openapi_describes_the_management_api(secure_provider: SecureProvider, path: str) -> None:
    spec = httpx.get(secure_provider.url + path, verify=secure_provider.tls).json()
    for route in (
        "/v1/account",
        "/v1/accounts",
        "/v1/tokens",
        "/v1/activations",
        "/v1/gateways",
        "/v1/gateways/{gateway_id}",
        "/v1/gateways/{gateway_id}/deactivate",
        "/v1/gateway/credentials",
        "/v1/volumes",
        "/v1/volumes/{volume_id}/chap",
        "/v1/volumes/{volume_id}/access",
        "/v1/volumes/{volume_id}/acl",
        "/v1/volumes/{volume_id}/open",
        "/v1/gateway/volumes/{volume_id}/access",
        "/v1/volumes/{volume_id}/snapshot-schedule",
        "/v1/snapshots",
        "/v1/updates/plan",
        "/v1/updates/reports",
        "/v1/updates/policy",
        "/v1/updates/status",
        "/v1/gateways/{gateway_id}/update-policy",
        "/v1/gateways/{gateway_id}/updates/now",
        "/v1/rollouts",
        "/v1/rollouts/halt",
        "/v1/rollouts/resume",
    ):
        assert route in spec["paths"], route


def test_tls_is_pinned_and_plain_http_needs_loopback_or_a_flag(
    secure_provider: SecureProvider, tmp_path: Path
) -> None:
    # The provider's certificate is of its own CA: unknown to the system trust store.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{secure_provider.url}/v1/health")
    assert httpx.get(f"{secure_provider.url}/v1/health", verify=secure_provider.tls).is_success
    res = subprocess.run(
        [SGW, "provider", "serve", "--data-dir", str(tmp_path / "p"), "--listen", "0.0.0.0:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "--insecure-http" in res.stderr


def test_a_volume_name_ending_in_a_newline_is_refused_everywhere(
    secure_provider: SecureProvider,
) -> None:
    """``re.match`` with ``$`` let "vol\\n" pass as a gateway's volume name. The provider
    refuses it (a create_volume command, a volume bound to a gateway, any volume: not
    printable), and so does the CLI before sending anything; nothing is made."""
    p = secure_provider
    gw = activate(p, p.token, "gw")
    admin = p.admin()
    before = admin.get("/v1/volumes").json()

    # The command, refused before the (offline) gateway matters or a record is made.
    r = admin.post(
        f"/v1/gateways/{gw.gateway_id}/commands",
        json={"type": "create_volume", "args": {"name": "vol\n", "size": 16 * MIB}},
    )
    assert r.status_code == 400, r.text
    assert "volume name 'vol\\n': a gateway's volumes are named with 1 to 64" in r.json()["message"]
    # A volume bound to a gateway, made by the gateway itself or by an admin: not
    # printable, or printable but not by the gateway's rule.
    for client, extra in (
        (p.client(auth=gw.auth()), {}),
        (admin, {"gateway_id": gw.gateway_id}),
    ):
        for name, words in (
            ("vol\n", "give 1 to 255 printable characters"),
            ("../vol", "a volume on a gateway is named with 1 to 64"),
        ):
            r = client.post(
                "/v1/volumes", json={"name": name, "size": MIB, "mode": "cached", **extra}
            )
            assert r.status_code == 400, r.text
            assert words in r.json()["message"]
    # Any volume: printable characters only.
    r = admin.post("/v1/volumes", json={"name": "vol\n", "size": MIB, "mode": "cached"})
    assert r.status_code == 400 and "printable characters" in r.json()["message"], r.text

    # The CLI, with and without a gateway (exit status 2: the command line is wrong).
    for flags in (["--gateway", gw.gateway_id], []):
        res = p.sgw("volumes", "create", "vol\n", "16M", *flags)
        assert res.returncode == 2, res.stderr
        assert "volume name 'vol\\n'" in res.stderr
    assert admin.get("/v1/volumes").json() == before
    assert admin.get(f"/v1/gateways/{gw.gateway_id}/commands").json() == []  # none sent
