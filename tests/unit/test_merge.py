"""The destager's merge: a point-in-time batch is exactly the volume as of its last record."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgw.gateway.volume.destager import ZERO_PUNCH, merge
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.index import BLOCK

VOL_BLOCKS = 600  # > SMALL_ZERO_BLOCKS, so large zero ranges (intervals) happen too
LOG_SIZE = 129 << 20

op = st.tuples(
    st.sampled_from(["write", "zero", "trim"]),
    st.integers(0, VOL_BLOCKS - 1),
    st.integers(1, 400),
    st.integers(1, 255),
)


def apply_changes(model: bytearray, engine: VolumeEngine, vol_id: int, batch_vols: dict) -> None:  # type: ignore[type-arg]
    changes = batch_vols.get(vol_id)
    if changes is None:
        return
    for offset, length, _punch in changes.zero_ranges:
        model[offset : offset + length] = bytes(length)
    for run in changes.runs():
        if run.source >= 0:
            model[run.offset : run.offset + run.length] = engine.log.read(run.source, run.length)
        else:
            assert run.source in (ZERO_PUNCH, -1)
            model[run.offset : run.offset + run.length] = bytes(run.length)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, min_size=1, max_size=25), cut=st.integers(0, 25))
def test_point_in_time_batch_is_the_volume_at_its_last_record(
    tmp_path: Path, ops: list[tuple[str, int, int, int]], cut: int
) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh engine for every example
    engine = VolumeEngine.open(
        str(d), str(d / "log"), LOG_SIZE, [VolumeSpec("v", VOL_BLOCKS * BLOCK, str(d / "v.img"))]
    )
    try:
        vol = engine.volumes["v"]
        size = VOL_BLOCKS * BLOCK
        states = [bytearray(size)]  # the volume after each record
        for kind, first, count, fill in ops:
            n = min(count, VOL_BLOCKS - first)
            off, length = first * BLOCK, n * BLOCK
            cur = bytearray(states[-1])
            if kind == "write":
                vol.write(off, bytes([fill]) * length)
                cur[off : off + length] = bytes([fill]) * length
            elif kind == "zero":
                vol.write_zeroes(off, length, punch=bool(fill & 1))
                cur[off : off + length] = bytes(length)
            else:
                vol.trim(off, length)
                cur[off : off + length] = bytes(length)
            states.append(cur)
        k = min(cut, len(ops)) or 1
        records = engine.log.read_records(
            engine.log.tail, engine.log.tail_seq, engine.log.head, 1 << 40
        )[:k]
        batch = merge(engine, records, point_in_time=True)
        model = bytearray(size)  # the base store: empty
        apply_changes(model, engine, vol.id, batch.volumes)
        assert model == states[k]
        # The newest-only merge gives the final state once every record is applied.
        everything = engine.log.read_records(
            engine.log.tail, engine.log.tail_seq, engine.log.head, 1 << 40
        )
        final = bytearray(size)
        apply_changes(final, engine, vol.id, merge(engine, everything).volumes)
        assert final == states[-1]
        # And reading through the volume agrees with the model too.
        assert asyncio.run(_read(vol, size)) == states[-1]
    finally:
        engine.close()
        shutil.rmtree(d)  # 129 MiB of preallocated log per example


async def _read(vol, size: int) -> bytes:
    return bytes(vol.read(0, size))
