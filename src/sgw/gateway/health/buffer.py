"""The health reports waiting for the provider: a bounded buffer on the gateway's disk.

``DATA_DIR/health/reports.jsonl`` holds one report per line, appended and fsynced;
``state.json`` (written atomically) holds the next ``seq`` and the count of reports
dropped. A report's ``seq`` is taken from the state before the report is written, so it
only grows, across restarts and crashes too (a crash in between leaves a gap, never a
repeat). A torn last line (kill -9 or power loss during an append) is cut off when the
buffer is opened. Past ``max_reports`` or ``max_bytes`` the oldest tenth is dropped
(counted in ``dropped``): the newest state of a gateway matters most. Reports the
provider accepted are forgotten (``forget_through``) by rewriting the file atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from sgw.common.files import fsync_directory, write_atomically

LOG = logging.getLogger(__name__)

DIR_NAME = "health"
REPORTS_FILE = "reports.jsonl"
STATE_FILE = "state.json"
# A week of reports at the default 60 s interval, and a cap in bytes in case reports
# grow (many volumes): what waits for an unreachable provider stays bounded on disk and
# in memory.
MAX_REPORTS = 10_000
MAX_BYTES = 50 << 20


@dataclass
class _Entry:
    seq: int
    line: bytes  # the report's JSON and its newline


class ReportBuffer:
    """Reports by ``seq``, oldest first, kept until the provider accepted them."""

    def __init__(
        self, data_dir: str, *, max_reports: int = MAX_REPORTS, max_bytes: int = MAX_BYTES
    ) -> None:
        self.dir = os.path.join(data_dir, DIR_NAME)
        self.path = os.path.join(self.dir, REPORTS_FILE)
        self.state_path = os.path.join(self.dir, STATE_FILE)
        self.max_reports = max_reports
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []
        self._bytes = 0
        self.next_seq = 0
        self.dropped = 0  # reports dropped past the cap, since the buffer was made
        self.skipped = 0  # unreadable lines cut off when opened (a torn tail)
        self._load()

    # -- reading --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def pending(self, limit: int) -> list[dict[str, object]]:
        """The oldest ``limit`` reports not yet accepted, as JSON documents."""
        return [json.loads(e.line) for e in self._entries[:limit]]

    def seqs(self) -> list[int]:
        return [e.seq for e in self._entries]

    # -- writing --------------------------------------------------------------------

    def take_seq(self) -> int:
        """The next report's ``seq``, made durable before it is used."""
        seq = self.next_seq
        self.next_seq = seq + 1
        self._save_state()
        return seq

    def append(self, seq: int, doc: dict[str, object]) -> None:
        """Adds a report (its ``seq`` from ``take_seq``) durably; drops the oldest past
        the cap."""
        line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._entries.append(_Entry(seq, line))
        self._bytes += len(line)
        if len(self._entries) > self.max_reports or self._bytes > self.max_bytes:
            # A tenth at once (not one per append once full), more if the bytes need it;
            # the newest report always stays.
            over = max(1, len(self._entries) // 10)
            kept = self._bytes - sum(len(e.line) for e in self._entries[:over])
            while kept > self.max_bytes and over < len(self._entries) - 1:
                kept -= len(self._entries[over].line)
                over += 1
            self.dropped += over
            self._bytes = kept
            LOG.warning(
                "health reports dropped: the buffer is full (the provider has not accepted "
                "reports for a long time)",
                extra={"dropped": over, "oldest_kept": self._entries[over].seq},
            )
            self._entries = self._entries[over:]
            self._rewrite()
            self._save_state()

    def forget_through(self, seq: int) -> int:
        """Forgets every report up to ``seq`` (the provider holds them); how many."""
        n = 0
        while n < len(self._entries) and self._entries[n].seq <= seq:
            n += 1
        if n:
            self._entries = self._entries[n:]
            self._rewrite()
        return n

    def drop_through(self, seq: int) -> int:
        """Drops every report up to ``seq`` unsent (the provider refused them), counted
        in ``dropped``; how many."""
        n = self.forget_through(seq)
        if n:
            self.dropped += n
            self._save_state()
        return n

    # -- files ----------------------------------------------------------------------

    def _load(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        try:
            with open(self.state_path, "rb") as f:
                state = json.load(f)
            self.next_seq = int(state.get("next_seq", 0))
            self.dropped = int(state.get("dropped", 0))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            LOG.error("health buffer state %s unreadable: %s", self.state_path, exc)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        good = 0  # bytes of whole lines
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                self.skipped += 1  # a torn last line: never acknowledged, cut off below
                break
            try:
                doc = json.loads(raw)
                seq = int(doc["seq"])
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
                good += len(raw)
                continue
            self._entries.append(_Entry(seq, raw))
            self._bytes += len(raw)
            good += len(raw)
            self.next_seq = max(self.next_seq, seq + 1)
        if self.skipped:
            LOG.warning(
                "health buffer: unreadable reports skipped (torn by a crash)",
                extra={"skipped": self.skipped, "path": self.path},
            )
            self._rewrite()
        elif good != len(data):  # pragma: no cover - splitlines covers every byte
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(e.line for e in self._entries))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_directory(self.path)

    def _save_state(self) -> None:
        doc = {"next_seq": self.next_seq, "dropped": self.dropped}
        write_atomically(self.state_path, json.dumps(doc).encode())
