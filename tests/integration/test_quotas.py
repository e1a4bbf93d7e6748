"""Per-account quotas and limits against a real provider (`sgw provider init`, then
`sgw provider serve` over HTTPS): the volume size limit, the volume and provisioned-bytes
quotas set with `sgw accounts quota-set`, and the request rate quota (429, then recovery)
on the framework's routes and on the control channel's fast path (docs/provider.md,
"Quotas")."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import httpx

from sgw.provider.blockstore.maps import MAX_VOLUME_SIZE
from tests.fixtures.management import SecureProvider, activate, cli_json, new_account
from tests.fixtures.waiting import wait_for

MIB = 1 << 20


def _volume(client: httpx.Client, size: int, **extra: object) -> httpx.Response:
    body = {"name": f"q-{uuid.uuid4().hex[:8]}", "size": size, "mode": "cached", **extra}
    return client.post("/v1/volumes", json=body)


def test_volume_size_is_limited(secure_provider: SecureProvider) -> None:
    admin = secure_provider.admin()
    r = _volume(admin, MAX_VOLUME_SIZE + 4096)
    assert r.status_code == 400, r.text
    assert f"at most {MAX_VOLUME_SIZE} (64 TiB" in r.json()["message"]
    r = admin.post("/v1/snapshots", json={"volume_size": 1 << 62})
    assert r.status_code == 400 and "64 TiB" in r.json()["message"], r.text
    # The limit itself is accepted (an empty volume costs no map entries).
    r = _volume(admin, MAX_VOLUME_SIZE)
    assert r.status_code == 201 and r.json()["size"] == MAX_VOLUME_SIZE, r.text


def test_volume_and_byte_quotas_refuse_with_403_naming_the_quota(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    account_id, token = new_account(p, "tenant")
    tenant = p.client(token)
    # Unset by default: nothing limits the account but the rate's default.
    listed = {a["id"]: a for a in cli_json(p, "accounts", "list")}
    assert listed[account_id]["quota_volumes"] is None
    assert listed[account_id]["quota_bytes"] is None
    assert listed[account_id]["quota_rate"] is None

    doc = cli_json(p, "accounts", "quota-set", "tenant", "--volumes", "2", "--bytes", "3M")
    assert doc["id"] == account_id
    assert (doc["quota_volumes"], doc["quota_bytes"], doc["quota_rate"]) == (2, 3 * MIB, None)
    # The account sees its quotas (`sgw accounts show`), the operator's list too.
    shown = json.loads(p.sgw("accounts", "show", "--output", "json", token=token).stdout)
    assert (shown["quota_volumes"], shown["quota_bytes"]) == (2, 3 * MIB)
    listed = {a["id"]: a for a in cli_json(p, "accounts", "list")}
    assert listed[account_id]["quota_volumes"] == 2

    assert _volume(tenant, MIB).status_code == 201
    assert _volume(tenant, MIB).status_code == 201
    r = _volume(tenant, MIB)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "quota_exceeded"
    message = r.json()["message"]
    assert "its volume quota is 2" in message, message
    assert f"sgw accounts quota-set {account_id} --volumes N" in message, message

    # Volumes lifted; the byte quota (3 MiB, 2 MiB provisioned) still holds.
    assert (
        cli_json(p, "accounts", "quota-set", account_id, "--volumes", "unlimited")["quota_volumes"]
        is None
    )
    r = _volume(tenant, 2 * MIB)
    assert r.status_code == 403 and r.json()["error"] == "quota_exceeded", r.text
    message = r.json()["message"]
    assert f"byte quota of {3 * MIB}" in message and "--bytes SIZE" in message, message
    assert _volume(tenant, MIB).status_code == 201  # exactly the quota
    assert len(tenant.get("/v1/volumes").json()) == 3
    # Another account is not limited by this one's quotas.
    assert _volume(p.admin(), 4 * MIB).status_code == 201

    # Only the operator sets quotas; bad values are refused naming the fix.
    r = tenant.patch(f"/v1/accounts/{account_id}/quotas", json={"volumes": 100})
    assert r.status_code == 403, r.text
    r = p.admin().patch(f"/v1/accounts/{account_id}/quotas", json={"rate": 0})
    assert r.status_code == 422, r.text
    r = p.admin().patch(f"/v1/accounts/{uuid.uuid4()}/quotas", json={"volumes": 1})
    assert r.status_code == 404, r.text
    res = p.sgw("accounts", "quota-set", "tenant", "--rate", "0.5")
    assert res.returncode != 0 and "at least 1" in res.stderr, res.stderr
    res = p.sgw("accounts", "quota-set", "nobody", "--volumes", "1")
    assert res.returncode != 0 and "no account has the id or name 'nobody'" in res.stderr


def test_the_rate_quota_refuses_a_burst_with_429_and_recovers(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    account_id, token = new_account(p, "chatty")
    tenant = p.client(token)
    gw = activate(p, token, "gw-chatty")
    signed = p.client(auth=gw.auth())
    assert cli_json(p, "accounts", "quota-set", account_id, "--rate", "2")["quota_rate"] == 2

    # Bursts of the framework's route (API token) and of the control channel's fast
    # path (the gateway's signed poll), sharing the account's bucket (4 requests): each
    # meets the limit well before 50 requests, however slowly they come.
    def burst(call: Callable[[], httpx.Response]) -> httpx.Response:
        for _ in range(50):
            r = call()
            assert r.status_code in (200, 429), r.text
            if r.status_code == 429:
                return r
        raise AssertionError("50 requests in a row were all served at a rate quota of 2/s")

    refused = [
        burst(lambda: tenant.get("/v1/account")),
        burst(lambda: signed.get("/v1/gateway/messages?wait=0")),
    ]
    for r in refused:
        assert r.json()["error"] == "rate_limited"
        assert "more than 2 requests per second" in r.json()["message"]
        assert f"sgw accounts quota-set {account_id} --rate N" in r.json()["message"]
        assert int(r.headers["retry-after"]) >= 1
    # Another account is served meanwhile.
    assert p.admin().get("/v1/account").status_code == 200

    # The bucket refills: the account is served again.
    wait_for(lambda: tenant.get("/v1/account").status_code == 200, what="the rate to recover")
    # Back to the default rate: the same burst passes.
    assert (
        cli_json(p, "accounts", "quota-set", account_id, "--rate", "default")["quota_rate"] is None
    )
    assert all(tenant.get("/v1/account").status_code == 200 for _ in range(20))
