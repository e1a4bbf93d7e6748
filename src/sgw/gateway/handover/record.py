"""The versioned handover record: what the running daemon (blue) hands its successor
(green) besides the file descriptors.

Green reads it only if it knows the version (``READS``); blue asks first, so a green that
cannot read blue's record is refused before anything pauses. A new field that an older
green may ignore keeps the version; a change of meaning takes a new version, and a
release keeps reading the previous one for at least one release.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

from sgw.common.errors import HandoverError
from sgw.gateway.nbd.state import HANDSHAKE, TRANSMISSION, ConnectionState, ListenerState
from sgw.gateway.volume.wal import LogState

VERSION = 1
# The record versions this release reads.
READS = (1,)


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot request blue knows about (its marker may already be destaged)."""

    snapshot_id: str
    volume: str
    description: str | None
    seq: int
    state: str
    error: str | None = None


@dataclass(frozen=True)
class HandoverRecord:
    """Everything green needs to carry on exactly where blue stopped."""

    version: int
    blue_pid: int
    blue_version: str
    fenced_at: float  # time.monotonic() when blue stopped reading (same clock for green)
    log: LogState
    connections: list[ConnectionState]
    listeners: list[ListenerState]
    snapshots: list[SnapshotRecord]
    lock_fd: int
    # Kernel NBD devices by volume (/dev/nbdN), for the iSCSI export to adopt as they are.
    devices: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["log"]["skips"] = [[a, b] for a, b in self.log.skips.items()]
        for conn in doc["connections"]:
            conn["pending"] = _b64(conn["pending"])
            conn["handshake_in"] = _b64(conn["handshake_in"])
            conn["contexts"] = [[k, v] for k, v in conn["contexts"].items()]
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> HandoverRecord:
        """The record, or HandoverError naming what is wrong (a version this release does
        not read, a missing or mistyped field)."""
        if not isinstance(doc, dict):
            raise HandoverError("the handover record is not an object")
        version = doc.get("version")
        if version not in READS:
            raise HandoverError(
                f"handover record version {version!r} is not one this release reads "
                f"({', '.join(map(str, READS))})"
            )
        try:
            log = dict(doc["log"])
            skips = {int(a): int(b) for a, b in log.pop("skips")}
            return cls(
                version=int(version),
                blue_pid=int(doc["blue_pid"]),
                blue_version=str(doc["blue_version"]),
                fenced_at=float(doc["fenced_at"]),
                log=LogState(**{k: int(v) for k, v in log.items()}, skips=skips),
                connections=[_connection(c) for c in doc["connections"]],
                listeners=[
                    ListenerState(int(x["fd"]), str(x["role"]), str(x["address"]))
                    for x in doc["listeners"]
                ],
                snapshots=[_snapshot(s) for s in doc["snapshots"]],
                lock_fd=int(doc["lock_fd"]),
                devices={str(k): str(v) for k, v in dict(doc.get("devices", {})).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HandoverError(f"the handover record is malformed: {exc!r}") from exc


def _connection(c: Any) -> ConnectionState:
    phase = str(c["phase"])
    if phase not in (HANDSHAKE, TRANSMISSION):
        raise ValueError(f"connection phase {phase!r}")
    return ConnectionState(
        fd=int(c["fd"]),
        phase=phase,
        peer=str(c["peer"]),
        export=None if c.get("export") is None else str(c["export"]),
        structured=bool(c["structured"]),
        contexts={int(k): str(v) for k, v in c["contexts"]},
        pending=base64.b64decode(c["pending"], validate=True),
        handshake_in=base64.b64decode(c["handshake_in"], validate=True),
        device=None if c.get("device") is None else str(c["device"]),
    )


def _snapshot(s: Any) -> SnapshotRecord:
    return SnapshotRecord(
        snapshot_id=str(s["snapshot_id"]),
        volume=str(s["volume"]),
        description=None if s.get("description") is None else str(s["description"]),
        seq=int(s["seq"]),
        state=str(s["state"]),
        error=None if s.get("error") is None else str(s["error"]),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
