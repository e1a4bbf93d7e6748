"""Volumes created and removed while the engine runs (the control channel's
create_volume and delete_volume), on files in tmp_path: a new volume is registered as
managed and opens again without configuration; removing one is refused while the write
log holds any of its records, allowed once the destager (hurried) took them, and its disk
file goes; a configured volume cannot be removed this way."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sgw.common.errors import VolumeStateError
from sgw.gateway.volume.destager import Destager
from sgw.gateway.volume.engine import VolumeEngine, VolumeSpec
from sgw.gateway.volume.wal import DATA_START, MIN_DATA_SIZE

LOG_SIZE = DATA_START + MIN_DATA_SIZE
MIB = 1 << 20


def open_engine(tmp_path: Path, specs: list[VolumeSpec]) -> VolumeEngine:
    return VolumeEngine.open(str(tmp_path), str(tmp_path / "writelog"), LOG_SIZE, specs)


def disk(tmp_path: Path, name: str) -> Path:
    return tmp_path / "volumes" / f"{name}.img"


def spec(tmp_path: Path, name: str, size: int = 16 * MIB) -> VolumeSpec:
    return VolumeSpec(name, size, str(disk(tmp_path, name)))


def test_created_volumes_persist_and_removal_waits_for_the_log(tmp_path: Path) -> None:
    async def main() -> None:
        engine = open_engine(tmp_path, [spec(tmp_path, "conf")])
        vol = await engine.create_volume(spec(tmp_path, "new"), remote_id="r-1")
        assert engine.volumes["new"] is vol and engine.by_id[vol.id] is vol
        entry = engine.registry["new"]
        assert entry.managed and entry.remote_id == "r-1" and not entry.remote_synced
        assert disk(tmp_path, "new").stat().st_size == 16 * MIB
        with pytest.raises(VolumeStateError, match="exists"):
            await engine.create_volume(spec(tmp_path, "new"))
        with pytest.raises(VolumeStateError, match="4 KiB"):
            await engine.create_volume(spec(tmp_path, "odd", 4097))
        vol.write(0, b"\x5a" * 8192)
        await engine.flush()
        assert engine.holds_log_data("new") and not engine.holds_log_data("conf")
        with pytest.raises(VolumeStateError, match="write log still holds"):
            await engine.remove_volume("new")
        with pytest.raises(VolumeStateError, match="configuration"):
            await engine.remove_volume("conf")
        # The destager, hurried, takes the records out although the log is far from full
        # and writes have not paused for its idle time.
        destager = Destager(engine, start_fill=1.0, idle_seconds=3600.0)
        destager.start()
        destager.hurry()
        for _ in range(200):
            if not engine.holds_log_data("new"):
                break
            await asyncio.sleep(0.02)
        await destager.stop()
        assert not engine.holds_log_data("new")
        assert disk(tmp_path, "new").read_bytes()[:8192] == b"\x5a" * 8192
        engine.close()

        # Reopened without it in the configuration: it is there (managed).
        engine = open_engine(tmp_path, [spec(tmp_path, "conf")])
        assert set(engine.volumes) == {"conf", "new"}
        assert engine.volumes["new"].read(0, 8192) == b"\x5a" * 8192
        await engine.remove_volume("new")
        assert "new" not in engine.volumes and "new" not in engine.registry
        assert not disk(tmp_path, "new").exists()
        doc = json.loads((tmp_path / "volumes.json").read_text())
        assert set(doc) == {"conf"}
        # A new volume of the same name starts all zero (no data of the old one).
        again = await engine.create_volume(spec(tmp_path, "new"))
        assert again.read(0, 8192) == bytes(8192)
        engine.close()

    asyncio.run(main())


def test_a_stale_disk_file_of_a_removed_volume_is_not_reused(tmp_path: Path) -> None:
    async def main() -> None:
        engine = open_engine(tmp_path, [spec(tmp_path, "conf")])
        # A crash between a removal's registry write and the unlink leaves the file.
        disk(tmp_path, "gone").parent.mkdir(exist_ok=True)
        disk(tmp_path, "gone").write_bytes(b"old data" * 1024)
        vol = await engine.create_volume(spec(tmp_path, "gone"))
        assert vol.read(0, 8192) == bytes(8192)
        engine.close()

    asyncio.run(main())
