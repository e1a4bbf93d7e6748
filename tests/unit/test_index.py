"""The extent index against a byte-level model: reads through it must match the model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sgw.gateway.volume.index import (
    BLOCK,
    SEG_BASE,
    SEG_LOG,
    SEG_ZERO,
    SMALL_ZERO_BLOCKS,
    ExtentIndex,
)

NBLOCKS = 2048

ops = st.lists(
    st.tuples(
        st.sampled_from(["data", "zero", "trim", "reclaim"]),
        st.integers(0, NBLOCKS - 1),
        st.integers(1, 600),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_segments_match_model(steps: list[tuple[str, int, int]]) -> None:
    """Model: per block, what a read must return: ('base',), ('log', pos) or ('zero',)."""
    index = ExtentIndex()
    model: dict[int, tuple[str, int]] = {}
    records: list[tuple[str, int, int, int]] = []  # kind, first, n, pos/virt
    pos = 0
    virt = 0
    for kind, first, count in steps:
        n = min(count, NBLOCKS - first)
        if kind == "reclaim":
            if not records:
                continue
            # The destager frees the oldest record: entries it still owns go back to base.
            rkind, rfirst, rn, rpos = records.pop(0)
            if rkind == "data":
                index.reclaim_data(rfirst, rn, rpos)
                for i in range(rn):
                    if model.get(rfirst + i) == ("log", rpos + i * BLOCK):
                        del model[rfirst + i]
            else:
                index.reclaim_zero(rfirst, rn, rpos, rkind == "trim")
                for i in range(rn):
                    if model.get(rfirst + i) == (rkind, rpos):
                        del model[rfirst + i]
            continue
        virt += 1
        if kind == "data":
            index.add_data(first, n, pos)
            for i in range(n):
                model[first + i] = ("log", pos + i * BLOCK)
            records.append(("data", first, n, pos))
            pos += n * BLOCK
        else:
            index.add_zero(first, n, virt, kind == "trim")
            for i in range(n):
                model[first + i] = (kind, virt)
            records.append((kind, first, n, virt))
    seen = 0
    for seg, fb, count, spos in index.segments(0, NBLOCKS):
        assert fb == seen
        for i in range(count):
            want = model.get(fb + i)
            if seg == SEG_BASE:
                assert want is None, (fb + i, want)
            elif seg == SEG_LOG:
                assert want == ("log", spos + i * BLOCK)
            else:
                assert seg == SEG_ZERO
                assert want is not None and want[0] in ("zero", "trim")
                assert spos == int(want[0] == "trim")
        seen += count
    assert seen == NBLOCKS


def test_large_trim_is_one_interval() -> None:
    index = ExtentIndex()
    index.add_data(10, 4, 0)
    index.add_zero(0, 1 << 28, virt=7, trim=True)  # a 1 TiB discard
    assert len(index.blocks) == 0
    assert len(index.intervals) == 1
    assert list(index.segments(0, 16)) == [(SEG_ZERO, 0, 16, 1)]
    index.add_data(12, 1, 4096)
    assert list(index.segments(11, 3)) == [
        (SEG_ZERO, 11, 1, 1),
        (SEG_LOG, 12, 1, 4096),
        (SEG_ZERO, 13, 1, 1),
    ]
    index.reclaim_zero(0, 1 << 28, virt=7, trim=True)
    assert list(index.segments(11, 3)) == [
        (SEG_BASE, 11, 1, 0),
        (SEG_LOG, 12, 1, 4096),
        (SEG_BASE, 13, 1, 0),
    ]


def test_small_zero_stays_per_block() -> None:
    index = ExtentIndex()
    index.add_zero(0, SMALL_ZERO_BLOCKS, virt=1, trim=False)
    assert not index.intervals
    assert len(index.blocks) == SMALL_ZERO_BLOCKS
