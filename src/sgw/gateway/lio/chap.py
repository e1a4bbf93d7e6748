"""The login rules of the gateway's volumes, as the provider's console set them.

``DATA_DIR/chap.json`` (mode 0600, replaced atomically) holds, per volume, the initiators
with CHAP secrets, the initiators allowed without CHAP and the ``open`` flag; the LIO layer
reads it to configure each target (sgw.gateway.lio.access). The secrets are in the clear
because LIO needs them so; the file is refused if anyone but its owner may read it. The
provider keeps them encrypted and hands them only to the volume's gateway (a signed
request)::

    {"version": 2,
     "volumes": {"vol0": [{"initiator": "iqn.1993-08.org.debian:01:host1",
                           "secret": "12-to-16-chars", "target_secret": null}]},
     "initiators": {"vol1": ["iqn.1993-08.org.debian:01:host2"]},
     "open": ["lab0"]}

``volumes`` keeps the meaning it had before format 2 (CHAP credentials), so a file without
``version`` (format 1, written by an older gateway or put on a seed disk) reads as before:
CHAP credentials only, no initiator without CHAP, no volume open by flag.
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
# Format 2 added "initiators" and "open"; a newer format is refused (not misread).
FORMAT = 2


@dataclass(frozen=True)
class ChapCredential:
    """One initiator's credentials on a volume (``target_secret``: mutual CHAP)."""

    initiator: str
    secret: str
    target_secret: str | None = None


@dataclass(frozen=True)
class VolumeRules:
    """One volume's login rules as stored: initiators with CHAP, initiators allowed
    without CHAP, and the open flag (any initiator, no authentication)."""

    chap: tuple[ChapCredential, ...] = ()
    initiators: tuple[str, ...] = ()
    open: bool = False

    @property
    def empty(self) -> bool:
        return not (self.chap or self.initiators or self.open)


class ChapStore:
    """Reads and replaces ``chap.json`` (blocking: call it from a worker thread)."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, CHAP_FILE)

    def load(self) -> dict[str, VolumeRules]:
        """Every volume's rules (an empty map before the first is set); volumes without
        rules are not in it."""
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
        try:
            return self._parse(doc)
        except (TypeError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{self.path} is malformed ({exc}); sync again") from exc

    def _parse(self, doc: dict[str, Any]) -> dict[str, VolumeRules]:
        version = doc.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= FORMAT:
            raise ConfigError(
                f"{self.path} has format {version!r}, newer than this gateway reads "
                f"({FORMAT}); update the gateway"
            )
        chap = {
            str(v): tuple(ChapCredential(**c) for c in creds)
            for v, creds in doc.get("volumes", {}).items()
        }
        plain = {
            str(v): tuple(str(i) for i in names) for v, names in doc.get("initiators", {}).items()
        }
        opened = {str(v) for v in doc.get("open", [])}
        return {
            v: VolumeRules(chap.get(v, ()), plain.get(v, ()), v in opened)
            for v in sorted(set(chap) | set(plain) | opened)
        }

    def replace(self, volume: str, rules: VolumeRules) -> None:
        """Sets the volume's rules (empty rules: the volume has none, it is closed)."""
        doc = self.load()
        if rules.empty:
            doc.pop(volume, None)
        else:
            doc[volume] = VolumeRules(
                tuple(sorted(rules.chap, key=lambda c: c.initiator)),
                tuple(sorted(set(rules.initiators))),
                rules.open,
            )
        self._save(doc)

    def remove_volume(self, volume: str) -> None:
        doc = self.load()
        if doc.pop(volume, None) is not None:
            self._save(doc)

    def _save(self, doc: dict[str, VolumeRules]) -> None:
        data = {
            "version": FORMAT,
            "volumes": {v: [asdict(c) for c in r.chap] for v, r in sorted(doc.items()) if r.chap},
            "initiators": {v: list(r.initiators) for v, r in sorted(doc.items()) if r.initiators},
            "open": sorted(v for v, r in doc.items() if r.open),
        }
        write_atomically(self.path, json.dumps(data, indent=2).encode() + b"\n", 0o600)
        os.chmod(self.path, 0o600)
