"""A command posted to the server that holds its gateway's waiting poll is handed to the
poll without the database being read back: it is answered at once, its delivery is
recorded afterwards, and a hand-over that cannot be delivered (the poll went, or a
doorbell rang meanwhile) loses nothing: the next poll finds the message in the database.
Real ``ControlStore`` on SQLite, a real ``ControlHub`` on an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgw.provider.control.hub import ControlHub
from sgw.provider.control.store import ControlStore, NewMessage
from tests.fixtures.control_db import control_db, with_hub

ACCOUNT = "acct-1"
GATEWAYS = ["gw-1", "gw-2"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ControlStore]:
    store = ControlStore(control_db(tmp_path, ACCOUNT, GATEWAYS))
    yield store
    store.close()


async def waiting(hub: ControlHub, gateway_id: str) -> None:
    """Until the gateway's poll is held and waits (its first look done)."""
    for _ in range(500):
        poll = hub._held.get(gateway_id)
        if poll is not None and poll.future is not None and not poll.future.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the poll never waited")


def test_a_posted_command_is_handed_to_the_waiting_poll_and_recorded(
    store: ControlStore,
) -> None:
    async def run(hub: ControlHub) -> None:
        polling = asyncio.create_task(hub.poll("gw-1", 10.0))
        await waiting(hub, "gw-1")
        looks = hub._takes.items
        info, created = await hub.post(ACCOUNT, "gw-1", "describe", {"n": 1}, ttl_s=60)
        assert created
        got = await asyncio.wait_for(polling, 5)
        assert [m.id for m in got] == [info.id]
        assert got[0].deliveries == 1 and got[0].status == "delivered"
        assert hub._takes.items == looks, "the poll read the database back"
        # The delivery is recorded after the answer.
        for _ in range(200):
            if store.get(ACCOUNT, "gw-1", info.id).status == "delivered":
                break
            await asyncio.sleep(0.01)
        row = store.get(ACCOUNT, "gw-1", info.id)
        assert row.status == "delivered" and row.deliveries == 1
        # The next poll acknowledges it; nothing is delivered twice.
        again = asyncio.create_task(hub.poll("gw-1", 0.3, ack=[info.id]))
        assert await asyncio.wait_for(again, 5) == []
        assert store.get(ACCOUNT, "gw-1", info.id).status == "acknowledged"

    with_hub(store, run)


def test_a_hand_over_the_poll_cannot_deliver_is_found_by_the_next_poll(
    store: ControlStore,
) -> None:
    async def run(hub: ControlHub) -> None:
        # A newer poll of the gateway (it reconnected) supersedes the poll in the
        # loop turn of the hand-over: the newer poll gets the message.
        first = asyncio.create_task(hub.poll("gw-1", 10.0))
        await waiting(hub, "gw-1")
        info, _ = await hub._posts.submit(_new("gw-1", hub.server_id))
        second = asyncio.create_task(hub.poll("gw-1", 10.0))  # runs before `first`
        assert hub._hand_over(info)
        first_got = await asyncio.wait_for(first, 5)
        second_got = await asyncio.wait_for(second, 5)
        assert first_got == [] and [m.id for m in second_got] == [info.id]

        # A doorbell rings while a message is handed over: the poll looks in the
        # database and delivers each message once.
        other = asyncio.create_task(hub.poll("gw-2", 10.0))
        await waiting(hub, "gw-2")
        queued, _ = await hub._posts.submit(_new("gw-2", hub.server_id))
        handed, _ = await hub._posts.submit(_new("gw-2", hub.server_id))
        assert hub._hand_over(handed)
        hub.ring_local(["gw-2"])
        got = await asyncio.wait_for(other, 5)
        assert sorted(m.id for m in got) == sorted([queued.id, handed.id])

    with_hub(store, run)


def test_a_hand_over_to_a_poll_whose_connection_went_stays_pending(
    store: ControlStore,
) -> None:
    async def run(hub: ControlHub) -> None:
        polling = asyncio.create_task(hub.poll("gw-1", 10.0))
        await waiting(hub, "gw-1")
        info, _ = await hub._posts.submit(_new("gw-1", hub.server_id))
        poll = hub._held["gw-1"]
        assert hub._hand_over(info)
        poll.gone = True  # its connection closed before the answer went out
        poll.ring()
        assert await asyncio.wait_for(polling, 5) == []
        assert store.get(ACCOUNT, "gw-1", info.id).status == "queued"
        # The gateway's next poll (here) reads the database and gets it.
        got = await asyncio.wait_for(hub.poll("gw-1", 5.0), 5)
        assert [m.id for m in got] == [info.id]

    with_hub(store, run)


def _new(gateway_id: str, server_id: str) -> NewMessage:
    return NewMessage(ACCOUNT, gateway_id, "describe", {}, None, 60.0, server_id)
