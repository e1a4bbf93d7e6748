"""The control channel's lean path (``sgw.provider.api.lean``) against real provider
processes: it authenticates exactly like the framework's middleware (bad signatures,
replays, also across two server processes, deactivated gateways), hands what it does
not serve to the framework (same answers), and the nonce ledger's group writes."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import text

from sgw.common import signing
from sgw.provider.auth import nonces
from sgw.provider.auth.nonces import NonceLedger
from sgw.provider.db import schema
from sgw.provider.management.gateways import KEY_TRUST_S
from tests.fixtures.clock import FakeClock
from tests.fixtures.management import FakeGateway, SecureProvider, activate, start_servers


def signed_request(
    p: SecureProvider,
    gw: FakeGateway,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    signed_target: str | None = None,
) -> httpx.Request:
    """A request signed once (sending it twice is a replay), for ``signed_target`` if
    given (a request altered on the way)."""
    header = signing.sign(
        gw.key,
        "gw:" + gw.gateway_id,
        method,
        (signed_target or target).encode(),
        body,
        timestamp=int(time.time()),
    )
    headers = {"Authorization": header, "content-type": "application/json"}
    return httpx.Request(method, p.url + target, content=body, headers=headers)


def send(p: SecureProvider, request: httpx.Request) -> httpx.Response:
    """Sends ``request`` to server ``p``, whichever server it was built for (a signature
    covers the method, the target and the body, not the host)."""
    url = httpx.URL(p.url + request.url.raw_path.decode())
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
    }
    with httpx.Client(verify=p.tls, timeout=30) as client:
        return client.send(
            httpx.Request(request.method, url, headers=headers, content=request.content)
        )


def test_lean_poll_authenticates_like_the_framework(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    poll = "/v1/gateway/messages?wait=0"
    first = signed_request(p, gw, "GET", poll)
    r = send(p, first)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["messages"] == [] and doc["server"] == p.url and p.url in doc["servers"]
    # The same request again: a replay.
    r = send(p, first)
    assert r.status_code == 401 and "replayed" in r.json()["message"]
    assert r.headers["www-authenticate"]
    # Signed for another query than sent.
    other = signed_request(p, gw, "GET", poll, signed_target="/v1/gateway/messages?wait=1")
    r = send(p, other)
    assert r.status_code == 401 and "bad signature" in r.json()["message"]
    # Signed by another key under the gateway's id.
    impostor = FakeGateway(gateway_id=gw.gateway_id)
    r = send(p, signed_request(p, impostor, "GET", poll))
    assert r.status_code == 401 and "bad signature" in r.json()["message"]
    # Out of range for the framework: its 422, after the signature was checked.
    r = send(p, signed_request(p, gw, "GET", "/v1/gateway/messages?wait=600"))
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = send(p, signed_request(p, gw, "GET", "/v1/gateway/messages?wait=0&wait=0"))
    assert r.status_code == 200, r.text
    # Replies: a body the framework refuses, and one it takes.
    target = "/v1/gateway/messages/replies"
    r = send(p, signed_request(p, gw, "POST", target, b'{"replies": [{"id": 1}]}'))
    assert r.status_code == 422, r.text
    body = b'{"replies": [{"id": "nope", "status": "succeeded"}]}'
    r = send(p, signed_request(p, gw, "POST", target, body))
    assert r.status_code == 200 and r.json() == {"accepted": [], "refused": ["nope"]}
    # An admin token on the gateway's call, a gateway on the admin's: the framework's
    # 403s.
    r = p.admin().get("/v1/gateway/messages", params={"wait": 0})
    assert r.status_code == 403, r.text
    command = b'{"type": "describe"}'
    r = send(p, signed_request(p, gw, "POST", f"/v1/gateways/{gw.gateway_id}/commands", command))
    assert r.status_code == 403, r.text
    # A token that does not exist.
    r = p.client("sgw_" + "x" * 43).post(
        f"/v1/gateways/{gw.gateway_id}/commands", json={"type": "describe"}
    )
    assert r.status_code == 401
    # The admin's POST: refusals as before.
    r = p.admin().post(f"/v1/gateways/{gw.gateway_id}/commands", json={"type": "nope"})
    assert r.status_code == 422
    silent = activate(p, p.token, "silent")  # never polled
    r = p.admin().post(f"/v1/gateways/{silent.gateway_id}/commands", json={"type": "describe"})
    assert r.status_code == 409 and r.json()["error"] == "gateway_offline"
    # The gateway polled a moment ago: online; the command waits for its next poll.
    r = p.admin().post(f"/v1/gateways/{gw.gateway_id}/commands", json={"type": "describe"})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    r = send(p, signed_request(p, gw, "GET", "/v1/gateway/messages?wait=0"))
    assert [m["type"] for m in r.json()["messages"]] == ["describe"]
    r = p.admin().post(f"/v1/gateways/{uuid.uuid4()}/commands", json={"type": "describe"})
    assert r.status_code == 404


def test_deactivated_gateway_is_refused_by_the_lean_path(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw")
    r = send(p, signed_request(p, gw, "GET", "/v1/gateway/messages?wait=0"))
    assert r.status_code == 200  # its key is cached now
    assert p.admin().post(f"/v1/gateways/{gw.gateway_id}/deactivate").status_code == 200
    r = send(p, signed_request(p, gw, "GET", "/v1/gateway/messages?wait=0"))
    assert r.status_code == 401 and "deactivated" in r.json()["message"]


def test_replays_and_deactivation_across_two_server_processes(
    tmp_path: Path, empty_db_url: str, secure_provider_factory: type[SecureProvider]
) -> None:
    a, b = start_servers(tmp_path, secure_provider_factory, empty_db_url, 2)
    gw = activate(a, a.token, "gw")
    poll = "/v1/gateway/messages?wait=0"
    # A poll accepted by one server is a replay at the other (and at the first): b's own
    # memory never saw the nonce, only the shared table tells it.
    first = signed_request(a, gw, "GET", poll)
    r = send(a, first)
    assert r.status_code == 200 and r.json()["server"] == a.url
    for server in (b, a):
        r = send(server, first)
        assert r.status_code == 401 and "replayed" in r.json()["message"], server.url
    # Requests go to the server they are sent to: b answers one signed for a's address.
    r = send(b, signed_request(a, gw, "GET", poll))
    assert r.status_code == 200 and r.json()["server"] == b.url
    # The other way round, and for replies.
    target = "/v1/gateway/messages/replies"
    reply = signed_request(b, gw, "POST", target, b'{"replies": []}')
    assert send(b, reply).status_code == 200
    r = send(a, reply)
    assert r.status_code == 401 and "replayed" in r.json()["message"]
    # Both servers have the gateway's key cached; deactivated through one, it is refused
    # by the other within the documented bound.
    assert send(b, signed_request(b, gw, "GET", poll)).status_code == 200
    assert a.admin().post(f"/v1/gateways/{gw.gateway_id}/deactivate").status_code == 200
    assert send(a, signed_request(a, gw, "GET", poll)).status_code == 401
    deadline = time.monotonic() + KEY_TRUST_S + 5
    while True:
        r = send(b, signed_request(b, gw, "GET", poll))
        if r.status_code == 401:
            assert "deactivated" in r.json()["message"]
            break
        assert r.status_code == 200
        assert time.monotonic() < deadline, "a deactivated gateway still served"
        time.sleep(0.2)


def test_nonce_groups_refuse_replays_within_and_across_ledgers(empty_db_url: str) -> None:
    """On SQLite (grouped on the event loop's thread) and PostgreSQL (the writer thread's
    INSERT ... RETURNING), the answers are the same."""
    url = empty_db_url
    schema.upgrade(url)
    one, two, three = NonceLedger(url), NonceLedger(url), NonceLedger(url)
    expires = datetime.now(UTC) + timedelta(seconds=signing.CLOCK_SKEW_S)
    nonces = [uuid.uuid4().hex for _ in range(300)]
    # A group mixing nonces written before (by another process) with new ones: each
    # gets its own answer.
    fresh = [uuid.uuid4().hex for _ in range(100)]
    mixed = [n for pair in zip(nonces[:100], fresh, strict=True) for n in pair]

    async def run() -> tuple[
        list[bool], list[bool], list[bool], list[bool], tuple[int, int], tuple[bool, bool, bool]
    ]:
        first = await asyncio.gather(*(one.first_use_async("gw:a", n, expires) for n in nonces))
        # The same nonces: refused from memory by the same ledger, from the database by
        # another (another process).
        again = await asyncio.gather(*(one.first_use_async("gw:a", n, expires) for n in nonces))
        other = await asyncio.gather(*(two.first_use_async("gw:a", n, expires) for n in nonces))
        mix = await asyncio.gather(*(three.first_use_async("gw:a", n, expires) for n in mixed))
        groups = one.groups
        # The new ones of the mixed groups were stored; another key's nonce is its own.
        stored = await one.first_use_async("gw:a", fresh[0], expires)
        seen = await two.first_use_async("gw:a", nonces[0], expires)
        own = await two.first_use_async("gw:b", nonces[0], expires)
        return first, again, other, mix, groups, (stored, seen, own)

    try:
        first, again, other, mix, groups, (stored, seen, own) = asyncio.run(run())
        assert all(first) and not any(again) and not any(other)
        assert mix == [n in fresh for n in mixed]
        assert three.groups[0] < len(mixed)  # the mixed ones were written in groups
        assert not stored  # and the new ones stored
        batches, items = groups
        assert items == len(nonces) and batches < items  # written in groups
        assert not seen
        assert own
    finally:
        one.close()
        two.close()
        three.close()


def test_expired_nonces_leave_the_table_and_live_ones_stay(empty_db_url: str) -> None:
    """Nonces past their expiry are deleted as new ones are written (SQLite: with each
    group; PostgreSQL: a purge at most once a second); unexpired ones are never touched."""
    schema.upgrade(empty_db_url)
    NonceLedger(empty_db_url).close()  # one that never wrote closes cleanly too
    ledger = NonceLedger(empty_db_url)
    engine = schema.make_engine(empty_db_url)
    now = datetime.now(UTC)
    past, soon = now - timedelta(seconds=30), now + timedelta(seconds=signing.CLOCK_SKEW_S)

    def count(prefix: str) -> int:
        with engine.connect() as c:
            query = text("SELECT count(*) FROM request_nonces WHERE nonce LIKE :p")
            return int(c.execute(query, {"p": prefix + "%"}).scalar_one())

    async def use(nonces: list[str], expires: datetime) -> None:
        answers = await asyncio.gather(
            *(ledger.first_use_async("gw:a", n, expires) for n in nonces)
        )
        assert all(answers)

    async def run() -> tuple[int, int]:
        await use([f"old-{n}" for n in range(40)], past)
        await use([f"live-{n}" for n in range(30)], soon)
        # Write on until the first expired rows are gone (each write may purge).
        more = 0
        deadline = time.monotonic() + 30
        while count("old-") and time.monotonic() < deadline:
            await use([f"more-{more}"], past)
            more += 1
            await asyncio.sleep(0.05)
        return count("old-"), count("live-")

    try:
        old, live = asyncio.run(run())
        assert old == 0, "expired nonces stayed in the table"
        assert live == 30, "an unexpired nonce was deleted"
    finally:
        ledger.close()
        engine.dispose()


def test_a_nonce_outlives_the_skew_window_so_no_clock_ahead_frees_a_replay(
    empty_db_url: str,
) -> None:
    """Provider processes share the nonces but not a clock. A process whose clock runs
    ahead deletes expired nonces by its clock while one whose clock runs behind still
    accepts the request's timestamp: a nonce is kept until its timestamp + twice the
    window + a margin, so a replay to the slow process after the old deletion time
    (timestamp + window + 1 s, by the fast clock) is refused; later the nonce goes."""
    url = empty_db_url
    schema.upgrade(url)
    engine = schema.make_engine(url)
    ts = int(time.time())
    # The slow process's clock: the last second at which it accepts ``ts``.
    slow = FakeClock(ts + signing.CLOCK_SKEW_S)
    assert abs(ts - slow()) <= signing.CLOCK_SKEW_S  # the Authenticator's test
    # The fast one's: 30 s ahead, well past the old deletion time.
    fast = FakeClock(ts + signing.CLOCK_SKEW_S + 30)
    first, purger, replay_to = (
        NonceLedger(url, clock=slow),
        NonceLedger(url, clock=fast),
        NonceLedger(url, clock=slow),
    )
    after = FakeClock(ts + nonces.KEEP_S + 1)
    later = NonceLedger(url, clock=after)
    nonce = uuid.uuid4().hex

    def stored(n: str) -> bool:
        with engine.connect() as c:
            query = text("SELECT count(*) FROM request_nonces WHERE nonce = :n")
            return bool(c.execute(query, {"n": n}).scalar_one())

    async def run() -> tuple[bool, bool, bool, bool, bool]:
        accepted = await first.first_use_async("gw:a", nonce, nonces.expiry(ts))
        # Expired by the fast clock, not the slow one: evidence that the fast process
        # deleted what it saw expired.
        stale_expiry = datetime.fromtimestamp(ts + signing.CLOCK_SKEW_S + 10, UTC)
        stale = await first.first_use_async("gw:a", "stale", stale_expiry)
        assert accepted and stale and stored("stale")
        # The fast process writes a nonce of its own, deleting what it sees expired.
        await purger.first_use_async("gw:a", uuid.uuid4().hex, nonces.expiry(int(fast())))
        purged, kept = not stored("stale"), stored(nonce)
        # The replay, to a third process (whose memory never saw it), in time by its clock.
        replayed = await replay_to.first_use_async("gw:a", nonce, nonces.expiry(ts))
        # Once the nonce's time is over, a write deletes it: the table does not grow.
        await later.first_use_async("gw:a", uuid.uuid4().hex, nonces.expiry(int(after())))
        return accepted, purged, kept, replayed, stored(nonce)

    try:
        accepted, purged, kept, replayed, still = asyncio.run(run())
        assert accepted
        assert purged, "the fast process deleted nothing: the moment under test was not reached"
        assert not replayed, "a replay was accepted after its nonce was deleted"
        assert kept, "a nonce within timestamp + 2 x skew was deleted"
        assert not still, "a nonce past timestamp + 2 x skew + margin stayed"
    finally:
        for ledger in (first, purger, replay_to, later):
            ledger.close()
        engine.dispose()
