"""The CHAP credentials of the gateway's volumes, as the provider's console set them.

``DATA_DIR/chap.json`` (mode 0600, replaced atomically) maps each volume name to its
initiators' secrets; the LIO layer reads it to configure each target's ACLs (DESIGN.md
section 2). The secrets are in the clear because LIO needs them so; the file is refused
if anyone but its owner may read it. The provider keeps them encrypted and hands them
only to the volume's gateway (a signed request).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

from sgw.common.errors import ConfigError
from sgw.common.files import write_atomically

CHAP_FILE = "chap.json"


@dataclass(frozen=True)
class ChapCredential:
    """One initiator's credentials on a volume (``target_secret``: mutual CHAP)."""

    initiator: str
    secret: str
    target_secret: str | None = None


class ChapStore:
    """Reads and replaces ``chap.json`` (blocking: call it from a worker thread)."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, CHAP_FILE)

    def load(self) -> dict[str, list[ChapCredential]]:
        """Every volume's credentials (an empty map before the first is set)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"{self.path} holds CHAP secrets and has mode {mode:04o}; restrict it: "
                    f"chmod 600 {self.path}"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                doc: dict[str, Any] = json.load(f)
        except ValueError as exc:
            raise ConfigError(f"{self.path} is damaged ({exc}); delete it and sync again") from exc
        finally:
            os.close(fd)
        return {
            str(vol): [ChapCredential(**c) for c in creds]
            for vol, creds in doc.get("volumes", {}).items()
        }

    def replace(self, volume: str, credentials: list[ChapCredential]) -> None:
        """Sets the volume's credentials (none: the volume has no CHAP)."""
        doc = self.load()
        if credentials:
            doc[volume] = sorted(credentials, key=lambda c: c.initiator)
        else:
            doc.pop(volume, None)
        self._save(doc)

    def remove_volume(self, volume: str) -> None:
        doc = self.load()
        if doc.pop(volume, None) is not None:
            self._save(doc)

    def _save(self, doc: dict[str, list[ChapCredential]]) -> None:
        data = {"volumes": {v: [asdict(c) for c in creds] for v, creds in sorted(doc.items())}}
        write_atomically(self.path, json.dumps(data, indent=2).encode() + b"\n", 0o600)
        os.chmod(self.path, 0o600)
