"""The console commands' arguments as a gateway receives them: one typed schema that the
provider and the gateway share.

The provider builds what it sends with ``to_args()`` (sgw.provider.control.planner and
the snapshot schedules); the gateway reads it with ``from_args()``, which refuses bad
input with a ``CommandError`` naming the field. Keys a class does not know are ignored,
so a newer provider may add some that an older gateway skips. Gateways and providers of
different versions talk to each other: the keys and their values are a wire format,
changed only compatibly.

| type           | the gateway gets                                          |
|----------------|-----------------------------------------------------------|
| describe       | -                                                         |
| diagnostics    | -                                                         |
| set_bandwidth  | upload, download (each optional; bytes/s, 0: no limit)    |
| snapshot       | volume_id, description, wait, volume                      |
| create_volume  | name, size, mode, volume_id, snapshot_id                  |
| delete_volume  | volume_id, drain, volume                                  |
| sync_chap      | volume_id, volume                                         |
| update         | version (optional), now                                   |
| health_report  | -  (replies {"seq": N, "report": the report's JSON})      |

``volume`` is the volume's name on the gateway, ``volume_id`` its id at the provider. A
volume's name (``name``, ``volume``) is checked against the gateway's rule
(sgw.common.names) by ``from_args`` too: the gateway trusts no name it did not check,
whoever sent it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Self

from sgw.common.errors import CommandError
from sgw.common.names import VOLUME_NAME_HELP, is_volume_name

TYPES = (
    "describe",
    "diagnostics",
    "set_bandwidth",
    "snapshot",
    "create_volume",
    "delete_volume",
    "sync_chap",
    "update",
    "health_report",
)

Mode = Literal["stored", "cached"]
MODES: tuple[Mode, ...] = ("stored", "cached")


class CommandArgs(Protocol):
    """One command's arguments: parsed from what arrives, turned into what is sent."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        """The arguments as received (CommandError naming a missing or bad field)."""
        ...

    def to_args(self) -> dict[str, Any]:
        """The arguments as sent (plain JSON values)."""
        ...


@dataclass(frozen=True, slots=True)
class DescribeArgs:
    """``describe``: the gateway's state; no arguments."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls()

    def to_args(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class DiagnosticsArgs:
    """``diagnostics``: a bundle of logs, state and configuration; no arguments."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls()

    def to_args(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class HealthReportArgs:
    """``health_report``: the gateway samples a health report now, uploads it at once and
    replies with it (sgw.common.health); no arguments."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls()

    def to_args(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class SetBandwidthArgs:
    """``set_bandwidth``: the upload and download limits in bytes/s. None: the limit
    stays as it is (the key is not sent); 0: no limit."""

    upload: int | None = None
    download: int | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls(_rate(args, "upload"), _rate(args, "download"))

    def to_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.upload is not None:
            out["upload"] = self.upload
        if self.download is not None:
            out["download"] = self.download
        return out


@dataclass(frozen=True, slots=True)
class UpdateArgs:
    """``update``: the gateway's update agent checks at once which release the provider
    wants it to run (``version``, when the provider names it; the agent verifies whatever
    it installs against the signed release metadata, never against this). With ``now``
    it installs and swaps to it at once instead of inside the maintenance window."""

    version: str | None = None
    now: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls(version=_optional_text(args, "version"), now=_flag(args, "now"))

    def to_args(self) -> dict[str, Any]:
        return {"version": self.version, "now": self.now}


@dataclass(frozen=True, slots=True)
class SnapshotArgs:
    """``snapshot`` of a volume as of now; with ``wait``, the reply comes once the
    provider holds it (or it failed)."""

    volume: str
    volume_id: str | None = None  # sent for the provider's records; the gateway skips it
    description: str | None = None
    wait: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls(
            volume=_volume_name(args, "volume"),
            volume_id=_optional_text(args, "volume_id"),
            description=_optional_text(args, "description"),
            wait=_flag(args, "wait"),
        )

    def to_args(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "description": self.description,
            "wait": self.wait,
            "volume": self.volume,
        }


@dataclass(frozen=True, slots=True)
class CreateVolumeArgs:
    """``create_volume``: a volume bound to the provider's volume ``volume_id`` (made
    before the command is sent), empty or a copy of ``snapshot_id``."""

    name: str
    size: int  # bytes
    mode: Mode
    volume_id: str
    snapshot_id: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        name, mode = _volume_name(args, "name"), _text(args, "mode")
        size, volume_id = _whole(args, "size"), _text(args, "volume_id")
        snapshot_id = _optional_text(args, "snapshot_id")
        for known in MODES:
            if mode == known:
                return cls(name, size, known, volume_id, snapshot_id)
        raise CommandError(f"mode {mode!r} is not stored or cached")

    def to_args(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "mode": self.mode,
            "volume_id": self.volume_id,
            "snapshot_id": self.snapshot_id,
        }


@dataclass(frozen=True, slots=True)
class DeleteVolumeArgs:
    """``delete_volume``; ``volume_id`` guards against deleting a volume of the same name
    bound elsewhere; with ``drain``, the write log's data of it is uploaded first."""

    volume: str
    volume_id: str | None = None
    drain: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls(
            volume=_volume_name(args, "volume"),
            volume_id=_optional_text(args, "volume_id"),
            drain=_flag(args, "drain"),
        )

    def to_args(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "drain": self.drain, "volume": self.volume}


@dataclass(frozen=True, slots=True)
class SyncChapArgs:
    """``sync_chap``: the gateway fetches the volume's CHAP credentials with a signed
    request (secrets never travel in a message, which is stored in the clear)."""

    volume: str
    volume_id: str

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        return cls(volume=_volume_name(args, "volume"), volume_id=_text(args, "volume_id"))

    def to_args(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "volume": self.volume}


SCHEMAS: dict[str, type[CommandArgs]] = {
    "describe": DescribeArgs,
    "diagnostics": DiagnosticsArgs,
    "set_bandwidth": SetBandwidthArgs,
    "snapshot": SnapshotArgs,
    "create_volume": CreateVolumeArgs,
    "delete_volume": DeleteVolumeArgs,
    "sync_chap": SyncChapArgs,
    "update": UpdateArgs,
    "health_report": HealthReportArgs,
}


def _text(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"the command lacks {key!r}")
    return value


def _volume_name(args: Mapping[str, Any], key: str) -> str:
    """A volume's name on the gateway (CommandError if it breaks the rule)."""
    value = _text(args, key)
    if not is_volume_name(value):
        raise CommandError(
            f"the command's {key!r} {value[:80]!r} is not a volume name: give " + VOLUME_NAME_HELP
        )
    return value


def _optional_text(args: Mapping[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None or isinstance(value, str):
        return value
    raise CommandError(f"the command's {key!r} is {type(value).__name__}, not text")


def _flag(args: Mapping[str, Any], key: str) -> bool:
    """A yes/no field; absent or null: no."""
    value = args.get(key)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise CommandError(f"the command's {key!r} is {value!r}, not true or false")


def _whole(args: Mapping[str, Any], key: str) -> int:
    value = args.get(key)
    if value is None:
        raise CommandError(f"the command lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError(f"the command's {key!r} is {value!r}, not a whole number")
    return value


def _rate(args: Mapping[str, Any], key: str) -> int | None:
    """A limit in bytes/s; absent: None (unchanged); null: 0 (no limit)."""
    if key not in args:
        return None
    value = args[key]
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CommandError(f"{key} bandwidth {value!r}: give bytes per second, 0 for no limit")
    return value
