"""Snapshot requests: markers in the write log and what the gateway knows of each.

A snapshot is requested by appending a marker record (``KIND_SNAPSHOT``) for the volume to
the write log and making it durable; the snapshot is exactly the volume as of that record,
whatever is written after it. The destager never lets a batch cross a marker: the batch
that ends at it is uploaded as one point in time, committed, and then the provider is asked
to make the snapshot of the map at that commit's version. The marker names the snapshot
(a UUID chosen here), so the id is known at once and a retry after a crash or a lost reply
asks for the same snapshot again rather than making a second one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import uuid
from dataclasses import dataclass, field

from sgw.common.errors import VolumeStateError

LOG = logging.getLogger(__name__)

# Room for the marker's JSON: an id and a description of up to 255 characters.
MAX_MARKER_BYTES = 2048
MAX_DESCRIPTION = 255


class SnapshotState(enum.StrEnum):
    """Where a requested snapshot is."""

    PENDING = "PENDING"  # the marker is in the write log
    COMPLETED = "COMPLETED"  # the provider holds the snapshot
    FAILED = "FAILED"  # it cannot be made (see ``error``); the marker is gone


@dataclass
class SnapshotRequest:
    """One requested snapshot of a volume."""

    id: str
    volume: str
    description: str | None
    seq: int  # the marker's log sequence number
    state: SnapshotState = SnapshotState.PENDING
    error: str = ""
    _done: asyncio.Event | None = field(default=None, repr=False)

    def finish(self, state: SnapshotState, error: str = "") -> None:
        """Records the outcome (once) and wakes whoever waits for it."""
        if self.state != SnapshotState.PENDING:
            return
        self.state, self.error = state, error
        if self._done is not None:
            self._done.set()
        level = logging.INFO if state == SnapshotState.COMPLETED else logging.WARNING
        LOG.log(
            level,
            "snapshot %s",
            state.lower(),
            extra={"snapshot": self.id, "volume": self.volume, "error": error or None},
        )

    async def wait(self) -> SnapshotState:
        """Waits until the snapshot is completed or failed."""
        if self.state == SnapshotState.PENDING:
            if self._done is None:
                self._done = asyncio.Event()
            await self._done.wait()
        return self.state

    def describe(self) -> dict[str, object]:
        """The request as plain data (admin socket, status)."""
        return {
            "snapshot_id": self.id,
            "volume": self.volume,
            "description": self.description,
            "state": str(self.state),
            "error": self.error or None,
        }


def new_snapshot_id() -> str:
    """A fresh snapshot id."""
    return str(uuid.uuid4())


def encode_marker(snapshot_id: str, description: str | None) -> bytes:
    """The payload of a marker record."""
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise VolumeStateError(
            f"snapshot description is {len(description)} characters; at most "
            f"{MAX_DESCRIPTION} are allowed"
        )
    payload = json.dumps({"id": snapshot_id, "description": description}).encode()
    if len(payload) > MAX_MARKER_BYTES:
        raise VolumeStateError("snapshot description is too long for a log marker")
    return payload


def decode_marker(payload: bytes) -> tuple[str, str | None]:
    """``(snapshot_id, description)`` from a marker's payload."""
    try:
        doc = json.loads(payload)
        snapshot_id = str(uuid.UUID(str(doc["id"])))
        description = doc.get("description")
        return snapshot_id, None if description is None else str(description)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VolumeStateError(f"a snapshot marker in the write log is unreadable: {exc}") from exc
