"""The provider's pacing of the garbage collector (sgw.provider.server._GcPacer)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from sgw.provider import server


class Node:
    """A container that can be part of a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def paced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(server, "GC_YOUNG_S", 0.01)
    monkeypatch.setattr(server, "GC_FREEZE_S", 0.1)
    monkeypatch.setattr(server, "GC_FULL_S", 0.5)
    gc.collect()
    gc.disable()  # as serve() leaves it: the pacer is the only collector
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()
        gc.collect()


async def run_pacer(seconds: float) -> server._GcPacer:
    pacer = server._GcPacer()
    task = asyncio.get_running_loop().create_task(pacer.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return pacer


def test_young_cycles_are_collected_without_automatic_collections(paced: None) -> None:
    async def main() -> None:
        young = cycle()
        assert young() is not None  # nothing collects it while automatic GC is off
        await run_pacer(0.1)
        assert young() is None

    asyncio.run(main())


def test_survivors_are_frozen_and_a_full_collection_thaws_them(paced: None) -> None:
    async def main() -> None:
        keep = Node()
        keep.other = Node()  # a live container: survives, then frozen
        await run_pacer(0.3)
        assert gc.get_freeze_count() > 0
        # A cycle that dies once frozen is left to the full collection.
        old = cycle()
        gc.freeze()
        await run_pacer(0.1)
        assert old() is not None, "a young collection must not walk frozen objects"
        pacer = await run_pacer(0.7)
        assert pacer.full_collections >= 1
        assert old() is None
        assert keep.other is not None

    asyncio.run(main())
