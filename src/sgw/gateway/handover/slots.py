"""Release slots: ``<root>/releases/<version>`` directories, one per installed release, and
``<root>/current``, the symlink the service starts (``/opt/sgw`` on the appliance).

``make_current`` is the one way ``current`` moves: blue calls it once a swap succeeded
(sgw.gateway.handover.swap), so that a restart (a crash, a reboot) starts the release that
serves; the previous slot stays for a rollback. The update agent reuses it."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

LOG = logging.getLogger(__name__)

RELEASES = "releases"
CURRENT = "current"


@dataclass(frozen=True)
class CurrentSwitch:
    """What ``make_current`` did: ``link`` (``<root>/current``) now names ``release``, it
    named ``previous`` before; or, with ``switched`` False, why it was left alone."""

    switched: bool
    link: str | None
    release: str
    previous: str | None
    reason: str

    def describe(self) -> dict[str, object]:
        return {
            "switched": self.switched,
            "link": self.link,
            "release": self.release,
            "previous": self.previous,
            "reason": self.reason,
        }


def slot_root(release: str) -> str | None:
    """``<root>`` if ``release`` is the slot ``<root>/releases/<version>``, else None."""
    path = os.path.abspath(release)
    parent = os.path.dirname(path)
    if os.path.basename(parent) != RELEASES:
        return None
    return os.path.dirname(parent)


def make_current(release: str) -> CurrentSwitch:
    """Points ``<root>/current`` at the slot ``release`` (``<root>/releases/<version>``),
    atomically: a new symlink under a temporary name replaces the old one (rename), then
    the directory is made durable. Leaves it alone, saying why, when ``release`` is not a
    slot or ``<root>/current`` is not a symlink (a release run from elsewhere: a checkout,
    a test). Never raises: the swap it follows has happened whatever this does."""
    path = os.path.abspath(release)
    root = slot_root(path)
    if root is None or not os.path.isdir(path):
        return CurrentSwitch(
            False, None, path, None, f"{path} is not a release slot (<root>/{RELEASES}/<version>)"
        )
    link = os.path.join(root, CURRENT)
    if not os.path.islink(link):
        return CurrentSwitch(
            False, None, path, None, f"{link} is not a symlink: it names no release slot"
        )
    previous = os.readlink(link)
    tmp = os.path.join(root, f".{CURRENT}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        LOG.error("release slots: cannot point %s at %s (kept %s): %s", link, path, previous, exc)
        return CurrentSwitch(False, link, path, previous, f"cannot switch {link}: {exc}")
    LOG.info("release slots: %s -> %s (was %s)", link, path, previous)
    return CurrentSwitch(True, link, path, previous, "")
