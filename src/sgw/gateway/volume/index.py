"""The extent index: which blocks of a volume are newer in the write log than in the base.

Blocks are 4 KiB. Data and small zeroed ranges are kept per block in a dict (block number
-> log file offset of that block's bytes, or a negative zero marker naming the record).
Large zeroed ranges (TRIM of a whole disk) are kept as intervals, so that a 1 TiB discard
costs one entry. Invariant: a per-block entry is always newer than any interval that
covers it, because adding an interval drops the per-block entries under it; a read
therefore looks at the dict first, then the intervals, then the base store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT
# Zeroed ranges up to this many blocks go into the per-block dict; larger ones are intervals.
SMALL_ZERO_BLOCKS = 256

SEG_BASE = 0
SEG_LOG = 1
SEG_ZERO = 2


def zero_marker(virt: int, trim: bool) -> int:
    """The dict value for a block zeroed by the record at ``virt``."""
    return -((virt << 1 | trim) + 1)


def marker_is_trim(value: int) -> bool:
    """True if a negative dict value came from a TRIM (a hole), not WRITE_ZEROES."""
    return bool((-value - 1) & 1)


@dataclass(slots=True)
class ZeroInterval:
    """A large zeroed range, in blocks, from the record at log position ``virt``."""

    start: int
    end: int
    virt: int
    trim: bool


class ExtentIndex:
    """Per-volume map of log-resident blocks; mutated only on the event loop."""

    __slots__ = ("blocks", "intervals")

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}
        self.intervals: list[ZeroInterval] = []

    def __len__(self) -> int:
        return len(self.blocks) + len(self.intervals)

    # -- updates ---------------------------------------------------------------------

    def add_data(self, first_block: int, nblocks: int, pos: int) -> None:
        """Blocks ``first_block..+nblocks`` now live in the log from file offset ``pos``."""
        blocks = self.blocks
        for i in range(nblocks):
            blocks[first_block + i] = pos + (i << BLOCK_SHIFT)

    def add_zero(self, first_block: int, nblocks: int, virt: int, trim: bool) -> None:
        """Blocks ``first_block..+nblocks`` read as zeroes (record at ``virt``)."""
        if nblocks <= SMALL_ZERO_BLOCKS:
            marker = zero_marker(virt, trim)
            blocks = self.blocks
            for i in range(nblocks):
                blocks[first_block + i] = marker
            return
        end = first_block + nblocks
        self._drop_blocks(first_block, end)
        self.intervals.append(ZeroInterval(first_block, end, virt, trim))

    def _drop_blocks(self, start: int, end: int) -> None:
        blocks = self.blocks
        if end - start <= len(blocks):
            for b in range(start, end):
                blocks.pop(b, None)
        else:
            for b in [b for b in blocks if start <= b < end]:
                del blocks[b]

    def reclaim_data(self, first_block: int, nblocks: int, pos: int) -> None:
        """Forgets blocks still pointing at a destaged data record at file offset ``pos``."""
        blocks = self.blocks
        for i in range(nblocks):
            b = first_block + i
            if blocks.get(b) == pos + (i << BLOCK_SHIFT):
                del blocks[b]

    def reclaim_zero(self, first_block: int, nblocks: int, virt: int, trim: bool) -> None:
        """Forgets what a destaged zero record at ``virt`` put in the index."""
        if nblocks <= SMALL_ZERO_BLOCKS:
            marker = zero_marker(virt, trim)
            blocks = self.blocks
            for i in range(nblocks):
                b = first_block + i
                if blocks.get(b) == marker:
                    del blocks[b]
            return
        self.intervals = [iv for iv in self.intervals if iv.virt != virt]

    # -- lookups ---------------------------------------------------------------------

    def segments(self, first_block: int, nblocks: int) -> Iterator[tuple[int, int, int, int]]:
        """Splits a block range into runs ``(kind, first_block, count, pos)``.

        ``kind`` is SEG_LOG (read ``count`` blocks from log file offset ``pos``), SEG_ZERO
        (``pos`` is 1 for a hole, 0 for allocated zeroes) or SEG_BASE.
        """
        end = first_block + nblocks
        if not self.blocks and not self.intervals:
            yield SEG_BASE, first_block, nblocks, 0
            return
        # Newest first: with overlapping intervals the newest decides hole or not.
        ivs = [iv for iv in reversed(self.intervals) if iv.start < end and iv.end > first_block]
        get = self.blocks.get
        run_kind, run_start, run_pos = -1, first_block, 0
        expect = 0  # the value that would extend the current run
        b = first_block
        while b < end:
            v = get(b)
            if v is None:
                kind, pos = SEG_BASE, 0
                for iv in ivs:
                    if iv.start <= b < iv.end:
                        kind, pos = SEG_ZERO, int(iv.trim)
                        break
            elif v >= 0:
                kind, pos = SEG_LOG, v
            else:
                kind, pos = SEG_ZERO, int(marker_is_trim(v))
            if kind == run_kind and (pos == expect if kind == SEG_LOG else pos == run_pos):
                expect += BLOCK
            else:
                if run_kind >= 0:
                    yield run_kind, run_start, b - run_start, run_pos
                run_kind, run_start, run_pos, expect = kind, b, pos, pos + BLOCK
            b += 1
        if run_kind >= 0:
            yield run_kind, run_start, end - run_start, run_pos

    def touches(self, first_block: int, nblocks: int) -> bool:
        """True if any block of the range is in the log (cheap test for the fast path)."""
        if not self.blocks and not self.intervals:
            return False
        return any(k != SEG_BASE for k, *_ in self.segments(first_block, nblocks))
