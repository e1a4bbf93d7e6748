"""The wait before retrying after consecutive failures: doubling from a first wait to a
cap, times a random factor in [0.5, 1) so that many gateways do not retry in step."""

from __future__ import annotations

import random
from collections.abc import Callable


def jittered(
    failures: int, first_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after ``failures`` consecutive errors (the first waits ``first_s``
    or less, none more than ``max_s``)."""
    base = min(max_s, first_s * 2.0 ** max(0, failures - 1))
    return base * (0.5 + 0.5 * rng())
