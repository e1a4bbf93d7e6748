"""Faults between the gateway and the provider: a real gateway uploads to a real provider
through a fault-injecting proxy (``tests.fixtures.faultproxy``) that answers 500/503
itself, delays, drops connections in the middle of requests and of responses (after the
provider acted: lost replies) and black-holes requests for a while; the provider and the
gateway are also killed with SIGKILL in the middle of uploads. Every time, once the path
is healthy again, the provider's map must equal the volume (read back over HTTP) and the
gateway must still serve every acknowledged (flushed) write.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nbd
import pytest

from tests.fixtures.daemons import SMALL_LOG, GatewayProcess, ProviderProcess, remote_id
from tests.fixtures.faultproxy import Fault, FaultProxy
from tests.fixtures.gateway_uploads import (
    VOL_SIZE,
    assert_clean_log,
    full_log,
    gateway_args,
    read_all,
    wait_remote_equal,
    write_for,
    write_round,
)

MIB = 1 << 20
# (fault, probability, seconds) phases the proxy cycles through while the gateway writes.
# Delays first: a phase right after heavy faults may see no request at all (the uploader
# is backing off), and every kind of fault must be met at least once.
PHASES: list[tuple[Fault, float, float]] = [
    (Fault.DELAY, 0.5, 1.5),
    (Fault.ERROR_503, 0.5, 1.0),
    (Fault.NONE, 1.0, 0.5),
    (Fault.DROP_RESPONSE, 0.4, 1.5),
    (Fault.ERROR_500, 0.4, 1.0),
    (Fault.DROP_REQUEST, 0.4, 1.0),
    (Fault.NONE, 1.0, 0.5),
    (Fault.BLACKHOLE, 1.0, 1.5),
    (Fault.ERROR_503, 1.0, 0.7),
    (Fault.DROP_RESPONSE, 1.0, 0.7),
]


@pytest.fixture
def proxy_for() -> Iterator[Callable[[int], FaultProxy]]:
    started: list[FaultProxy] = []

    def make(upstream_port: int) -> FaultProxy:
        p = FaultProxy(upstream_port, seed=len(started)).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


class Cycler(threading.Thread):
    """Cycles the proxy through PHASES until stopped, then heals it. A phase lasts its
    seconds and, for a fault, until a request met it (at most 4 s more: the uploader may
    be backing off); ``cycled`` is set after the first full pass."""

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.done = threading.Event()
        self.cycled = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for fault, probability, seconds in PHASES:
                before = self.proxy.counts.get(fault.value, 0)
                self.proxy.set(fault, probability=probability, delay=0.4, seconds=seconds)
                if self.done.wait(seconds):
                    break
                extra = time.monotonic() + 4.0
                while (
                    fault is not Fault.NONE
                    and self.proxy.counts.get(fault.value, 0) == before
                    and time.monotonic() < extra
                ):
                    if fault is Fault.BLACKHOLE:  # a new window: the last one has closed
                        self.proxy.set(fault, probability=probability, seconds=0.5)
                    if self.done.wait(0.5):
                        break
            else:
                self.cycled.set()
        self.proxy.heal()

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        assert not self.is_alive()


@pytest.mark.timeout(75, method="thread")
def test_uploads_through_a_faulty_network_converge(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], FaultProxy],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    proxy = proxy_for(provider.port)
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG,
        extra_args=gateway_args(tmp_path, proxy.url),
    ).start()  # fmt: skip
    rng = random.Random(11)
    model = bytearray(VOL_SIZE)
    cycler = Cycler(proxy)
    cycler.start()
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    rounds = write_for(h, rng, model, 12)
    while not cycler.cycled.is_set() and rounds < 250:  # every fault met at least once
        rounds += write_for(h, rng, model, 1)
    h.shutdown()
    cycler.stop()
    took = wait_remote_equal(gw, provider.url, bytes(model))
    assert read_all(gw) == model
    print(f"{rounds} write rounds; faults {proxy.counts}; converged {took:.1f} s after healing")
    for fault in ("503", "500", "drop-response", "drop-request", "blackhole", "delay"):
        assert proxy.counts.get(fault, 0) > 0, f"no request got {fault}: {proxy.counts}"
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(45, method="thread")
def test_provider_killed_during_uploads_then_restarted_converges(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG,
        extra_args=gateway_args(tmp_path, provider.url),
    ).start()  # fmt: skip
    rng = random.Random(12)
    model = bytearray(VOL_SIZE)
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    for _ in range(3):
        write_for(h, rng, model, rng.uniform(1.0, 2.0))
        provider.kill()  # kill -9 with uploads in flight
        write_round(h, rng, model, 4)  # the gateway keeps taking writes meanwhile
        provider.start()  # same data directory, same port
    write_round(h, rng, model, 4)
    h.shutdown()
    took = wait_remote_equal(gw, provider.url, bytes(model))
    assert read_all(gw) == model
    print(f"converged {took:.1f} s after the last restart")
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_gateway_killed_during_faulty_uploads_then_restarted_converges(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], FaultProxy],
) -> None:
    provider = provider_factory(tmp_path / "provider").start()
    proxy = proxy_for(provider.port)
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG,
        extra_args=gateway_args(tmp_path, proxy.url),
    )  # fmt: skip
    rng = random.Random(13)
    model = bytearray(VOL_SIZE)
    cycler = Cycler(proxy)
    cycler.start()
    for rnd in range(3):
        gw.start()
        assert read_all(gw) == model, f"round {rnd}: flushed data lost"
        h = nbd.NBD()
        h.connect_uri(gw.uri())
        write_for(h, rng, model, rng.uniform(1.5, 3.0))
        h.shutdown()
        gw.kill()  # kill -9 in the middle of faulty uploads
    cycler.stop()
    gw.start()
    assert read_all(gw) == model
    took = wait_remote_equal(gw, provider.url, bytes(model))
    print(f"faults {proxy.counts}; converged {took:.1f} s after healing")
    # Bound once, and the binding kept across the kills.
    assert full_log(gw).count("remote volume created") == 1, gw.log_text()
    assert_clean_log(gw)
    assert gw.stop() == 0


@pytest.mark.timeout(60, method="thread")
def test_lost_reply_to_volume_creation_makes_one_volume(
    tmp_path: Path,
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
    proxy_for: Callable[[int], FaultProxy],
) -> None:
    """The provider creates the volume but the reply is lost (and the gateway is killed
    before it could retry): after the restart the same volume is bound, none is left
    orphaned and none is refused as a duplicate name."""
    provider = provider_factory(tmp_path / "provider").start()
    proxy = proxy_for(provider.port)
    proxy.set(Fault.DROP_RESPONSE)
    gw = gateway_factory(
        tmp_path / "gw", [f"vol0:{VOL_SIZE}"], log_size=SMALL_LOG,
        extra_args=gateway_args(tmp_path, proxy.url),
    ).start()  # fmt: skip
    model = bytearray(VOL_SIZE)
    model[:MIB] = random.Random(13).randbytes(MIB)
    h = nbd.NBD()
    h.connect_uri(gw.uri())
    h.pwrite(bytes(model[:MIB]), 0)
    h.flush()
    h.shutdown()
    deadline = time.monotonic() + 20
    while proxy.counts.get("drop-response", 0) == 0:
        assert time.monotonic() < deadline, gw.log_text()
        time.sleep(0.05)
    gw.kill()
    proxy.heal()
    gw.start()
    wait_remote_equal(gw, proxy.url, bytes(model))
    with httpx.Client(base_url=provider.url, timeout=10) as http:
        volumes = http.get("/v1/volumes").raise_for_status().json()
    assert [v["name"] for v in volumes] == ["vol0"], volumes
    assert volumes[0]["id"] == remote_id(gw)
    assert gw.stop() == 0
