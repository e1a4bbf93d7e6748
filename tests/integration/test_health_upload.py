"""The health reporter's upload against a real HTTP server implementing the provider's
contract (tests/fixtures/health_receiver.py): batches, ``accepted_through``, retries while
the provider refuses or is away, a lost answer resent without harm, and nothing sent
again once accepted.

The same against a real ``sgw provider serve`` with a real daemon: test_health.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sgw.gateway.health.buffer import ReportBuffer
from sgw.gateway.health.events import EventDetector
from sgw.gateway.health.metrics import Baseline, Sample
from sgw.gateway.health.reporter import HealthReporter, HealthUploadError
from tests.fixtures.health_receiver import HealthReceiver, ReceiverServer


class FixedSampler:
    """A sampler of fixed metrics: the reporter's logic is under test here, the metrics
    themselves in test_health.py (a real daemon)."""

    def __init__(self) -> None:
        self.samples = 0

    def sample(self, baseline: Baseline) -> Sample:
        self.samples += 1
        return Sample(
            {"log_used_percent": 1.0, "uptime_seconds": float(self.samples)},
            {"vol0": {"size_bytes": 1 << 30}},
            {},
        )

    def tick(self) -> None:
        pass


def _reporter(
    tmp_path, url: str, detector: EventDetector | None = None, ready: asyncio.Event | None = None
) -> HealthReporter:
    return HealthReporter(
        FixedSampler(),  # type: ignore[arg-type]
        detector or EventDetector(),
        ReportBuffer(str(tmp_path)),
        interval=3600,
        labels={"version": "1.2.3", "kernel": "6.1", "hypervisor": "QEMU"},
        client=lambda: httpx.AsyncClient(base_url=url, timeout=5),
        remote=True,
        ready=ready,
    )


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.05)


@pytest.fixture
def receiver():
    rec = HealthReceiver(clock_offset=-30.0)  # the provider's clock 30 s behind
    server = ReceiverServer(rec).start()
    yield rec, server
    server.stop()


def test_reports_go_up_once_and_are_forgotten(tmp_path, receiver):
    rec, server = receiver

    async def run() -> None:
        rep = _reporter(tmp_path, server.url)
        try:
            for _ in range(3):
                await rep.sample()
            assert await rep.upload() == 3
            assert await rep.upload() == 0  # nothing left: nothing sent
            report = await rep.report_now()
            assert report.seq == 3
        finally:
            await rep.stop()

    asyncio.run(run())
    assert rec.arrived == [0, 1, 2, 3]
    assert rec.stored[3]["version"] == "1.2.3"
    assert ReportBuffer(str(tmp_path)).seqs() == []


def test_nothing_is_sent_before_activation(tmp_path, receiver):
    rec, server = receiver

    async def run() -> None:
        activated = asyncio.Event()
        rep = _reporter(tmp_path, server.url, ready=activated)
        try:
            await rep.report_now()
            assert await rep.upload() == 0
            assert len(rep.buffer) == 1  # kept on disk meanwhile
            await rep.start()  # its loop waits for activation, then sends at once
            activated.set()
            await asyncio.wait_for(_until(lambda: len(rep.buffer) == 0), 30)
        finally:
            await rep.stop()

    asyncio.run(run())
    assert rec.arrived == [0, 1]  # the one before, and the one its loop took at start


def test_refused_then_accepted_and_a_lost_answer_resent_harmlessly(tmp_path, receiver):
    rec, server = receiver

    async def run() -> None:
        rep = _reporter(tmp_path, server.url)
        try:
            await rep.sample()
            rec.refuse = 1
            with pytest.raises(HealthUploadError, match="503"):
                await rep.upload()
            assert rep.buffer.seqs() == [0]
            rec.lose_answer = 1  # stored at the provider, the answer lost
            with pytest.raises(HealthUploadError, match="500"):
                await rep.upload()
            await rep.sample()
            assert await rep.upload() == 2
        finally:
            await rep.stop()

    asyncio.run(run())
    # seq 0 went up twice (its answer was lost) and was stored once; 1 went up once.
    assert rec.arrived == [0, 0, 1]
    assert sorted(rec.stored) == [0, 1]


def test_provider_away_reports_wait_on_disk_across_a_restart(tmp_path, receiver):
    rec, server = receiver
    server.stop()

    async def away() -> None:
        rep = _reporter(tmp_path, server.url)
        try:
            await rep.sample()
            await rep.report_now()  # the upload fails; the report stays
            with pytest.raises(HealthUploadError, match="cannot reach the provider"):
                await rep.upload()
        finally:
            await rep.stop()

    asyncio.run(away())
    assert ReportBuffer(str(tmp_path)).seqs() == [0, 1]
    server.start()

    async def back() -> None:
        rep = _reporter(tmp_path, server.url)
        try:
            report = await rep.report_now()
            assert report.seq == 2
        finally:
            await rep.stop()

    asyncio.run(back())
    assert rec.arrived == [0, 1, 2]


def test_clock_skew_measured_from_the_providers_date(tmp_path, receiver):
    _rec, server = receiver
    det = EventDetector()

    async def run() -> None:
        rep = _reporter(tmp_path, server.url, det)
        try:
            await rep.report_now()
            assert det.clock_skew is not None and 28 <= det.clock_skew <= 32
            second = await rep.report_now()
            assert [e.kind for e in second.events] == ["clock_skew"]
            assert second.gateway  # the sample's metrics went with it
        finally:
            await rep.stop()

    asyncio.run(run())


def test_a_refused_batch_is_dropped_not_retried_forever(tmp_path, receiver):
    rec, server = receiver

    async def run() -> None:
        rep = _reporter(tmp_path, server.url)
        try:
            seq = rep.buffer.take_seq()
            rep.buffer.append(seq, {"seq": seq, "at": "not a time"})  # the provider's 400
            report = await rep.sample()
            assert await rep.upload() == 0  # the bad batch went, dropped, nothing accepted
            assert rep.buffer.dropped == 2 and len(rep.buffer) == 0
            await rep.sample()
            assert await rep.upload() == 1
            assert report.seq == 1
        finally:
            await rep.stop()

    asyncio.run(run())
    assert sorted(rec.stored) == [2]
