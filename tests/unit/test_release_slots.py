"""Release slots: ``current`` moves to a slot atomically and only to a slot; the previous
slot stays; anything that is not a slot layout is left alone, with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgw.gateway.handover.slots import make_current, slot_root


def layout(root: Path, *versions: str, current: str | None = None) -> None:
    """``root/releases/<v>/bin/sgw`` for each version; ``root/current`` -> a slot."""
    for v in versions:
        (root / "releases" / v / "bin").mkdir(parents=True)
        (root / "releases" / v / "bin" / "sgw").write_text("#!/bin/sh\n")
    if current is not None:
        os.symlink(root / "releases" / current, root / "current")


def test_switches_to_the_slot_and_keeps_the_previous(tmp_path: Path) -> None:
    layout(tmp_path, "0.1.0", "0.1.0+swap1", current="0.1.0")
    v2 = tmp_path / "releases" / "0.1.0+swap1"
    done = make_current(str(v2))
    assert done.switched and done.reason == ""
    assert done.link == str(tmp_path / "current")
    assert done.previous == str(tmp_path / "releases" / "0.1.0")
    assert os.readlink(tmp_path / "current") == str(v2)
    assert (tmp_path / "current" / "bin" / "sgw").exists()
    assert (tmp_path / "releases" / "0.1.0" / "bin" / "sgw").exists()
    # No temporary link left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]
    # And back (a rollback is the same call).
    back = make_current(str(tmp_path / "releases" / "0.1.0"))
    assert back.switched and back.previous == str(v2)
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "0.1.0")


def test_a_relative_or_unnormalised_path_becomes_the_slots_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout(tmp_path, "1", "2", current="1")
    monkeypatch.chdir(tmp_path / "releases")
    done = make_current("../releases/2/")
    assert done.switched
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "2")


def test_a_stale_temporary_link_is_replaced(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2", current="1")
    os.symlink("/nowhere", tmp_path / f".current.{os.getpid()}.tmp")
    assert make_current(str(tmp_path / "releases" / "2")).switched
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "2")
    assert not (tmp_path / f".current.{os.getpid()}.tmp").is_symlink()


def test_not_a_slot_is_left_alone(tmp_path: Path) -> None:
    layout(tmp_path, "1", current="1")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    done = make_current(str(tmp_path / "venv"))
    assert not done.switched and done.link is None
    assert "is not a release slot" in done.reason
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "1")
    # The current link itself is not a slot either.
    assert not make_current(str(tmp_path / "current")).switched
    # Nor is a slot's path that names no directory.
    missing = make_current(str(tmp_path / "releases" / "9"))
    assert not missing.switched and "is not a release slot" in missing.reason
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "1")


def test_a_current_that_is_not_a_symlink_is_left_alone(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2")
    (tmp_path / "current").mkdir()
    done = make_current(str(tmp_path / "releases" / "2"))
    assert not done.switched
    assert "is not a symlink" in done.reason
    assert (tmp_path / "current").is_dir() and not (tmp_path / "current").is_symlink()
    # No current at all: nothing made either.
    (tmp_path / "current").rmdir()
    assert not make_current(str(tmp_path / "releases" / "2")).switched
    assert not (tmp_path / "current").exists()


def test_a_failed_switch_keeps_the_link_and_says_why(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2", current="1")
    # A directory where the temporary link goes: it can be neither removed nor replaced
    # by a symlink (as a full or read-only file system would refuse, even to root).
    (tmp_path / f".current.{os.getpid()}.tmp" / "x").mkdir(parents=True)
    done = make_current(str(tmp_path / "releases" / "2"))
    assert not done.switched and done.reason.startswith("cannot switch")
    assert done.previous == str(tmp_path / "releases" / "1")
    assert os.readlink(tmp_path / "current") == str(tmp_path / "releases" / "1")


def test_slot_root() -> None:
    assert slot_root("/opt/sgw/releases/0.1.0") == "/opt/sgw"
    assert slot_root("/opt/sgw/releases/0.1.0/") == "/opt/sgw"
    assert slot_root("/opt/sgw/current") is None
    assert slot_root("/opt/sgw/releases") is None
    assert slot_root("/") is None
