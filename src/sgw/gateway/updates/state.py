"""The update agent's persistent state: ``<data_dir>/updates/agent.json``, rewritten
atomically (temp file, fsync, rename) at every step, so that an agent killed at any point
resumes from the last step it recorded, with the reports it has not sent yet."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sgw.common.files import write_atomically

LOG = logging.getLogger(__name__)

STATE_FILE = "agent.json"
# The states of one release's update (the reports' "state" field), and "idle": none.
IDLE = "idle"
STATES = (
    "downloading",
    "verified",
    "installed",
    "waiting",
    "swapping",
    "done",
    "failed",
    "refused",
)
# Reports kept while the provider cannot be reached: the oldest go first beyond this.
MAX_PENDING_REPORTS = 200


@dataclass
class AgentState:
    """Where the update of ``version`` (the release the provider wants) stands.

    ``manifest`` and ``severity`` are what the trust verified (kept so that a waiting,
    installed slot is re-checked against them without downloading again); ``reports``
    are the reports not yet accepted by the provider, oldest first."""

    state: str = IDLE
    version: str | None = None
    from_version: str | None = None
    severity: str | None = None
    manifest: dict[str, Any] | None = None
    reason: str | None = None
    message: str | None = None
    pause_s: float | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What the agent's ``status`` answers."""
        out = asdict(self)
        out.pop("manifest")
        out["pending_reports"] = len(out.pop("reports"))
        return out


def state_path(data_dir: str) -> str:
    return os.path.join(data_dir, "updates", STATE_FILE)


def load(path: str) -> AgentState:
    """The stored state; a fresh one if there is none. A damaged file (it cannot be, short
    of a disk fault: it is replaced atomically) is set aside and a fresh state begins."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
        return AgentState(**doc)
    except FileNotFoundError:
        return AgentState()
    except (ValueError, TypeError) as exc:
        aside = f"{path}.damaged"
        os.replace(path, aside)
        LOG.error("update agent: state file %s is damaged (%s): moved to %s", path, exc, aside)
        return AgentState()


def save(path: str, state: AgentState) -> None:
    """Writes the state atomically (0600: it names what the gateway runs)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    del state.reports[:-MAX_PENDING_REPORTS]
    write_atomically(path, json.dumps(asdict(state), indent=1).encode() + b"\n", 0o600)
