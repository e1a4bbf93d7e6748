"""INTERIM: minimal stand-ins for what parts A and B of issue 17 deliver, under the
contract's names, so that the update agent (part C) is built and tested before they land.

At the merge, delete this module and import instead:
- ``Manifest``, ``tree_digest``: from ``sgw.common.releases`` (part A);
- ``UpdateRefused``, ``VerifiedRelease``: from ``sgw.gateway.updates.trust`` (part A);
- ``Window``: from ``sgw.common.maintenance`` (part B: its DST and month-end rules are
  the real ones; this one only handles the plain case, see ``Window.is_open``).

Only ``sgw.gateway.updates.agent``, ``.install`` and the tests import it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sgw.common.errors import SgwError

# The reasons a release is refused (the contract's list).
REFUSAL_REASONS = (
    "tampered",
    "rollback",
    "expired",
    "untrusted",
    "revoked",
    "not-found",
    "incompatible",
    "unreachable",
)


class UpdateRefused(SgwError):  # noqa: N818 - the name issue 17's contract fixed
    """A release was not accepted; ``reason`` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    """A release's manifest (``sgw-release.json`` in its slot)."""

    version: str
    revision: str
    swappable_from: str  # a PEP 440 specifier set, e.g. ">=0.1"
    handover_versions: tuple[int, ...]
    python: str
    platform: str
    tree_sha256: str

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        return cls(
            version=str(doc["version"]),
            revision=str(doc.get("revision", "")),
            swappable_from=str(doc.get("swappable_from", "")),
            handover_versions=tuple(int(v) for v in doc.get("handover_versions", ())),
            python=str(doc.get("python", "")),
            platform=str(doc.get("platform", "")),
            tree_sha256=str(doc["tree_sha256"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "revision": self.revision,
            "swappable_from": self.swappable_from,
            "handover_versions": list(self.handover_versions),
            "python": self.python,
            "platform": self.platform,
            "tree_sha256": self.tree_sha256,
        }


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose bundle the trust verified: ``bundle`` is the local file."""

    version: str
    severity: str
    bundle: Path
    manifest: Manifest


MANIFEST_NAME = "sgw-release.json"


def tree_digest(slot_dir: str | Path) -> str:
    """A deterministic digest of a slot's files: every path (sorted, relative), its kind,
    mode bits and content (a symlink: its target); the manifest itself is left out, as it
    holds the digest."""
    root = Path(slot_dir)
    h = hashlib.sha256()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                entries.append((rel, path))
    for rel, path in sorted(entries):
        st = path.lstat()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {st.st_mode & 0o777:o} {st.st_size}\n".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Window:
    """A maintenance window: weekly (``day`` 0=Monday..6) or monthly (``day`` 1..31, past
    the month's end meaning its last day), starting at ``hour:minute`` local time."""

    kind: str
    day: int
    hour: int
    minute: int
    duration_minutes: int

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Window:
        return cls(
            str(doc["kind"]),
            int(doc["day"]),
            int(doc["hour"]),
            int(doc["minute"]),
            int(doc["duration_minutes"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "day": self.day,
            "hour": self.hour,
            "minute": self.minute,
            "duration_minutes": self.duration_minutes,
        }

    def is_open(self, now: dt.datetime, tz: str) -> bool:
        """True if ``now`` (aware) is inside a window. INTERIM: local start times in a DST
        gap or fold are taken as zoneinfo's fold=0 reading (part B's rule differs)."""
        zone = ZoneInfo(tz)
        local = now.astimezone(zone)
        span = dt.timedelta(minutes=self.duration_minutes)
        # Starts within the last 62 days cover every window still open (at most a month).
        for back in range(62):
            date = local.date() - dt.timedelta(days=back)
            if not self._starts_on(date):
                continue
            start = dt.datetime(
                date.year, date.month, date.day, self.hour, self.minute, tzinfo=zone
            )
            if start <= now < start + span:
                return True
        return False

    def _starts_on(self, date: dt.date) -> bool:
        if self.kind == "weekly":
            return date.weekday() == self.day
        nxt = (date.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        last = (nxt - dt.timedelta(days=1)).day
        return date.day == min(self.day, last)
