"""The health reporter: every ``[health] interval`` a ``HealthReport`` (metrics and the
events since the previous one) into the on-disk buffer, then up to the provider.

Uploads go over the gateway's own signed connection (an httpx client with its
``GatewayAuth``, as the control channel and the update agent make theirs) to
``sgw.common.health.HEALTH_PATH`` in batches of at most ``MAX_REPORTS_PER_BATCH``; the
provider's ``accepted_through`` says what to forget. While the provider is unreachable
the reports wait on disk and the upload is retried with a jittered, doubling backoff; the
provider stores each ``(gateway, seq)`` once, so a batch sent again after a lost answer
changes nothing there, and a report it acknowledged is never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from sgw.common.backoff import jittered
from sgw.common.health import HEALTH_PATH, MAX_REPORTS_PER_BATCH, HealthReport
from sgw.gateway.health.buffer import ReportBuffer
from sgw.gateway.health.events import EventDetector
from sgw.gateway.health.metrics import TICK_S, Baseline, Sampler

LOG = logging.getLogger(__name__)

# Upload retries after errors (seconds): doubling from the first to the cap (never more
# than the interval), times a random factor in [0.5, 1).
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 300.0


class HealthUploadError(Exception):
    """The provider did not take a batch (unreachable, or an error status)."""


class HealthRefusedError(HealthUploadError):
    """The provider refused a batch as malformed (400): sending it again cannot help."""


class HealthReporter:
    """Samples, buffers and uploads; ``report_now`` does all three at once."""

    def __init__(
        self,
        sampler: Sampler,
        detector: EventDetector,
        buffer: ReportBuffer,
        *,
        interval: float,
        labels: dict[str, str],
        client: Callable[[], httpx.AsyncClient] | None,
        remote: bool,
        ready: asyncio.Event | None = None,
    ) -> None:
        """``client``: makes the signed client to the provider (base URL set); None: no
        provider, reports stay on disk (bounded). ``ready``: set once the gateway is
        activated; before that nothing is sent (the provider would refuse an unsigned
        upload) and the reports wait on disk."""
        self.sampler = sampler
        self.detector = detector
        self.buffer = buffer
        self.interval = interval
        self.labels = labels
        self._make_client = client
        self._ready = ready
        self._http: httpx.AsyncClient | None = None
        self.remote = remote
        self._baseline = Baseline()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._report_soon = False
        self.failures = 0
        self.last_error = ""
        self.uploaded = 0  # reports the provider accepted since start

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._tick_loop(), name="health-tick"),
            loop.create_task(self._run(), name="health-report"),
        ]
        if self._ready is not None and not self._ready.is_set():
            self._tasks.append(loop.create_task(self._upload_once_ready(), name="health-ready"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- reports ----------------------------------------------------------------------

    async def sample(self) -> HealthReport:
        """Samples now into a report and appends it to the buffer (durably)."""
        async with self._lock:
            s = self.sampler.sample(self._baseline)
            self.detector.observe(s.gateway, s.volumes, remote=self.remote)
            seq = await asyncio.to_thread(self.buffer.take_seq)
            report = HealthReport(
                seq=seq,
                at=datetime.now(UTC),
                gateway=s.gateway,
                volumes=s.volumes,
                events=self.detector.take(),
                **self.labels,
            )
            await asyncio.to_thread(self.buffer.append, seq, report.to_json())
            return report

    async def report_now(self) -> HealthReport:
        """A fresh report, uploaded at once with whatever waits (the upload's failure is
        logged and retried later; the report is in the buffer either way)."""
        report = await self.sample()
        if self.can_send():
            try:
                await self.upload()
            except HealthUploadError as exc:
                LOG.warning("health report not uploaded yet: %s", exc)
                self._kick.set()
        return report

    def report_soon(self) -> None:
        """Samples the next report now instead of at the interval (an event worth telling
        at once: a swap done or failed)."""
        self._report_soon = True
        self._kick.set()

    async def upload(self) -> int:
        """Sends every buffered report, batch by batch; returns how many were accepted.
        HealthUploadError if the provider did not take one."""
        if not self.can_send():
            return 0
        accepted = 0
        async with self._lock:
            while len(self.buffer):
                batch = self.buffer.pending(MAX_REPORTS_PER_BATCH)
                try:
                    through = await self._send(batch)
                except HealthRefusedError as exc:
                    # Kept, it would block every later report for good: dropped, loudly.
                    last = int(str(batch[-1]["seq"]))
                    await asyncio.to_thread(self.buffer.drop_through, last)
                    LOG.error(
                        "health reports refused by the provider, dropped: %s",
                        exc,
                        extra={"first": batch[0]["seq"], "last": last},
                    )
                    continue
                n = await asyncio.to_thread(self.buffer.forget_through, through)
                accepted += n
                if n == 0:
                    raise HealthUploadError(
                        f"the provider accepted through seq {through}, but the oldest report "
                        f"waiting is {batch[0]['seq']}"
                    )
        self.uploaded += accepted
        return accepted

    def can_send(self) -> bool:
        """True if there is a provider and the gateway may talk to it (activated)."""
        return self._make_client is not None and (self._ready is None or self._ready.is_set())

    async def _send(self, batch: list[dict[str, object]]) -> int:
        if self._http is None:
            assert self._make_client is not None
            self._http = self._make_client()
        sent = time.time()
        try:
            resp = await self._http.post(HEALTH_PATH, json={"reports": batch})
        except httpx.HTTPError as exc:
            raise HealthUploadError(
                f"cannot reach the provider: {exc or type(exc).__name__}"
            ) from exc
        self.detector.observe_date(resp.headers.get("date"), sent, time.time())
        if resp.status_code == 400:
            raise HealthRefusedError(f"the provider refused the batch: {resp.text[:300]}")
        if resp.status_code != 200:
            raise HealthUploadError(f"the provider answered {resp.status_code}: {resp.text[:300]}")
        try:
            through = resp.json()["accepted_through"]
            if not isinstance(through, int) or isinstance(through, bool):
                raise TypeError(through)
        except (ValueError, KeyError, TypeError) as exc:
            raise HealthUploadError(f"the provider's answer is malformed ({exc!r})") from None
        return through

    # -- loops ------------------------------------------------------------------------

    async def _upload_once_ready(self) -> None:
        """Wakes the upload as soon as the gateway is activated (what waited goes up then,
        not an interval later)."""
        assert self._ready is not None
        await self._ready.wait()
        self._kick.set()

    async def _tick_loop(self) -> None:
        while True:
            self.sampler.tick()
            await asyncio.sleep(TICK_S)

    async def _run(self) -> None:
        next_report = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_report or self._report_soon:
                self._report_soon = False
                try:
                    await self.sample()
                except OSError as exc:  # a full or failing disk: the next interval tries again
                    LOG.error("health report not kept: %s", exc)
                except Exception:  # a bug must not end reporting for good
                    LOG.exception("health report failed")
                next_report = now + self.interval
            wait = next_report - time.monotonic()
            if self.can_send() and len(self.buffer):
                try:
                    await self.upload()
                    self.failures, self.last_error = 0, ""
                except (HealthUploadError, OSError) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    retry = jittered(self.failures, BACKOFF_FIRST_S, BACKOFF_MAX_S)
                    LOG.warning(
                        "health upload failed: %s",
                        exc,
                        extra={"failures": self.failures, "retry_in_s": round(retry, 2)},
                    )
                    wait = min(wait, retry)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(0.0, wait))
