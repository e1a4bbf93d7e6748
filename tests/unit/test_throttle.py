"""The write throttle: no delay while the log has room, then a smooth rise to the cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sgw.gateway.nbd.connection import THROTTLE_MAX, THROTTLE_START, throttle_delay


def test_no_delay_until_the_log_is_mostly_full() -> None:
    assert throttle_delay(0.0) == 0.0
    assert throttle_delay(THROTTLE_START) == 0.0
    assert throttle_delay(THROTTLE_START + 0.01) > 0.0


def test_full_log_gets_the_cap_and_never_more() -> None:
    assert throttle_delay(1.0) == THROTTLE_MAX
    assert throttle_delay(1.5) == THROTTLE_MAX


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_delay_rises_with_the_fill(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert 0.0 <= throttle_delay(lo) <= throttle_delay(hi) <= THROTTLE_MAX
