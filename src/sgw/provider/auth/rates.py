"""The request rate quota: a token bucket per account, in this process's memory.

Every authenticated request (API token or signed gateway request) takes one token from
its account's bucket after its credentials are verified; an empty bucket refuses it with
429 (``RateLimitedError``). The bucket refills at the account's rate (requests per second:
its ``quota_rate``, or ``DEFAULT_RATE``) and holds ``BURST_S`` seconds of it.

Per process, on purpose: the check is on the hot path of chunk uploads and of the
control channel's polls, where a database round trip per request would cost more than
the work it guards. A provider serving with N processes accepts up to N times the rate
from an account that spreads its requests over all of them (docs/provider.md, "Quotas").
Rates set by the operator reach the process that set them at once and the others within
their next refresh (``replace``, called by the authenticator's housekeeping).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from sgw.common.errors import RateLimitedError

LOG = logging.getLogger(__name__)

# Requests per second an account may send to one provider process unless the operator
# set its rate: generous (a busy gateway sends a few hundred: chunk uploads, commits,
# polls), so only a runaway or hostile client meets it.
DEFAULT_RATE = 10000.0
# The lowest rate the operator may set (requests per second): an account always gets
# some requests through, to see why the rest are refused.
MIN_RATE = 1.0
# Seconds of its rate that an account's bucket holds (its burst), at least one request.
BURST_S = 2.0


class RateLimiter:
    """Token buckets of the accounts (thread-safe; ``take`` never blocks on I/O)."""

    def __init__(
        self, default_rate: float = DEFAULT_RATE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.default_rate = default_rate
        self._clock = clock
        self._rates: dict[str, float] = {}  # accounts whose rate the operator set
        self._buckets: dict[str, tuple[float, float]] = {}  # account -> (tokens, time)
        self._lock = threading.Lock()

    def rate(self, account_id: str) -> float:
        """The account's rate (requests per second)."""
        return self._rates.get(account_id, self.default_rate)

    def set_rate(self, account_id: str, rate: float | None) -> None:
        """The account's rate from now (None: the default); its bucket starts full."""
        with self._lock:
            if rate is None:
                self._rates.pop(account_id, None)
            else:
                self._rates[account_id] = rate
            self._buckets.pop(account_id, None)

    def replace(self, rates: Mapping[str, float]) -> None:
        """Every account's set rate, as the database holds them (others: the default)."""
        with self._lock:
            every = self._rates.keys() | rates.keys()
            changed = {a for a in every if self._rates.get(a) != rates.get(a)}
            self._rates = dict(rates)
            for account_id in changed:
                self._buckets.pop(account_id, None)
        if changed:
            LOG.info("request rate quotas changed", extra={"accounts": sorted(changed)[:20]})

    def take(self, account_id: str) -> None:
        """Takes one request from the account's bucket; RateLimitedError if it is empty."""
        rate = self.rate(account_id)
        capacity = max(1.0, rate * BURST_S)
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(account_id, (capacity, now))
            tokens = min(capacity, tokens + (now - then) * rate)
            if tokens >= 1.0:
                self._buckets[account_id] = (tokens - 1.0, now)
                return
            self._buckets[account_id] = (tokens, now)
        wait = (1.0 - tokens) / rate  # rates are at least MIN_RATE
        raise RateLimitedError(
            f"account {account_id} sent more than {rate:g} requests per second, its request "
            f"rate quota (per provider process); retry in {wait:.1f} s, or the provider's "
            f"operator raises the quota with `sgw accounts quota-set {account_id} --rate N`",
            retry_after=wait,
        )
