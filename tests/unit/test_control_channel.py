"""The gateway's control channel against an in-process provider (an httpx transport):
commands run once however often they are delivered, acknowledgements ride on the next
poll, replies are kept until accepted (also across a restart), a command cut off by a
crash is answered as failed rather than run again, quick failures back off and a
long-poll that simply ends does not."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sgw.common.errors import CommandError
from sgw.gateway.link.channel import BACKOFF_FIRST_S, QUICK_S, ControlChannel, backoff
from sgw.gateway.link.journal import INTERRUPTED, Command, ControlJournal, Reply
from tests.fixtures.clock import FakeClock
from tests.fixtures.provider_sim import URL, ProviderSim


def message(
    i: int,
    *,
    key: str | None = None,
    expires_in: float = 60.0,
    type: str = "describe",
    volume: str | None = None,
) -> dict[str, Any]:
    args: dict[str, Any] = {"n": i} if volume is None else {"n": i, "volume": volume}
    return {
        "id": f"m{i}",
        "type": type,
        "args": args,
        "idempotency_key": key or f"k{i}",
        "created": datetime.now(UTC).isoformat(),
        "expires": (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat(),
        "delivery": 1,
    }


class Recorder:
    """The executor: records what ran; may block or refuse."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.gates: dict[str, asyncio.Event] = {}  # by key: that command waits for it
        self.order: list[str] = []  # keys, as they finished

    async def __call__(self, cmd: Command) -> dict[str, Any]:
        self.ran[cmd.key] += 1
        if self.gate is not None:
            await self.gate.wait()
        if cmd.key in self.gates:
            await self.gates[cmd.key].wait()
        self.order.append(cmd.key)
        if cmd.args.get("refuse"):
            raise CommandError("not today")
        return {"echo": cmd.args}


def channel(
    tmp_path: Path,
    provider: ProviderSim,
    execute: Callable[[Command], Awaitable[dict[str, Any]]],
    sleeps: list[float] | None = None,
    *,
    url: str = URL,
    insecure_http: bool = True,
) -> ControlChannel:
    """A channel to the simulated provider at ``url``; by default a development one over
    plain http to another host, which the gateway allows with remote.insecure_http."""

    async def sleep(delay: float) -> None:
        if sleeps is not None:
            sleeps.append(delay)
        await asyncio.sleep(0)

    return ControlChannel(
        str(tmp_path),
        [url],
        execute,
        insecure_http=insecure_http,
        wait=5.0,
        transport=httpx.MockTransport(provider),
        rng=lambda: 0.0,
        sleep=sleep,
    )


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def test_each_command_runs_once_however_often_delivered(tmp_path: Path) -> None:
    async def main() -> None:
        refused = message(3)
        refused["args"] = {"refuse": True}
        provider = ProviderSim(
            [[message(1), message(2)], [message(1), refused], [message(2), message(1, key="k1")]]
        )
        rec = Recorder()
        ch = channel(tmp_path, provider, rec)
        await ch.start()
        await until(lambda: len(provider.replies) == 3 and provider.polls > 4)
        await ch.stop()
        assert rec.ran == Counter({"k1": 1, "k2": 1, "k3": 1})
        by_id = {r["id"]: r for r in provider.replies}
        assert by_id["m1"] == {"id": "m1", "status": "succeeded", "result": {"echo": {"n": 1}},
                               "error": None}  # fmt: skip
        assert by_id["m3"]["status"] == "failed" and by_id["m3"]["error"] == "not today"
        # Every delivery is acknowledged, with the poll after it.
        assert Counter(provider.acks) == Counter({"m1": 3, "m2": 2, "m3": 1})
        assert ch.stats["duplicates"] == 3
        # The provider named another control server: remembered to fail over to.
        assert ch.urls == [URL, "http://p2.test"]
        journal = tmp_path / "control" / "journal.json"
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        assert not os.listdir(tmp_path / "control" / "outbox")

    asyncio.run(main())


def test_replies_are_kept_until_accepted_also_across_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        provider = ProviderSim([[message(1)]])
        provider.reply_errors = 10**6  # the provider refuses every reply
        rec = Recorder()
        ch = channel(tmp_path, provider, rec)
        await ch.start()
        await until(lambda: ch.journal.unsent == 1 and rec.ran["k1"] == 1)
        await ch.stop()
        assert len(os.listdir(tmp_path / "control" / "outbox")) == 1
        # The restarted gateway sends it; the command is delivered again meanwhile and
        # not run again.
        provider2 = ProviderSim([[message(1)]])
        ch2 = channel(tmp_path, provider2, rec)
        await ch2.start()
        await until(lambda: bool(provider2.replies) and "m1" in provider2.acks)
        await ch2.stop()
        assert rec.ran["k1"] == 1
        assert provider2.replies[0]["status"] == "succeeded"
        assert not os.listdir(tmp_path / "control" / "outbox")

    asyncio.run(main())


def test_a_command_cut_off_is_answered_failed_and_one_not_started_runs(tmp_path: Path) -> None:
    async def main() -> None:
        # Two commands on one volume: the second waits for the first.
        provider = ProviderSim(
            [[message(1, type="snapshot", volume="v"), message(2, type="snapshot", volume="v")]]
        )
        rec = Recorder()
        rec.gate = asyncio.Event()  # m1 starts and never finishes: a crash cuts it off
        ch = channel(tmp_path, provider, rec)
        await ch.start()
        await until(lambda: rec.ran["k1"] == 1)
        await asyncio.sleep(0.1)
        assert rec.ran["k2"] == 0
        tasks = [*ch._tasks, *ch._lane_tasks]
        for task in tasks:  # a crash: nothing gets to finish or clean up
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ch._http.aclose()
        rec2 = Recorder()
        provider2 = ProviderSim([])
        ch2 = channel(tmp_path, provider2, rec2)
        await ch2.start()
        await until(lambda: len(provider2.replies) == 2)
        await ch2.stop()
        assert rec2.ran == Counter({"k2": 1})  # taken before the crash, never started
        by_id = {r["id"]: r for r in provider2.replies}
        assert by_id["m1"]["status"] == "failed" and by_id["m1"]["error"] == INTERRUPTED
        assert by_id["m2"]["status"] == "succeeded"

    asyncio.run(main())


def test_commands_of_one_volume_run_in_order_and_others_beside_them(tmp_path: Path) -> None:
    async def main() -> None:
        provider = ProviderSim(
            [
                [
                    message(1, type="delete_volume", volume="a"),  # a long drain
                    message(2, type="snapshot", volume="a"),
                    message(3, type="snapshot", volume="b"),
                    message(4),  # describe
                    message(5, type="set_bandwidth"),
                    message(6, type="set_bandwidth"),
                ]
            ]
        )
        rec = Recorder()
        rec.gates = {"k1": asyncio.Event(), "k5": asyncio.Event()}
        ch = channel(tmp_path, provider, rec)
        await ch.start()
        # Volume b's snapshot and the describe are answered while a's delete still runs.
        await until(lambda: {"m3", "m4"} <= {r["id"] for r in provider.replies})
        assert rec.ran["k2"] == 0 and rec.ran["k6"] == 0  # behind k1, behind k5
        assert sorted(ch._running) == ["m1", "m5"]
        rec.gates["k5"].set()
        rec.gates["k1"].set()
        await until(lambda: len(provider.replies) == 6)
        await ch.stop()
        assert rec.order.index("k1") < rec.order.index("k2")
        assert rec.order.index("k5") < rec.order.index("k6")
        assert all(r["status"] == "succeeded" for r in provider.replies)

    asyncio.run(main())


def test_a_command_past_its_deadline_is_not_run(tmp_path: Path) -> None:
    async def main() -> None:
        provider = ProviderSim([[message(1, expires_in=-1)]])
        rec = Recorder()
        ch = channel(tmp_path, provider, rec)
        await ch.start()
        await until(lambda: bool(provider.replies))
        await ch.stop()
        assert not rec.ran
        assert provider.replies[0]["status"] == "failed"
        assert "deadline" in provider.replies[0]["error"]

    asyncio.run(main())


def test_quick_failures_back_off_and_a_long_poll_that_ends_does_not(tmp_path: Path) -> None:
    async def main() -> None:
        provider = ProviderSim([])
        provider.poll_errors = 4
        provider.hold = QUICK_S + 0.05  # a long-poll that runs its course
        sleeps: list[float] = []
        ch = channel(tmp_path, provider, Recorder(), sleeps)
        await ch.start()
        await until(lambda: provider.polls >= 6)
        # Four quick errors: waits doubling from the first (random factor 0.5 here).
        assert sleeps[:4] == [BACKOFF_FIRST_S * 0.5 * 2**i for i in range(4)]
        assert ch.stats["errors"] == 4 and ch.connected
        n = len(sleeps)
        # A poll held for longer than QUICK_S and then cut off is no error: the next
        # one goes out at once, without a wait.
        provider.drop_after = QUICK_S + 0.1
        polls = provider.polls
        await until(lambda: provider.polls >= polls + 3, timeout=10)
        await ch.stop()
        assert ch.stats["errors"] == 4
        assert len(sleeps) == n
        # An empty answer long before the wait ran out counts as an error.
        provider3 = ProviderSim([])
        provider3.hold = 0.0
        sleeps3: list[float] = []
        ch3 = channel(tmp_path / "other", provider3, Recorder(), sleeps3)
        await ch3.start()
        await until(lambda: len(sleeps3) >= 3)
        await ch3.stop()
        assert sleeps3[:3] == [BACKOFF_FIRST_S * 0.5 * 2**i for i in range(3)]

    asyncio.run(main())


REFUSED_EVERYWHERE = [
    "ftp://p3.test",  # not http(s)
    "p4.test:8480",  # no scheme
    "https://p5.test/?next=x",  # not a base URL
    "https://user@p6.test",
    "https://p7.test:99999",  # no such port
    "https://",  # no host
]


def test_advertised_servers_never_downgrade_an_https_provider(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        provider = ProviderSim([])
        provider.servers = [
            "https://provider.test",
            "https://p2.test:8480/",
            "http://p2.test:8480",  # a downgrade: refused even with insecure_http
            "http://127.0.0.1:8480",  # a downgrade, also to loopback
            *REFUSED_EVERYWHERE,
        ]
        ch = channel(tmp_path, provider, Recorder(), url="https://provider.test")
        await ch.start()
        await until(lambda: provider.polls >= 3)
        await ch.stop()
        assert ch.urls == ["https://provider.test", "https://p2.test:8480"]
        warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
        # Each refused server is warned about once, however many answers named it.
        assert len(warned) == len(provider.servers) - 2
        assert "control server http://p2.test:8480 ignored: plain http where the provider " in (
            "\n".join(warned)
        )
        assert any("ftp://p3.test ignored: scheme 'ftp'" in w for w in warned)

    caplog.set_level("WARNING", logger="sgw.gateway.link.channel")
    asyncio.run(main())


@pytest.mark.parametrize("insecure_http", [False, True])
def test_advertised_plain_http_follows_the_remote_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, insecure_http: bool
) -> None:
    async def main() -> None:
        provider = ProviderSim([])
        provider.servers = [
            "http://127.0.0.1:8480",
            "http://[::1]:8481",
            "http://localhost:8482",
            "https://p2.test",
            "http://p3.test",  # beyond loopback: only with insecure_http
            *REFUSED_EVERYWHERE,
        ]
        ch = channel(
            tmp_path, provider, Recorder(), url="http://127.0.0.1:8480", insecure_http=insecure_http
        )
        await ch.start()
        await until(lambda: provider.polls >= 2)
        await ch.stop()
        adopted = ["http://127.0.0.1:8480", "http://[::1]:8481", "http://localhost:8482"]
        adopted += ["https://p2.test", *(["http://p3.test"] if insecure_http else [])]
        assert ch.urls == adopted
        warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
        assert len(warned) == len(REFUSED_EVERYWHERE) + (0 if insecure_http else 1)
        assert insecure_http or any(
            "http://p3.test ignored: plain http to another machine" in w for w in warned
        )

    caplog.set_level("WARNING", logger="sgw.gateway.link.channel")
    asyncio.run(main())


def test_backoff_is_jittered_exponential_and_capped() -> None:
    assert backoff(1, lambda: 0.0) == BACKOFF_FIRST_S * 0.5
    assert backoff(1, lambda: 1.0) == BACKOFF_FIRST_S
    assert backoff(3, lambda: 1.0) == BACKOFF_FIRST_S * 4
    assert backoff(100, lambda: 1.0) == 30.0
    waits = {backoff(4) for _ in range(50)}
    assert len(waits) > 40 and all(BACKOFF_FIRST_S * 4 <= w < BACKOFF_FIRST_S * 8 for w in waits)


def test_journal_forgets_old_keys_but_keeps_recent_ones(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    journal = ControlJournal(str(tmp_path), clock=clock)
    journal.load()

    async def main() -> None:
        old = Command("a", "describe", {}, "ka", clock.now + 60)
        await journal.admit([old])
        await journal.finish(old, Reply("a", "succeeded", {}))
        clock.now += 8 * 86400  # past KEEP_S
        new = Command("b", "describe", {}, "kb", clock.now + 60)
        await journal.admit([new])
        await journal.finish(new, Reply("b", "succeeded", {}))

    asyncio.run(main())
    again = ControlJournal(str(tmp_path))
    again.load()
    assert again.state("ka") is None and again.state("kb") == "done"
    assert [r.id for r in again.outbox()] == ["a", "b"]


@pytest.mark.parametrize("bad", [b"{not json", b"[]"])
def test_a_damaged_journal_is_replaced_not_fatal(tmp_path: Path, bad: bytes) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "journal.json").write_bytes(bad)
    journal = ControlJournal(str(tmp_path))
    assert journal.load() == ([], [])
