"""What the control channel must not forget across a crash: which commands the gateway
took (by idempotency key, so each runs once however often it is delivered), which one
was running, and the replies the provider has not accepted yet.

``DATA_DIR/control/journal.json`` (mode 0600, replaced atomically: temp file, fsync,
rename, fsync of the directory) maps each idempotency key to its command's id, state
(``received``: taken, not started; ``running``; ``done``) and time. ``DATA_DIR/control/
outbox/ID.json`` holds one reply each until the provider accepted it (a reply may carry
a diagnostics bundle of some MiB, so each is a file of its own). A reply is written
before the journal says ``done``; a crash in between leaves both, which means done.

After a restart, ``received`` commands run (they never started); a ``running`` one was
cut off and its effect is unknown, so it is answered as failed rather than run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from sgw.common.files import write_atomically

LOG = logging.getLogger(__name__)

DIRECTORY = "control"
JOURNAL_FILE = "journal.json"
OUTBOX = "outbox"
RECEIVED = "received"
RUNNING = "running"
DONE = "done"
# Finished keys are remembered this long and at most this many (newest kept): far longer
# than the provider keeps delivering a command (its deadline plus a few minutes).
KEEP_S = 7 * 86400.0
KEEP_MAX = 20_000
INTERRUPTED = (
    "the gateway stopped while it ran this command, so its effect is unknown; check the "
    "gateway's state (sgw gateways local-state) and send it again if needed"
)


@dataclass(frozen=True)
class Command:
    """A command as the provider sent it."""

    id: str
    type: str
    args: dict[str, Any]
    key: str
    expires: float  # Unix time after which it must not start


@dataclass(frozen=True)
class Reply:
    """A command's outcome, kept until the provider accepted it."""

    id: str
    status: str  # succeeded or failed
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ControlJournal:
    """The durable record of commands taken and replies not yet accepted."""

    def __init__(self, data_dir: str, *, clock: Any = time.time) -> None:
        self.directory = os.path.join(data_dir, DIRECTORY)
        self.path = os.path.join(self.directory, JOURNAL_FILE)
        self.outbox_dir = os.path.join(self.directory, OUTBOX)
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._commands: dict[str, Command] = {}  # received, not finished (by key)
        self._outbox: dict[str, Reply] = {}
        self._lock = asyncio.Lock()

    # -- loading -------------------------------------------------------------------------

    def load(self) -> tuple[list[Command], list[Reply]]:
        """Reads the journal and the outbox (blocking). Returns the commands to run (taken
        before a restart, never started) and replies made for commands cut off while
        running (already in the outbox)."""
        os.makedirs(self.outbox_dir, mode=0o700, exist_ok=True)
        try:
            with open(self.path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as exc:
            LOG.error("control journal unreadable, starting a new one: %s", exc)
            doc = {}
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, dict):
            if doc:
                LOG.error("control journal malformed, starting a new one")
            keys = {}
        self._keys = {str(k): v for k, v in keys.items() if isinstance(v, dict)}
        for name in os.listdir(self.outbox_dir):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.outbox_dir, name), "rb") as f:
                    reply = Reply(**json.load(f))
            except (OSError, ValueError, TypeError) as exc:
                LOG.error("control outbox: unreadable reply %s dropped: %s", name, exc)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.outbox_dir, name))
                continue
            self._outbox[reply.id] = reply
        to_run: list[Command] = []
        cut_off: list[Reply] = []
        for key, entry in self._keys.items():
            if entry.get("state") == DONE or entry.get("id") in self._outbox:
                entry["state"] = DONE
                continue
            if entry.get("state") == RUNNING:
                reply = Reply(str(entry["id"]), "failed", None, INTERRUPTED)
                self._write_reply(reply)
                self._outbox[reply.id] = reply
                entry["state"] = DONE
                cut_off.append(reply)
            elif isinstance(entry.get("command"), dict):
                cmd = Command(**entry["command"])
                self._commands[key] = cmd
                to_run.append(cmd)
        self._save()
        return to_run, cut_off

    # -- commands ------------------------------------------------------------------------

    async def admit(self, commands: list[Command]) -> tuple[list[Command], list[Command]]:
        """Records the new commands durably before they are acknowledged; returns them
        and the duplicates (delivered again, taken before: they are not run again)."""
        new: list[Command] = []
        dups: list[Command] = []
        async with self._lock:
            for cmd in commands:
                if cmd.key in self._keys or any(c.key == cmd.key for c in new):
                    dups.append(cmd)
                    continue
                new.append(cmd)
            if new:
                now = self._clock()
                for cmd in new:
                    self._keys[cmd.key] = {
                        "id": cmd.id,
                        "state": RECEIVED,
                        "at": now,
                        "command": asdict(cmd),
                    }
                    self._commands[cmd.key] = cmd
                await asyncio.to_thread(self._save, self._encode())
        return new, dups

    async def start(self, cmd: Command) -> None:
        """Records that the command runs now (a crash from here on fails it)."""
        async with self._lock:
            entry = self._keys.setdefault(cmd.key, {"id": cmd.id, "at": self._clock()})
            entry["state"] = RUNNING
            entry.pop("command", None)
            await asyncio.to_thread(self._save, self._encode())

    async def finish(self, cmd: Command, reply: Reply) -> None:
        """Keeps the reply in the outbox, then records the command as done."""
        async with self._lock:
            await asyncio.to_thread(self._write_reply, reply)
            self._outbox[reply.id] = reply
            entry = self._keys.setdefault(cmd.key, {"id": cmd.id, "at": self._clock()})
            entry["state"] = DONE
            entry["status"] = reply.status
            entry.pop("command", None)
            self._commands.pop(cmd.key, None)
            self._prune()
            await asyncio.to_thread(self._save, self._encode())

    def state(self, key: str) -> str | None:
        """``received``, ``running``, ``done`` or None (never seen)."""
        entry = self._keys.get(key)
        return None if entry is None else str(entry.get("state"))

    # -- outbox --------------------------------------------------------------------------

    def outbox(self, limit_bytes: int = 8 << 20) -> list[Reply]:
        """Replies to send, oldest first, about ``limit_bytes`` of them at most (one at
        least)."""
        out: list[Reply] = []
        size = 0
        for reply in self._outbox.values():
            n = len(json.dumps(reply.result)) if reply.result else 0
            if out and size + n > limit_bytes:
                break
            out.append(reply)
            size += n
        return out

    @property
    def unsent(self) -> int:
        return len(self._outbox)

    async def sent(self, ids: list[str]) -> None:
        """Forgets replies the provider accepted (or refused for good)."""
        async with self._lock:
            for reply_id in ids:
                if self._outbox.pop(reply_id, None) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        await asyncio.to_thread(os.unlink, self._reply_path(reply_id))

    # -- files ---------------------------------------------------------------------------

    def _reply_path(self, reply_id: str) -> str:
        safe = "".join(c for c in reply_id if c.isalnum() or c == "-")[:64] or "reply"
        return os.path.join(self.outbox_dir, f"{safe}.json")

    def _write_reply(self, reply: Reply) -> None:
        os.makedirs(self.outbox_dir, mode=0o700, exist_ok=True)
        write_atomically(self._reply_path(reply.id), json.dumps(reply.to_json()).encode())

    def _prune(self) -> None:
        cutoff = self._clock() - KEEP_S
        done = [(e.get("at", 0.0), k) for k, e in self._keys.items() if e.get("state") == DONE]
        drop = {k for at, k in done if at < cutoff}
        if len(done) - len(drop) > KEEP_MAX:
            keep = sorted((x for x in done if x[1] not in drop), reverse=True)[:KEEP_MAX]
            drop |= {k for _at, k in done} - {k for _at, k in keep}
        for k in drop:
            del self._keys[k]

    def _encode(self) -> bytes:
        return json.dumps({"version": 1, "keys": self._keys}).encode()

    def _save(self, data: bytes | None = None) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        write_atomically(self.path, data if data is not None else self._encode())
