"""Key scopes cannot be shared by choosing ids (issue 20, item 4): the provider names
every new lineage's scope itself (``<account>.<random>``), and an id that names anything
else, or named something deleted, is refused with the same answer as a taken one.

The attack before: a caller chose a new volume's id equal to another tenant's snapshot
id (or a deleted volume's), so the new volume landed in that scope; chunk reads then
returned the other tenant's data by its hash, and pack uploads answered "present" for
content the other tenant stored (an oracle of what it holds). Tried here across accounts
and across gateways of one account, on a real provider over HTTPS."""

from __future__ import annotations

import hashlib
import uuid

from sgw.common.chunk_packs import MEDIA_TYPE, PackedChunk, encode_pack
from tests.fixtures.management import SecureProvider, activate, new_account

MIB = 1 << 20
SECRET = b"the victim's secret block " * 2000
UNAVAILABLE = "is not available: choose another (a new UUID)"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_ids_of_other_tenants_and_deleted_volumes_are_refused(
    secure_provider: SecureProvider,
) -> None:
    p = secure_provider
    victim = activate(p, p.token, "victim-gw")
    sibling = activate(p, p.token, "sibling-gw")  # another gateway of the same account
    _, attacker_token = new_account(p, "attacker")
    attacker = activate(p, attacker_token, "attacker-gw")
    vc = p.client(auth=victim.auth())

    # The victim stores a secret chunk, commits it and takes a snapshot (gateway-named).
    vol = vc.post("/v1/volumes", json={"name": "v", "size": MIB, "mode": "cached"})
    assert vol.status_code == 201, vol.text
    vid = vol.json()["id"]
    put = vc.put(
        f"/v1/volumes/{vid}/chunks/{_sha(SECRET)}",
        content=SECRET,
        headers={"x-sgw-sha256": _sha(SECRET)},
    )
    assert put.status_code == 201, put.text
    commit = vc.post(
        f"/v1/volumes/{vid}/commits",
        json={
            "base_version": 0,
            "idempotency_key": uuid.uuid4().hex,
            "changes": {"0": _sha(SECRET)},
        },
    )
    assert commit.status_code == 200, commit.text
    sid = str(uuid.uuid4())
    snap = vc.post(f"/v1/volumes/{vid}/snapshots", json={"snapshot_id": sid})
    assert snap.status_code == 201, snap.text
    # A volume the victim deletes: its id is retired.
    gone = vc.post("/v1/volumes", json={"name": "gone", "size": MIB, "mode": "cached"})
    gone_id = gone.json()["id"]
    assert vc.delete(f"/v1/volumes/{gone_id}").status_code in (200, 202, 204)

    callers = {
        "another account's gateway": p.client(auth=attacker.auth()),
        "another account's admin": p.client(attacker_token),
        "a sibling gateway": p.client(auth=sibling.auth()),
    }
    for who, client in callers.items():
        for target in (sid, gone_id, vid):
            r = client.post(
                "/v1/volumes",
                json={"id": target, "name": f"x{target[:6]}", "size": MIB, "mode": "cached"},
            )
            assert r.status_code == 409, (who, target, r.text)
            assert UNAVAILABLE in r.json()["message"], (who, r.text)
    # A gateway may name its snapshots, but not after a volume or a retired id.
    own = p.client(auth=attacker.auth()).post(
        "/v1/volumes", json={"name": "mine", "size": MIB, "mode": "cached"}
    )
    assert own.status_code == 201, own.text
    own_id = own.json()["id"]
    for target in (vid, gone_id):
        r = p.client(auth=attacker.auth()).post(
            f"/v1/volumes/{own_id}/snapshots", json={"snapshot_id": target}
        )
        assert r.status_code == 409 and UNAVAILABLE in r.text, (target, r.text)

    # The attacker's own volume is a scope of its own: the secret is not readable by its
    # hash, and a pack of the same content is stored, not answered "present".
    ac = p.client(auth=attacker.auth())
    assert ac.get(f"/v1/volumes/{own_id}/chunks/{_sha(SECRET)}").status_code == 404
    body = encode_pack([PackedChunk(_sha(SECRET), SECRET, False)])
    packed = ac.post(
        f"/v1/volumes/{own_id}/chunk-packs", content=body, headers={"content-type": MEDIA_TYPE}
    )
    assert packed.status_code == 200, packed.text
    assert packed.json() == {"stored": [_sha(SECRET)], "present": []}
    # The victim still reads its data, and its snapshot is its own.
    assert vc.get(f"/v1/volumes/{vid}/chunks/{_sha(SECRET)}").content == SECRET
    assert vc.get(f"/v1/snapshots/{sid}").status_code == 200
