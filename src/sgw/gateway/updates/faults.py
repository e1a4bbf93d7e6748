"""Fault points of the update agent, for the tests that kill it at every step.

``SGW_UPDATE_FAULTS`` (environment) lists the points, separated by commas, where the
agent kills itself with SIGKILL (as ``kill -9`` would): ``downloading`` (the fetch began),
``unpacking`` (a slot is half unpacked), ``installed`` (the slot is in place, the state
file not yet told), ``swapping`` (the state says swapping, the daemon not yet asked),
``swapped`` (the daemon swapped, the agent has not recorded it). Unset, as in production,
every point is a set lookup that finds nothing.
"""

from __future__ import annotations

import logging
import os
import signal

LOG = logging.getLogger(__name__)

ENV = "SGW_UPDATE_FAULTS"
POINTS = ("downloading", "unpacking", "installed", "swapping", "swapped")

_FAULTS = {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}


def hit(point: str) -> None:
    """Kills this process with SIGKILL if a fault is set for ``point``."""
    if point in _FAULTS:
        LOG.warning("update fault point reached: killing the agent", extra={"point": point})
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
