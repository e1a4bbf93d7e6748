"""Release slots installed from verified bundles: unpacked beside the others under a hidden
name, checked against the manifest's tree digest, made durable, then renamed into place,
so that ``<root>/releases/<version>`` exists only whole and checked.

A bundle (``sgw-<version>.tar.zst``) is a zstd tar of ``opt/sgw/releases/<version>/...``
(image/build-release). Only regular files, directories and symbolic links under that
prefix are accepted (a virtualenv's ``bin/python`` is a link to the system's Python);
nothing is written through a link the bundle made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

import zstandard

from sgw.common.files import fsync_directory
from sgw.common.releases import MANIFEST_NAME, tree_digest
from sgw.gateway.updates import faults
from sgw.gateway.updates.trust import UpdateRefused, VerifiedRelease

LOG = logging.getLogger(__name__)

RELEASES = "releases"
PARTIAL_SUFFIX = ".partial"


def slot_path(root: str, version: str) -> Path:
    """``<root>/releases/<version>``."""
    return Path(root) / RELEASES / version


def partial_path(root: str, version: str) -> Path:
    """Where a slot is unpacked before it is checked: ``<root>/releases/.<version>.partial``."""
    return Path(root) / RELEASES / f".{version}{PARTIAL_SUFFIX}"


def remove_partials(root: str) -> list[str]:
    """Removes the half-unpacked slots an interrupted install left; their names."""
    releases = Path(root) / RELEASES
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(releases.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(entry)
                removed.append(entry.name)
    if removed:
        fsync_directory(str(releases / "x"))
        LOG.info("update agent: removed interrupted installs", extra={"partials": removed})
    return removed


def slot_is_intact(root: str, version: str, tree_sha256: str) -> bool:
    """True if the installed slot's files still have the digest its manifest promised."""
    slot = slot_path(root, version)
    return slot.is_dir() and not slot.is_symlink() and tree_digest(slot) == tree_sha256


def install(root: str, release: VerifiedRelease) -> Path:
    """Installs ``release`` into its slot (idempotent: an intact slot is kept, a damaged
    one replaced); the slot's path. UpdateRefused("tampered") if the unpacked tree is not
    what the manifest says."""
    version, manifest = release.version, release.manifest
    slot = slot_path(root, version)
    if slot_is_intact(root, version, manifest.tree_sha256):
        return slot
    if slot.exists() or slot.is_symlink():
        LOG.warning("update agent: slot %s is damaged: installing it again", slot)
        _remove(slot)
    partial = partial_path(root, version)
    _remove(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir(mode=0o755)
    try:
        _unpack(release.bundle, version, partial)
        digest = tree_digest(partial)
        if digest != manifest.tree_sha256:
            raise UpdateRefused(
                "tampered",
                f"release {version}: the unpacked files do not match the signed manifest "
                f"(tree digest {digest[:12]}..., expected {manifest.tree_sha256[:12]}...)",
            )
        _fsync_tree(partial)
    except BaseException:
        _remove(partial)
        raise
    os.rename(partial, slot)
    fsync_directory(str(slot))
    LOG.info("update agent: release installed", extra={"release": version, "slot": str(slot)})
    return slot


def _unpack(bundle: Path, version: str, dest: Path) -> None:
    prefix = PurePosixPath("opt/sgw/releases", version)
    links: set[PurePosixPath] = set()
    files = 0
    with open(bundle, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    rel = _member_path(member.name, prefix, version)
                    if rel is None:
                        continue
                    if any(parent in links for parent in rel.parents):
                        raise UpdateRefused(
                            "tampered", f"release {version}: {member.name} lies under a link"
                        )
                    target = dest / rel
                    if member.isdir():
                        target.mkdir(mode=0o755, parents=True, exist_ok=True)
                        os.chmod(target, member.mode & 0o755)
                    elif member.issym():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.symlink(member.linkname, target)
                        links.add(rel)
                    elif member.isreg():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        source = tar.extractfile(member)
                        assert source is not None
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "wb") as out:
                            shutil.copyfileobj(source, out, 1 << 20)
                        os.chmod(target, member.mode & 0o755)
                        files += 1
                        if files == 1:
                            faults.hit("unpacking")
                    else:
                        raise UpdateRefused(
                            "tampered",
                            f"release {version}: {member.name} is neither a file, a directory "
                            "nor a symbolic link",
                        )
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise UpdateRefused(
                "tampered", f"release {version}: the bundle is not a readable archive: {exc}"
            ) from exc
    if not (dest / MANIFEST_NAME).is_file():
        raise UpdateRefused("tampered", f"release {version}: the bundle holds no {MANIFEST_NAME}")


def _member_path(name: str, prefix: PurePosixPath, version: str) -> PurePosixPath | None:
    """The member's path inside the slot; None for the slot itself and its parents."""
    path = PurePosixPath(name.removeprefix("./"))
    if path.is_absolute() or ".." in path.parts:
        raise UpdateRefused("tampered", f"release {version}: bad member path {name!r}")
    if path == prefix or path in prefix.parents:
        return None
    if prefix not in path.parents:
        raise UpdateRefused(
            "tampered", f"release {version}: {name!r} is outside {prefix}/ (another release?)"
        )
    return path.relative_to(prefix)


def _fsync_tree(top: Path) -> None:
    """Makes every file and directory under ``top`` durable (before the rename)."""
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
