"""Health at the provider through a real `sgw provider serve` over HTTPS: gateways (identities
in this process that sign as the daemon does) upload batches of reports; admins read them
back per gateway, per volume and for the fleet, scoped to their account; the operator's
Prometheus scrape; `sgw health`. The store itself, on SQLite and PostgreSQL, is
tests/integration/test_health_store.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sgw.common.health import HEALTH_PATH, HealthEvent, HealthReport
from tests.fixtures.management import FakeGateway, SecureProvider, activate, new_account

MIB = 1 << 20
# Report ``seq`` was sampled ``seq`` minutes after this (within the series' default day).
BASE = datetime.now(UTC) - timedelta(hours=2)


def batch(*seqs: int, version: str = "1.2.0", **gateway: float) -> dict[str, Any]:
    now = datetime.now(UTC)
    reports = [
        HealthReport(
            seq,
            BASE + timedelta(minutes=seq),
            version,
            kernel="6.1.0",
            hypervisor="kvm",
            site="lab",
            gateway={"log_used_percent": 40.0 + seq, "queued_write_bytes": 1e6, **gateway},
            volumes={"data": {"queued_write_bytes": 5e5 + seq, "read_bytes_total": 7.0 * seq}},
            events=(HealthEvent("disk_error", now, "error", "data", "sdb: I/O error"),)
            if seq == 2
            else (),
        ).to_json()
        for seq in seqs
    ]
    return {"reports": reports}


def upload(p: SecureProvider, gw: FakeGateway, body: Any) -> httpx.Response:
    return p.client(auth=gw.auth()).post(HEALTH_PATH, json=body)


def test_reports_are_stored_once_and_read_back(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw-1")
    admin = p.admin()
    vol = admin.post(
        "/v1/volumes",
        json={"name": "data", "size": MIB, "mode": "cached", "gateway_id": gw.gateway_id},
    )
    assert vol.status_code == 201, vol.text
    assert admin.get(f"/v1/gateways/{gw.gateway_id}/health").json()["latest"] is None
    for _ in range(2):  # the same batch twice: stored once
        r = upload(p, gw, batch(1, 2, 3))
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted_through": 3}
    assert upload(p, gw, batch(2, 3, 4, 5)).json() == {"accepted_through": 5}
    assert upload(p, gw, batch(1)).json() == {"accepted_through": 5}

    h = admin.get(f"/v1/gateways/{gw.gateway_id}/health").json()
    assert h["name"] == "gw-1" and h["latest"]["seq"] == 5
    assert h["latest"]["version"] == "1.2.0" and h["latest"]["hypervisor"] == "kvm"
    assert h["latest"]["gateway"]["log_used_percent"] == 45.0
    assert h["latest"]["volumes"]["data"]["queued_write_bytes"] == 500005.0
    # Report 2 came three times, in three batches: its event is stored once.
    assert [(e["kind"], e["volume"], e["seq"]) for e in h["events"]] == [("disk_error", "data", 2)]
    s = admin.get(
        f"/v1/gateways/{gw.gateway_id}/health/series", params={"metric": "log_used_percent"}
    ).json()
    assert [pt["value"] for pt in s["points"]] == [41.0, 42.0, 43.0, 44.0, 45.0]
    vid = vol.json()["id"]
    v = admin.get(f"/v1/volumes/{vid}/health").json()
    assert v["name"] == "data" and v["metrics"]["read_bytes_total"] == 35.0
    assert len(v["events"]) == 1
    vs = admin.get(f"/v1/volumes/{vid}/health/series", params={"metric": "read_bytes_total"}).json()
    assert [pt["value"] for pt in vs["points"]] == [7.0, 14.0, 21.0, 28.0, 35.0]
    bad = admin.get(f"/v1/volumes/{vid}/health/series", params={"metric": "uptime_seconds"})
    assert bad.status_code == 400 and "no volume metric 'uptime_seconds'" in bad.text

    fleet = admin.get("/v1/health/fleet").json()
    assert [(f["name"], f["version"], f["log_used_percent"], f["error_events"]) for f in fleet] == [
        ("gw-1", "1.2.0", 45.0, 1)
    ]
    assert fleet[0]["last_report_age_s"] is not None and fleet[0]["last_report_age_s"] >= 0


def test_bad_batches_are_refused_and_store_nothing(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw-1")
    gwc = p.client(auth=gw.auth())
    good = batch(1)["reports"][0]
    bodies: list[Any] = [
        {"reports": []},
        {"reports": [{**good, "gateway": {"no_such_metric": 1}}]},
        {"reports": [good, {**good, "seq": -1}]},  # one bad report refuses the batch
        {"reports": [{**good, "at": "yesterday"}]},
        {"reports": [{**good, "volumes": {"../etc": {}}}]},
        [good],
    ]
    for body in bodies:
        r = gwc.post(HEALTH_PATH, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"] == "bad_request"
    r = gwc.post(HEALTH_PATH, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["message"]
    big = {"reports": [good], "pad": "x" * MIB}
    r = gwc.post(HEALTH_PATH, json=big)
    assert r.status_code == 413 and "health report batches" in r.json()["message"]
    assert p.admin().get(f"/v1/gateways/{gw.gateway_id}/health").json()["latest"] is None
    # An admin's token is no gateway: it cannot upload.
    r = p.admin().post(HEALTH_PATH, json=batch(1))
    assert r.status_code == 403


def test_gateways_and_accounts_see_only_their_own(secure_provider: SecureProvider) -> None:
    p = secure_provider
    other_account, other_token = new_account(p, "tenant")
    mine = activate(p, other_token, "mine")
    theirs = activate(p, p.token, "theirs")
    assert upload(p, mine, batch(1, 2)).status_code == 200
    assert upload(p, theirs, batch(7)).status_code == 200
    # A gateway's upload is its own, whatever it names: nothing lands on another gateway.
    assert upload(p, mine, batch(9)).json() == {"accepted_through": 9}
    admin = p.admin()
    assert admin.get(f"/v1/gateways/{theirs.gateway_id}/health").json()["latest"]["seq"] == 7
    # A gateway's credentials read nothing.
    as_gw = p.client(auth=mine.auth())
    for path in (
        f"/v1/gateways/{theirs.gateway_id}/health",
        f"/v1/gateways/{mine.gateway_id}/health",
        "/v1/health/fleet",
        "/metrics",
    ):
        assert as_gw.get(path).status_code == 403, path
    # The tenant's token: its gateway only.
    tenant = p.client(other_token)
    assert tenant.get(f"/v1/gateways/{mine.gateway_id}/health").json()["latest"]["seq"] == 9
    for path in (
        f"/v1/gateways/{theirs.gateway_id}/health",
        f"/v1/gateways/{theirs.gateway_id}/health/series?metric=log_used_percent",
    ):
        r = tenant.get(path)
        assert r.status_code == 404 and theirs.gateway_id in r.text, path
    assert [f["name"] for f in tenant.get("/v1/health/fleet").json()] == ["mine"]
    vol = admin.post(
        "/v1/volumes",
        json={"name": "data", "size": MIB, "mode": "cached", "gateway_id": theirs.gateway_id},
    ).json()["id"]
    assert tenant.get(f"/v1/volumes/{vol}/health").status_code == 404
    assert admin.get(f"/v1/volumes/{vol}/health").status_code == 200
    # The operator sees every account's gateways.
    fleet = {f["name"]: f["account_id"] for f in admin.get("/v1/health/fleet").json()}
    assert fleet == {"mine": other_account, "theirs": p.account_id}
    assert admin.get(f"/v1/gateways/{mine.gateway_id}/health").json()["latest"]["seq"] == 9
    # Only the operator scrapes.
    assert tenant.get("/metrics").status_code == 403


def test_metrics_serve_the_fleets_newest_samples(secure_provider: SecureProvider) -> None:
    p = secure_provider
    a = activate(p, p.token, "gw-a")
    b = activate(p, p.token, "gw-b")
    upload(p, a, batch(1, 2, 3, upload_errors_total=4))
    upload(p, b, batch(10, version="1.3.0"))
    r = p.admin().get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, s.labels.get("gateway_name"), s.labels.get("volume")): (s.value, s.labels)
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
    }
    value, labels = samples[("sgw_log_used_percent", "gw-a", None)]
    assert value == 43.0 and labels["gateway"] == a.gateway_id and labels["version"] == "1.2.0"
    assert samples[("sgw_log_used_percent", "gw-b", None)][0] == 50.0
    assert samples[("sgw_log_used_percent", "gw-b", None)][1]["version"] == "1.3.0"
    assert samples[("sgw_queued_write_bytes", "gw-a", "data")][0] == 500003.0
    assert samples[("sgw_upload_errors_total", "gw-a", None)][0] == 4.0
    assert samples[("sgw_read_bytes_total", "gw-b", "data")][0] == 70.0
    last = samples[("sgw_health_last_report_timestamp_seconds", "gw-a", None)][0]
    assert abs(last - time.time()) < 600
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert types["sgw_upload_errors"] == "counter" and types["sgw_log_used_percent"] == "gauge"


def test_new_routes_refuse_requests_without_credentials(secure_provider: SecureProvider) -> None:
    p = secure_provider
    for method, path in (
        ("POST", HEALTH_PATH),
        ("GET", "/v1/gateways/x/health"),
        ("GET", "/v1/gateways/x/health/series?metric=log_used_percent"),
        ("GET", "/v1/volumes/x/health"),
        ("GET", "/v1/volumes/x/health/series?metric=size_bytes"),
        ("GET", "/v1/health/fleet"),
        ("GET", "/metrics"),
    ):
        r = httpx.request(
            method, p.url + path, verify=p.tls, json=batch(1) if method == "POST" else None
        )
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthenticated"


def test_sgw_health_shows_a_gateway_and_the_fleet(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw-1")
    upload(p, gw, batch(1, 2))
    res = p.sgw("health", gw.gateway_id, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["latest"]["seq"] == 2 and doc["events"][0]["kind"] == "disk_error"
    res = p.sgw("health", "gw-1")  # by name too
    assert res.returncode == 0, res.stderr
    assert "log_used_percent" in res.stdout and "disk_error" in res.stdout
    res = p.sgw("health", "--fleet")
    assert res.returncode == 0, res.stderr
    assert "gw-1" in res.stdout and "1.2.0" in res.stdout
    res = p.sgw("health", "--fleet", "--json")
    assert [g["name"] for g in json.loads(res.stdout)] == ["gw-1"]
    res = p.sgw("health", "nope")
    assert res.returncode != 0 and "nope" in res.stderr
