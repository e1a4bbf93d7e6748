"""Release manifests, the slot digest, the provider's check of a bundle and root pinning
(sgw.common.releases, sgw.provider.releases, sgw.gateway.link.release_root)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from sgw.common.errors import BadRequestError
from sgw.common.releases import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    make_manifest,
    root_fingerprint,
    target_path,
    tree_digest,
)
from sgw.gateway.link.release_root import pin_root
from sgw.provider.releases.keys import init_keys
from sgw.provider.releases.repository import read_bundle_manifest
from tests.fixtures.releases import make_bundle, make_slot, pack


def test_target_path_is_the_contracts():
    assert target_path("1.2.0") == "releases/1.2.0/sgw-1.2.0.tar.zst"


def test_manifest_round_trips_and_checks_its_fields(tmp_path: Path):
    slot = make_slot(tmp_path, "1.0.0")
    manifest = Manifest.from_json(json.loads((slot / MANIFEST_NAME).read_bytes()))
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.swappable_from == ">=0.1.0" and manifest.handover_versions == (1,)
    assert manifest.swappable("0.1.0") and manifest.swappable("2.0.0+local")
    assert not manifest.swappable("0.0.9")
    doc = manifest.to_json()
    for field, value, named in [
        ("version", "not a version!", "PEP 440"),
        ("swappable_from", "~~1", "specifier"),
        ("tree_sha256", "ab", "tree_sha256"),
        ("handover_versions", ["1"], "handover_versions"),
        ("format", 2, "format"),
    ]:
        with pytest.raises(ManifestError, match=named):
            Manifest.from_json({**doc, field: value})
    with pytest.raises(ManifestError, match="lacks 'revision'"):
        Manifest.from_json({k: v for k, v in doc.items() if k != "revision"})


def test_tree_digest_covers_paths_modes_contents_and_links_not_times(tmp_path: Path):
    slot = make_slot(tmp_path, "1.0.0")
    digest = tree_digest(slot)
    assert digest == make_manifest(str(slot), "1.0.0", "x", (1,)).tree_sha256
    os.utime(slot / "lib" / "app.py", (0, 0))
    (slot / MANIFEST_NAME).write_text("{}")  # the manifest itself does not count
    assert tree_digest(slot) == digest

    def relink(s: Path) -> None:
        (s / "bin" / "python").unlink()
        (s / "bin" / "python").symlink_to("/x")

    changes = [
        lambda s: (s / "lib" / "app.py").write_bytes(b"print('other')\n"),
        lambda s: (s / "bin" / "sgw").chmod(0o700),
        lambda s: (s / "lib" / "app.py").rename(s / "lib" / "app2.py"),
        relink,
        lambda s: (s / "lib" / "new").mkdir(),
    ]
    for i, change in enumerate(changes):
        fresh = make_slot(tmp_path / f"t{i}", "1.0.0")
        assert tree_digest(fresh) == digest  # the same tree elsewhere
        change(fresh)
        assert tree_digest(fresh) != digest, i


def test_the_fingerprint_is_of_the_signed_part_not_its_formatting(tmp_path: Path):
    root = init_keys(str(tmp_path / "keys"))
    data = (tmp_path / "keys" / "root.json").read_bytes()
    reformatted = json.dumps(json.loads(data), indent=None).encode()
    assert root_fingerprint(reformatted) == root_fingerprint(data)
    other = init_keys(str(tmp_path / "other"))
    assert root_fingerprint(data) != root_fingerprint(
        (tmp_path / "other" / "root.json").read_bytes()
    )
    assert root.signed.version == other.signed.version == 1


def test_a_baked_root_wins_over_a_delivered_one(tmp_path: Path, caplog):
    init_keys(str(tmp_path / "image"))
    init_keys(str(tmp_path / "provider"))
    baked = tmp_path / "image" / "root.json"
    delivered = (tmp_path / "provider" / "root.json").read_bytes()
    metadata = tmp_path / "gw" / "updates" / "metadata"
    with caplog.at_level(logging.ERROR):
        pinned = pin_root(metadata, delivered, baked)
    assert pinned == root_fingerprint(baked.read_bytes())
    assert (metadata / "root.json").read_bytes() == baked.read_bytes()
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_a_delivered_root_is_pinned_once(tmp_path: Path):
    init_keys(str(tmp_path / "a"))
    init_keys(str(tmp_path / "b"))
    a = (tmp_path / "a" / "root.json").read_bytes()
    b = (tmp_path / "b" / "root.json").read_bytes()
    metadata = tmp_path / "gw"
    absent = tmp_path / "no-image-root.json"
    assert pin_root(metadata, None, absent) is None
    assert not (metadata / "root.json").exists()
    assert pin_root(metadata, a, absent) == root_fingerprint(a)
    # A later delivery (another activation) does not replace what is trusted.
    assert pin_root(metadata, b, absent) == root_fingerprint(a)
    assert (metadata / "root.json").read_bytes() == a


def _refused(bundle: Path, match: str) -> None:
    with open(bundle, "rb") as f, pytest.raises(BadRequestError, match=match):
        read_bundle_manifest(f)


def test_a_bundle_is_checked_against_its_manifest(tmp_path: Path):
    good = make_bundle(tmp_path, "1.0.0")
    with open(good, "rb") as f:
        assert read_bundle_manifest(f).version == "1.0.0"
    # A slot edited after its manifest was written.
    slot = make_slot(tmp_path / "edited", "1.0.0")
    (slot / "lib" / "app.py").write_bytes(b"import os; os.system('evil')\n")
    _refused(pack(tmp_path / "edited", tmp_path / "edited.tar.zst"), "tree_sha256")
    # A slot under another version's name.
    slot = make_slot(tmp_path / "renamed", "1.0.0")
    slot.rename(slot.with_name("2.0.0"))
    _refused(
        pack(tmp_path / "renamed", tmp_path / "renamed.tar.zst"),
        "does not match its manifest's version",
    )
    # A member outside the slot.
    make_slot(tmp_path / "outside", "1.0.0")
    (tmp_path / "outside" / "opt" / "evil").write_text("x")
    _refused(pack(tmp_path / "outside", tmp_path / "outside.tar.zst"), "outside")
