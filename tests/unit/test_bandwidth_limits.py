"""Bandwidth limits changed at runtime (the console's set_bandwidth): the token bucket
takes the new rate from the moment it is set, a limit can be lifted and set again, and a
download limit throttles chunk reads of the block API client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sgw.gateway.volume.remote import BlockApiClient
from sgw.gateway.volume.upload import TokenBucket
from tests.fixtures.clock import FakeClock

MIB = 1 << 20


def test_set_rate_applies_from_now_on() -> None:
    clock = FakeClock(100.0)
    bucket = TokenBucket(1 * MIB, clock=clock)
    assert bucket.delay_for(MIB) == 0.0  # the first second's burst
    assert bucket.delay_for(MIB) == pytest.approx(1.0)  # in debt: a second at 1 MiB/s
    clock.now += 1.0
    bucket.set_rate(4 * MIB)  # faster: the debt is paid off, new sends at the new rate
    assert bucket.delay_for(4 * MIB) == pytest.approx(1.0)
    bucket.set_rate(None)  # lifted
    assert bucket.delay_for(100 * MIB) == 0.0
    bucket.set_rate(2 * MIB)  # set again: starts with a full second's burst
    assert bucket.delay_for(2 * MIB) == 0.0
    assert bucket.delay_for(2 * MIB) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bucket.set_rate(0)


def test_download_limit_throttles_chunk_reads() -> None:
    async def main() -> None:
        body = b"x" * MIB

        def handler(_request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=body)

        slept: list[float] = []

        async def sleep(delay: float) -> None:
            slept.append(delay)

        clock = FakeClock(100.0)
        bucket = TokenBucket(MIB, clock=clock, sleep=sleep)
        client = BlockApiClient("http://provider.test", transport=httpx.MockTransport(handler))
        client.read_throttle = bucket.acquire
        for _ in range(3):
            assert await client.get_chunk("vol", "a" * 64) == body
        await client.aclose()
        # The first MiB fits the burst; each further one waits a second more.
        assert slept == [pytest.approx(1.0), pytest.approx(2.0)]

    asyncio.run(main())
