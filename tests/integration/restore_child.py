"""The restorer that test_restore_crash.py runs in a subprocess and kills with SIGKILL.

Usage: ``python -m tests.integration.restore_child PATH SIZE CHUNK_SIZE TOKEN_HEX SNAP_SEED
BEGIN SEED``. Prints ``ready`` once the restore is open (and begun when BEGIN is 1), then
restores in the background while, like the destager, it writes 4 KiB user blocks into
chunks after ``ensure``: ``I off key`` before a block's ``ensure``, ``D off key`` once the
block is written. Prints ``finished`` when everything is restored.
"""

from __future__ import annotations

import asyncio
import random
import sys

from sgw.gateway.volume.base import FileBaseStore
from sgw.gateway.volume.restore_tree import TreeRestore

BLOCK = 4096


def snapshot_chunk(seed: int, index: int, length: int) -> bytes | None:
    """Chunk ``index`` of the snapshot ``seed``: about one in five is all zero."""
    rng = random.Random(seed * 1_000_003 + index)
    return None if rng.random() < 0.2 else rng.randbytes(length)


def user_block(key: str) -> bytes:
    """The 4 KiB a user write named ``key`` puts on the volume."""
    return random.Random(key).randbytes(BLOCK)


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run(
    path: str, size: int, chunk_size: int, *, token: bytes, snap_seed: int, begin: bool, seed: int
) -> None:
    rng = random.Random(seed)
    store = FileBaseStore(path, size, create=False)

    async def fetch(index: int) -> bytes | None:
        await asyncio.sleep(rng.uniform(0, 0.01))
        return snapshot_chunk(snap_seed, index, min(chunk_size, size - index * chunk_size))

    tr = TreeRestore(store, size, chunk_size, token, fetch)
    if begin:
        await tr.begin()
    report("ready")
    finished = asyncio.Event()

    async def user() -> None:
        k = 0
        while not finished.is_set():
            chunk = rng.randrange(tr.total)
            blocks = min(chunk_size, size - chunk * chunk_size) // BLOCK
            # Half of them hit a chunk's first block, where a wrong re-mark would land.
            offset = (
                chunk * chunk_size + (0 if rng.random() < 0.5 else rng.randrange(blocks)) * BLOCK
            )
            key = f"{seed}-{k}"
            k += 1
            report(f"I {offset} {key}")
            await tr.ensure(offset, BLOCK)
            await asyncio.to_thread(store.write, offset, user_block(key))
            report(f"D {offset} {key}")
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def reader() -> None:
        while not finished.is_set():
            await tr.ensure(rng.randrange(size), rng.randrange(1, 3 * chunk_size))
            await asyncio.sleep(rng.uniform(0, 0.01))

    side = [asyncio.create_task(user()), asyncio.create_task(reader())]
    await tr.run_background(concurrency=4)
    finished.set()
    await asyncio.gather(*side)
    assert tr.done
    report("finished")


def main(argv: list[str]) -> None:
    path, size, chunk_size, token_hex, snap_seed, begin, seed = argv
    asyncio.run(
        run(
            path,
            int(size),
            int(chunk_size),
            token=bytes.fromhex(token_hex),
            snap_seed=int(snap_seed),
            begin=begin == "1",
            seed=int(seed),
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
