"""`sgw releases build`: the real image/build-release, twice, gives the same manifest
(the slow test of release bundles: about a minute per build on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sgw.common.releases import MANIFEST_NAME, Manifest, tree_digest
from sgw.provider.releases.repository import read_bundle_manifest
from tests.fixtures.daemons import SGW

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="image/build-release needs root (unshare)"),
]


def _build(out: Path) -> dict[str, object]:
    res = subprocess.run(
        [SGW, "releases", "build", "--version", "0.1.0+build1", str(out), "--output", "json"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


@pytest.mark.timeout(1800)
def test_building_twice_gives_the_same_manifest(tmp_path: Path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert first.pop("bundle") != second.pop("bundle")
    assert first == second
    manifest = Manifest.from_json(
        json.loads((tmp_path / "a" / "sgw-0.1.0+build1.manifest.json").read_text())
    )
    assert manifest.version == "0.1.0+build1"
    assert manifest.handover_versions == (1,)
    # The bundle holds the slot with the same manifest, and the slot's files match its
    # digest once unpacked.
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    bundle = tmp_path / "a" / "sgw-0.1.0+build1.tar.zst"
    subprocess.run(["tar", "--zstd", "-xf", str(bundle), "-C", str(unpacked)], check=True)
    slot = unpacked / "opt/sgw/releases/0.1.0+build1"
    assert Manifest.from_json(json.loads((slot / MANIFEST_NAME).read_text())) == manifest
    assert tree_digest(slot) == manifest.tree_sha256
    # The provider accepts it: its files match the manifest, read from the tar stream.
    with open(bundle, "rb") as f:
        assert read_bundle_manifest(f) == manifest
    # Same bytes too: sorted, root-owned entries dated at the commit.
    a = (tmp_path / "a" / "sgw-0.1.0+build1.tar.zst").read_bytes()
    b = (tmp_path / "b" / "sgw-0.1.0+build1.tar.zst").read_bytes()
    assert a == b
