"""Release bundles: the manifest a release slot carries, the TUF target path of its bundle
and the digest of the slot's files (docs/updates.md, "Releases and signatures").

A bundle is ``sgw-<version>.tar.zst``, a zstd tar of ``opt/sgw/releases/<version>/...``
(image/build-release), holding its manifest at ``.../sgw-release.json``. The provider signs
the bundle as a TUF target; the update agent unpacks it and checks ``tree_digest`` of the
slot against the manifest's ``tree_sha256``, so a slot damaged after the download (or an
unpack cut short) is never swapped to.

Run as ``python -m sgw.common.releases SLOT_DIR REVISION HANDOVER_READS`` (what
image/build-release does with the slot's own interpreter) it writes the slot's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from sgw.common.errors import SgwError

# The manifest's file name inside the slot; left out of the slot's digest (it holds it).
MANIFEST_NAME = "sgw-release.json"
# The manifest's format; a reader refuses others.
MANIFEST_FORMAT = 1
# Where slots live on the appliance; a bundle's paths start with it (without the "/").
RELEASES_DIR = "opt/sgw/releases"
_READ_CHUNK = 1 << 20


class ManifestError(SgwError):
    """A release manifest is malformed; the message names the field."""


@dataclass(frozen=True)
class Manifest:
    """What a release is and what it may replace.

    ``swappable_from`` is a PEP 440 specifier of the running versions it may be swapped
    from (the oldest whose handover record it reads, and later); ``handover_versions`` the
    handover record versions it reads; ``python`` and ``platform`` what it was built for
    (e.g. ``3.11`` and ``linux-x86_64``); ``tree_sha256`` the slot's ``tree_digest``.
    """

    version: str
    revision: str
    swappable_from: str
    handover_versions: tuple[int, ...]
    python: str
    platform: str
    tree_sha256: str

    def __post_init__(self) -> None:
        try:
            Version(self.version)
        except InvalidVersion as e:
            raise ManifestError(f"manifest version {self.version!r} is not PEP 440") from e
        try:
            SpecifierSet(self.swappable_from)
        except InvalidSpecifier as e:
            raise ManifestError(
                f"manifest swappable_from {self.swappable_from!r} is not a PEP 440 specifier"
            ) from e
        if len(self.tree_sha256) != 64 or any(
            c not in "0123456789abcdef" for c in self.tree_sha256
        ):
            raise ManifestError("manifest tree_sha256 must be 64 lowercase hex digits")

    def swappable(self, running: str) -> bool:
        """True if a gateway running ``running`` may swap to this release."""
        try:
            return SpecifierSet(self.swappable_from).contains(Version(running), prereleases=True)
        except InvalidVersion:
            return False

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        """The manifest in ``doc``, or ManifestError naming what is wrong."""
        if not isinstance(doc, dict):
            raise ManifestError("a release manifest is a JSON object")
        if doc.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"release manifest format {doc.get('format')!r} is not {MANIFEST_FORMAT}; "
                "build the release with this version's `sgw releases build`"
            )
        try:
            fields = {
                name: str(doc[name])
                for name in ("version", "revision", "swappable_from", "python", "platform")
            }
            tree = doc["tree_sha256"]
            handover = doc["handover_versions"]
        except KeyError as e:
            raise ManifestError(f"release manifest lacks {e.args[0]!r}") from e
        if not isinstance(tree, str):
            raise ManifestError("manifest tree_sha256 must be a string")
        if not isinstance(handover, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in handover
        ):
            raise ManifestError("manifest handover_versions must be a list of integers")
        return cls(**fields, handover_versions=tuple(handover), tree_sha256=tree)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "revision": self.revision,
            "swappable_from": self.swappable_from,
            "handover_versions": list(self.handover_versions),
            "python": self.python,
            "platform": self.platform,
            "tree_sha256": self.tree_sha256,
        }

    def dumps(self) -> bytes:
        """The manifest file's bytes (sorted keys: the same manifest, the same bytes)."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()


def bundle_name(version: str) -> str:
    return f"sgw-{version}.tar.zst"


def target_path(version: str) -> str:
    """The TUF target path of the bundle of ``version``."""
    return f"releases/{version}/{bundle_name(version)}"


def tree_digest(slot_dir: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) over a slot's files: every entry's relative path (sorted), kind, mode
    bits and contents (a symlink's target), the manifest file left out. Times and owners
    do not count, so two builds of the same tree agree."""
    root = Path(slot_dir)
    digest = TreeDigest()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = os.path.relpath(path, root)
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                digest.add(rel, "l", mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                digest.add(rel, "d", mode, "")
            elif stat.S_ISREG(st.st_mode):
                digest.add(rel, "f", mode, _file_sha256(path))
            else:
                raise ManifestError(f"{path} is neither a file, a directory nor a symlink")
    return digest.hexdigest()


class TreeDigest:
    """``tree_digest`` from entries given in any order (a directory walk, a tar stream):
    ``add(path, kind, mode, body)`` with kind "f" (body: the contents' SHA-256 hex), "d"
    (body empty) or "l" (body: the link's target)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, int, str]] = {}

    def add(self, rel: str, kind: str, mode: int, body: str) -> None:
        if rel != MANIFEST_NAME:
            self.entries[rel] = (kind, mode, body)

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for rel in sorted(self.entries):
            kind, mode, text = self.entries[rel]
            body = text.encode()
            digest.update(f"{kind} {mode:04o} {len(rel.encode())}:".encode() + rel.encode())
            digest.update(len(body).to_bytes(8, "big") + body)
        return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def root_fingerprint(root_json: bytes) -> str:
    """SHA-256 (hex) of a TUF root's canonical signed bytes (its ``signed`` part in
    canonical JSON): the same for any serialization of the same root. `sgw releases keys
    init` and `sgw activate` print it, so an operator can compare the two."""
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization.json import CanonicalJSONSerializer

    try:
        root = Metadata[Root].from_bytes(root_json)
    except Exception as e:  # tuf's DeserializationError and what it wraps
        raise ManifestError(f"not TUF root metadata: {e}") from e
    return hashlib.sha256(CanonicalJSONSerializer().serialize(root.signed)).hexdigest()


def host_platform() -> str:
    """The platform a slot built here runs on, e.g. ``linux-x86_64``."""
    return f"{sys.platform}-{platform.machine()}"


def swappable_from(reads: tuple[int, ...], first_versions: dict[int, str]) -> str:
    """The specifier of the versions that write a handover record in ``reads``:
    ``>=`` the first release that wrote the oldest of them (``first_versions``)."""
    oldest = min(reads)
    return f">={first_versions[oldest]}"


# The first release that wrote each handover record version (sgw.gateway.handover.record).
# A new record version adds its first release here.
HANDOVER_FIRST_RELEASE = {1: "0.1.0"}


def make_manifest(slot_dir: str, version: str, revision: str, reads: tuple[int, ...]) -> Manifest:
    """The manifest of the slot at ``slot_dir`` as built on this host."""
    return Manifest(
        version=version,
        revision=revision,
        swappable_from=swappable_from(reads, HANDOVER_FIRST_RELEASE),
        handover_versions=tuple(sorted(reads)),
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        platform=host_platform(),
        tree_sha256=tree_digest(slot_dir),
    )


def _main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(
            "usage: python -m sgw.common.releases SLOT_DIR VERSION REVISION READS (e.g. 1,2)",
            file=sys.stderr,
        )
        return 2
    slot, version, revision, reads = argv
    manifest = make_manifest(slot, version, revision, tuple(int(r) for r in reads.split(",")))
    Path(slot, MANIFEST_NAME).write_bytes(manifest.dumps())
    os.chmod(Path(slot, MANIFEST_NAME), 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
