"""Several control servers (separate `sgw provider serve` processes sharing one
PostgreSQL database) and gateways spread over them: a command given to any server
reaches its gateway through the server that holds it; when one server is killed (-9)
its gateways reconnect to the others and no command is lost or run twice.

The gateways are nine lightweight ones (the gateway's own ``ControlChannel``, each with
its identity, journal and data directory, in this process) and one real
`sgw gateway serve`.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sgw.gateway.link.channel import ControlChannel
from sgw.gateway.link.journal import Command
from sgw.provider.control import peers
from sgw.provider.control.peers import DOORBELL_PATH
from tests.fixtures.daemons import SGW, GatewayProcess
from tests.fixtures.management import (
    FakeGateway,
    SecureProvider,
    activate,
    cli_json,
    code_of,
    online,
    start_servers,
)

SIMULATED = 9
TERMINAL = ("succeeded", "failed", "expired")


class Fleet:
    """Simulated gateways: real control channels on an event loop in a thread; each
    records the idempotency keys it executed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channels: dict[str, ControlChannel] = {}
        self.ran: Counter[str] = Counter()

    def add(self, gateway: FakeGateway, data_dir: Path, url: str, tls: ssl.SSLContext) -> None:
        gid = gateway.gateway_id

        async def execute(cmd: Command) -> dict[str, Any]:
            self.ran[cmd.key] += 1
            await asyncio.sleep(random.uniform(0, 0.05))
            return {"gateway": gid, "n": cmd.args.get("n")}

        async def start() -> None:
            channel = ControlChannel(
                str(data_dir), [url], execute, auth=gateway.auth(), verify=tls, wait=10.0
            )
            await channel.start()
            self.channels[gid] = channel

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        async def stop_all() -> None:
            await asyncio.gather(*(c.stop(grace=1.0) for c in self.channels.values()))

        asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()  # its self-pipe sockets, else a ResourceWarning in a later test


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.stop()


def server_stats(server: SecureProvider) -> dict[str, int]:
    doc = server.admin().get("/v1/control/server").json()
    return {**doc["stats"], "held": doc["held"]}


def holder(server: SecureProvider, gid: str) -> str | None:
    conn = server.admin().get(f"/v1/gateways/{gid}/connection").json()
    return str(conn["server_url"]) if conn["online"] else None


def post(server: SecureProvider, gid: str) -> tuple[str, str]:
    """Posts a command through ``server``; (command id, idempotency key)."""
    key = str(uuid.uuid4())
    body = {"type": "describe", "args": {}, "idempotency_key": key}
    r = server.admin().post(f"/v1/gateways/{gid}/commands", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"]), key


def finished(server: SecureProvider, gid: str, cid: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with httpx.Client(
        base_url=server.url,
        verify=server.tls,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=30,
    ) as client:
        while True:
            doc: dict[str, Any] = client.get(
                f"/v1/gateways/{gid}/commands/{cid}", params={"wait": 10}
            ).json()
            if doc["status"] in TERMINAL or time.monotonic() > deadline:
                return doc


def test_three_servers_route_commands_and_survive_losing_one(
    tmp_path: Path,
    postgres_url: str,
    secure_provider_factory: type[SecureProvider],
    gateway_factory: type[GatewayProcess],
    fleet: Fleet,
) -> None:
    a, b, c = start_servers(tmp_path, secure_provider_factory, postgres_url, 3)
    servers = [a, b, c]
    secret_file = a.data_dir / "control.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # Doorbells are for the provider's own servers: unsigned or signed with another
    # secret, refused.
    body = json.dumps({"gateways": [], "messages": []}).encode()
    for header in (None, peers.sign(b"\x01" * 32, "intruder", "POST", DOORBELL_PATH, body)):
        headers = {} if header is None else {peers.HEADER: header}
        r = httpx.post(a.url + DOORBELL_PATH, content=body, headers=headers, verify=a.tls)
        assert r.status_code == 401, r.text
    good = peers.sign(bytes.fromhex(secret_file.read_text()), "b", "POST", DOORBELL_PATH, body)
    r = httpx.post(a.url + DOORBELL_PATH, content=body, headers={peers.HEADER: good}, verify=a.tls)
    assert r.status_code == 200 and r.json()["held"] == []
    sims = []
    for i in range(SIMULATED):
        gw = activate(a, a.token, f"sim-{i}")
        fleet.add(gw, tmp_path / f"sim-{i}", servers[i % 3].url, a.tls)
        sims.append(gw.gateway_id)
    # A real gateway whose provider is server b.
    conf = tmp_path / "real.toml"
    conf.write_text(
        f'[remote]\nurl = "{b.url}"\nca = "{b.ca}"\n[activation]\npoll_interval = 0.2\n'
        "[control]\nwait = 10\n"
    )
    real = gateway_factory(tmp_path / "real", ["local0:16M"], extra_args=["--config", str(conf)])
    real.start()
    key = subprocess.run(
        [SGW, "gateway", "activation-key", "--data-dir", str(real.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    real_id = str(cli_json(a, "activate", key, "--name", "real", "--code", code_of(real))["id"])
    gateways = [*sims, real_id]

    deadline = time.monotonic() + 30
    while not all(online(a, g) for g in gateways):
        assert time.monotonic() < deadline, "gateways did not connect"
        time.sleep(0.2)
    holders = {g: holder(a, g) for g in gateways}
    assert set(holders.values()) == {a.url, b.url, c.url}, holders
    assert holders[real_id] == b.url

    # Through every server, to every gateway: forwarded to the holder when it is another.
    posted: list[tuple[SecureProvider, str, str, str]] = []
    for g in gateways:
        for s in servers:
            cid, k = post(s, g)
            posted.append((s, g, cid, k))
    for s, g, cid, _k in posted:
        doc = finished(s, g, cid, timeout=30)
        assert doc["status"] == "succeeded", doc
    # Each server rang the holder's doorbell for the gateways it does not hold.
    for s in servers:
        stats = server_stats(s)
        assert stats["doorbells_sent"] >= len(gateways) - stats["held"], stats
    # A real gateway's volume, created through a server that does not hold it.
    made = cli_json(c, "volumes", "create", "vol1", "16M", "--gateway", real_id, "--mode",
                    "stored")  # fmt: skip
    assert made["gateway_id"] == real_id and made["status"] == "AVAILABLE"

    # Lose server b (kill -9) while commands flow through all of them.
    on_b = [g for g, h in holders.items() if h == b.url]
    assert on_b
    burst: list[tuple[SecureProvider, str, str, str]] = []

    def send(round_: int) -> None:
        for g in [*sims, real_id]:
            s = random.choice([a, c] if round_ else servers)
            try:
                cid, k = post(s, g)
            except (httpx.HTTPError, AssertionError):
                continue  # b died under this post: nothing was stored, or it was
            burst.append((s, g, cid, k))

    send(0)
    with ThreadPoolExecutor(2) as pool:
        later = pool.submit(lambda: [send(r) for r in range(1, 4)])
        b.proc.kill()  # type: ignore[union-attr]
        b.proc.wait(10)  # type: ignore[union-attr]
        later.result(60)
    after_kill = [x for x in burst if x[0] is not b]
    assert len(after_kill) >= 3 * len(gateways)
    for s, g, cid, _k in burst:
        survivor = a if s is b else s
        doc = finished(survivor, g, cid, timeout=60)
        assert doc["status"] == "succeeded", doc

    # The gateways b held are held by a and c now.
    deadline = time.monotonic() + 30
    while any(holder(a, g) not in (a.url, c.url) for g in on_b):
        assert time.monotonic() < deadline, {g: holder(a, g) for g in on_b}
        time.sleep(0.2)

    # No command lost, none run twice: every key of the simulated gateways ran once.
    keys = [k for _s, g, _c, k in posted + burst if g in sims]
    assert Counter(fleet.ran[k] for k in keys) == Counter({1: len(keys)})
    assert set(fleet.ran) == set(keys)
    # The real gateway ran its commands once too (its journal says so), and still works.
    journal = json.loads((real.data_dir / "control" / "journal.json").read_text())["keys"]
    real_keys = [k for _s, g, _c, k in posted + burst if g == real_id]
    assert all(journal[k]["state"] == "done" for k in real_keys)
    state = cli_json(c, "gateways", "local-state", real_id)
    assert {v["name"] for v in state["volumes"]} == {"local0", "vol1"}
    assert real.stop() == 0
