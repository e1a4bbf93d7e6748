"""Fault points of the swap, for the tests that break it on purpose.

``SGW_SWAP_FAULTS`` (environment) lists ``point=action`` pairs separated by commas, e.g.
``green-before-ready=exit``; the actions are ``exit`` (the process dies at once, as if
killed), ``hang`` (it stops answering) and ``sleep:SECONDS`` (it dawdles: the other
daemon goes on meanwhile). Unset, as in production, every point is a
dictionary lookup that finds nothing. The points are named where they are hit in
sgw.gateway.handover.swap.
"""

from __future__ import annotations

import asyncio
import logging
import os

LOG = logging.getLogger(__name__)

ENV = "SGW_SWAP_FAULTS"


def _parse(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        point, _, action = item.strip().partition("=")
        if point:
            out[point] = action or "exit"
    return out


_FAULTS = _parse(os.environ.get(ENV, ""))


async def hit(point: str) -> None:
    """Carries out the fault set for ``point``, if any."""
    action = _FAULTS.get(point)
    if action is None:
        return
    LOG.warning("swap fault point reached", extra={"point": point, "action": action})
    if action == "exit":
        os._exit(97)
    if action == "hang":
        await asyncio.Event().wait()
    if action.startswith("sleep:"):
        await asyncio.sleep(float(action.removeprefix("sleep:")))


def active(point: str) -> bool:
    """True if a fault is set for ``point`` (for faults that change data, not flow)."""
    return point in _FAULTS
