"""The chunker: turns one volume's merged batch into new versions of its chunks.

A volume is cut into chunks of ``chunk_size`` bytes (the last one may be shorter). For
every chunk a batch touches, the new version is the base store's bytes (the state before
the batch) with the batch's zero ranges and then its blocks laid over them. Chunks that
the batch overwrites entirely are built without reading the base, and chunks that end up
all zero are reported as ``None`` without materialising them, so a 1 TiB TRIM costs time
per chunk but no memory per chunk: the output is a generator, one chunk at a time.

This is blocking I/O (preads of the log and the base store) and CPU work: the upload step
runs it in a worker thread, never on the event loop that serves NBD.
"""

from __future__ import annotations

import bisect
from collections.abc import Generator, Iterable, Sequence
from typing import Protocol

from sgw.common.chunks import is_zero
from sgw.gateway.volume.destager import VolumeChanges
from sgw.gateway.volume.index import BLOCK, BLOCK_SHIFT


class _Readable(Protocol):
    def readinto(self, buf: memoryview, offset: int) -> object:
        """Fills ``buf`` from ``offset`` (the base store, or the log by file offset)."""


# A chunk's new content: ``None`` when it is all zero (its map entry becomes null).
# (index, the chunk's new content, or None if it is all zero). The content is the buffer
# it was built in (no copy): its consumers only read it.
ChunkVersion = tuple[int, bytes | bytearray | None]


def touched_chunks(
    changes: VolumeChanges, size: int, chunk_size: int, extra: Iterable[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[first, end)`` runs of the chunk indexes the changes touch.

    ``extra`` adds runs of chunk indexes to rebuild from the base store even if the batch
    does not touch them (the first upload of a volume that already holds data).
    """
    last = (size - 1) // chunk_size if size else -1
    spans: list[tuple[int, int]] = [(a, min(b, last + 1)) for a, b in extra if a < b]
    for offset, length, _punch in changes.zero_ranges:
        if length > 0 and offset < size:
            end = min(offset + length, size)
            spans.append((offset // chunk_size, (end - 1) // chunk_size + 1))
    per_chunk = chunk_size >> BLOCK_SHIFT
    for c in sorted({b // per_chunk for b in changes.blocks}):
        spans.append((c, c + 1))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _disjoint_zero_blocks(zero_ranges: Sequence[tuple[int, int, bool]]) -> list[list[int]]:
    """The zero ranges as sorted, disjoint ``[first_block, end_block)`` intervals.

    Their order does not matter: every zero range sets zeroes, and the blocks (applied
    after them) are the only thing that may override them.
    """
    spans = sorted(
        (off >> BLOCK_SHIFT, (off + length) >> BLOCK_SHIFT)
        for off, length, _ in zero_ranges
        if length > 0
    )
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def iter_chunks(
    changes: VolumeChanges,
    base: _Readable,
    log: _Readable,
    *,
    size: int,
    chunk_size: int,
    extra: Iterable[tuple[int, int]] = (),
) -> Generator[ChunkVersion, None, None]:
    """Yields ``(index, data)`` for every chunk touched, in index order; ``data`` is None
    when the new version is all zero.

    ``base`` must still hold the state before the batch, and ``log`` the batch's records
    (the destager frees neither before the upload step returns). ``size`` is the volume
    size; ``chunk_size`` a multiple of 4 KiB.
    """
    if chunk_size <= 0 or chunk_size % BLOCK:
        raise ValueError(f"chunk size {chunk_size} is not a positive multiple of {BLOCK}")
    per_chunk = chunk_size >> BLOCK_SHIFT
    zeros = _disjoint_zero_blocks(changes.zero_ranges)
    zero_starts = [z[0] for z in zeros]
    blocks_of: dict[int, list[int]] = {}
    for b in sorted(changes.blocks):
        blocks_of.setdefault(b // per_chunk, []).append(b)
    values = changes.blocks

    for first, end in touched_chunks(changes, size, chunk_size, extra):
        for index in range(first, end):
            start = index * chunk_size
            length = min(chunk_size, size - start)
            b0 = start >> BLOCK_SHIFT
            b1 = b0 + (length >> BLOCK_SHIFT)
            # Zero intervals overlapping [b0, b1): from the last one starting at or before b0.
            i = max(bisect.bisect_right(zero_starts, b0) - 1, 0)
            overlap: list[tuple[int, int]] = []
            while i < len(zeros) and zeros[i][0] < b1:
                a, b = max(zeros[i][0], b0), min(zeros[i][1], b1)
                if a < b:
                    overlap.append((a, b))
                i += 1
            mine = blocks_of.get(index, [])
            has_data = any(values[b] >= 0 for b in mine)
            if not has_data and overlap == [(b0, b1)]:
                yield index, None  # entirely zeroed: nothing to read or build
                continue
            covered = sum(b - a for a, b in overlap) + sum(
                1 for b in mine if not any(a <= b < e for a, e in overlap)
            )
            buf = bytearray(length)
            view = memoryview(buf)
            if covered < b1 - b0:
                base.readinto(view, start)
                for a, b in overlap:
                    view[(a - b0) << BLOCK_SHIFT : (b - b0) << BLOCK_SHIFT] = bytes(
                        (b - a) << BLOCK_SHIFT
                    )
            _overlay_blocks(view, b0, mine, values, log)
            view.release()
            yield index, (None if is_zero(buf) else buf)


def _overlay_blocks(
    view: memoryview, b0: int, mine: list[int], values: dict[int, int], log: _Readable
) -> None:
    """Writes the chunk's blocks over ``view``; adjacent blocks that are adjacent in the
    log too are read with one call."""
    zero_block = bytes(BLOCK)
    j = 0
    while j < len(mine):
        b = mine[j]
        v = values[b]
        dst = (b - b0) << BLOCK_SHIFT
        if v < 0:
            view[dst : dst + BLOCK] = zero_block
            j += 1
            continue
        k = j + 1
        while (
            k < len(mine)
            and mine[k] == b + (k - j)
            and values[mine[k]] == v + ((k - j) << BLOCK_SHIFT)
        ):
            k += 1
        n = (k - j) << BLOCK_SHIFT
        got = log.readinto(view[dst : dst + n], v)
        if isinstance(got, int) and got != n:
            raise OSError(f"short read from the write log at {v}: {got} of {n} bytes")
        j = k
