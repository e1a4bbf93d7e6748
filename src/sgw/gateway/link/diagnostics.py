"""A diagnostics bundle for support: the gateway's recent logs, state and configuration,
as a tar.gz, without secrets.

It holds ``status.json`` (what ``sgw gateway status`` shows), ``config.json`` (the
running configuration), ``volumes.json`` (the volume registry without restore tokens),
``control.json`` (the control channel's counters), ``system.json`` (versions, memory,
disk space) and ``logs.jsonl`` (the newest log lines, from memory). Never in it: the
identity key, the credentials, CHAP secrets, the control journal's commands.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import tarfile
import time
from typing import Any

from sgw import version
from sgw.common.logs import JsonFormatter

# Newest log lines kept in memory for a bundle (about 300 bytes each).
LOG_LINES = 5000
# Largest bundle (bytes, compressed): the reply carries it base64-encoded.
MAX_BUNDLE = 8 << 20
_SECRET_KEY = re.compile(r"secret|password|token|private", re.IGNORECASE)


class LogRing(logging.Handler):
    """Keeps the newest ``capacity`` log lines (JSON, as on standard error)."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never break the caller
            self.handleError(record)


def system_info(data_dir: str, started: float) -> dict[str, Any]:
    """Versions, process and disk facts."""
    disk = shutil.disk_usage(data_dir)
    return {
        "sgw_version": version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 1),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "data_dir": data_dir,
        "data_dir_free_bytes": disk.free,
        "data_dir_total_bytes": disk.total,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def redact(doc: Any) -> Any:
    """``doc`` with the value of every key that names a secret replaced (a safety net:
    nothing put in a bundle is meant to hold one)."""
    if isinstance(doc, dict):
        return {
            k: "<redacted>" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in doc.items()
        }
    if isinstance(doc, list | tuple):
        return [redact(v) for v in doc]
    return doc


def build_bundle(files: dict[str, Any], logs: list[str]) -> bytes:
    """A tar.gz of ``files`` (name -> JSON-able document, redacted) and ``logs.jsonl``;
    the oldest log lines are left out if the bundle would exceed ``MAX_BUNDLE``."""
    files = {name: redact(doc) for name, doc in files.items()}
    while True:
        data = _tar(files, logs)
        if len(data) <= MAX_BUNDLE or not logs:
            return data
        logs = logs[len(logs) // 2 :]


def _tar(files: dict[str, Any], logs: list[str]) -> bytes:
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        entries = {
            name: json.dumps(doc, indent=2, default=str).encode() for name, doc in files.items()
        }
        entries["logs.jsonl"] = ("\n".join(logs) + "\n").encode() if logs else b""
        for name, data in entries.items():
            info = tarfile.TarInfo(f"sgw-diagnostics/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
