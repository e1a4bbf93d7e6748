"""Desired LIO state, computed from the volumes, and the changes that reach it.

Pure functions over plain data, so the logic is tested without a kernel: the adapter
(:mod:`sgw.gateway.lio.kernel`) reads the live objects into the same ``TargetSpec``
shape and carries the changes out.

Each volume is one iSCSI target ``<iqn_base>:<volume>`` with one TPG (tag 1), LUN 0 on
an iblock storage object ``sgw-<volume>`` over the volume's ``/dev/nbdN``, one portal, and
the volume's access (sgw.gateway.lio.access):

- closed (no rules): no ACL and no generated ACLs, authentication required: LIO refuses
  every initiator;
- an ACL per allowed initiator, with CHAP (mutual CHAP where it has a target secret) or
  without; authentication is required on the TPG unless some initiator is allowed
  without CHAP, and then each ACL says whether it needs CHAP;
- open (the flag, or legacy open): LIO's generated ACLs, any initiator, no CHAP.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sgw.common.errors import ConfigError
from sgw.gateway.lio.access import Access, effective_access
from sgw.gateway.lio.settings import IQN, LioConfig

# Storage objects the gateway owns are named with this prefix; anything else in LIO is
# left alone.
BACKSTORE_PREFIX = "sgw-"
DEFAULT_IQN_PREFIX = "iqn.2024-01.org.sgw"
TPG_TAG = 1
LUN = 0
# Names the serial numbers of the LUNs (uuid5 over the gateway's key and a volume id).
_SERIAL_NAMESPACE = uuid.UUID("8d1f6f3e-4b7a-5c2d-9e0f-1a2b3c4d5e6f")
_NOT_IN_IQN = re.compile(r"[^a-z0-9.-]")


@dataclass(frozen=True)
class ExportedVolume:
    """A volume to export: its name, the stable serial number of its LUN, and whether it
    is legacy open (exported open before closed-by-default access; no rules since)."""

    name: str
    serial: str
    legacy_open: bool = False


@dataclass(frozen=True)
class TargetSpec:
    """One target as LIO holds it (or should). Attributes are (name, value) pairs,
    sorted, as the strings configfs reads back."""

    iqn: str
    volume: str
    backstore: str
    device: str
    serial: str
    portal: tuple[str, int]
    access: Access
    tpg_attributes: tuple[tuple[str, str], ...]
    parameters: tuple[tuple[str, str], ...]
    backstore_attributes: tuple[tuple[str, str], ...]

    def recreate_needed(self, live: TargetSpec) -> bool:
        """True when the backing differs: the LUN must be made anew, not changed."""
        return (self.volume, self.backstore, self.device, self.serial) != (
            live.volume,
            live.backstore,
            live.device,
            live.serial,
        )


@dataclass(frozen=True)
class Create:
    """Make the storage object, target, TPG, LUN, ACLs and portal; enable the TPG."""

    spec: TargetSpec


@dataclass(frozen=True)
class Update:
    """Bring a live target's attributes, parameters, portal, CHAP and ACLs to ``spec``."""

    spec: TargetSpec
    live: TargetSpec


@dataclass(frozen=True)
class Remove:
    """Delete the target (sessions end) and then its storage object."""

    live: TargetSpec


Change = Create | Update | Remove


def default_iqn_base(gateway_key_hex: str) -> str:
    """``iqn.2024-01.org.sgw:<first 12 hex digits of the identity key>``: unique per
    gateway, stable across restarts."""
    return f"{DEFAULT_IQN_PREFIX}:{gateway_key_hex[:12].lower()}"


def target_iqn(iqn_base: str, volume: str) -> str:
    """The volume's target name: lower case, '_' (not allowed in IQNs) as '-'."""
    iqn = f"{iqn_base}:{_NOT_IN_IQN.sub('-', volume.lower())}"
    if not IQN.fullmatch(iqn) or len(iqn) > 223:
        raise ConfigError(f"volume {volume}: {iqn!r} is not a valid iSCSI name (223 at most)")
    return iqn


def lun_serial(gateway_key_hex: str, volume_id: int) -> str:
    """The LUN's unit serial number (LIO derives its NAA identifier from it): the same for
    a volume across restarts, different on another gateway."""
    return str(uuid.uuid5(_SERIAL_NAMESPACE, f"{gateway_key_hex}/{volume_id}"))


def tpg_attributes(config: LioConfig, access: Access) -> tuple[tuple[str, str], ...]:
    """The TPG attributes for these login rules: explicit ACLs only, authentication
    required unless an initiator may log in without it (then each ACL decides); or, for an
    open volume, generated ACLs (any initiator, writable) without authentication."""
    generate = access.open
    attrs = {
        "authentication": "0" if access.without_chap else "1",
        "generate_node_acls": "1" if generate else "0",
        "cache_dynamic_acls": "1" if generate else "0",
        "demo_mode_write_protect": "0",
        "default_cmdsn_depth": str(config.cmdsn_depth),
    }
    return tuple(sorted(attrs.items()))


def login_parameters(config: LioConfig) -> tuple[tuple[str, str], ...]:
    """The iSCSI login keys the target offers (RFC 3720 section 12)."""
    params = {
        "MaxRecvDataSegmentLength": str(config.max_recv_data_segment_length),
        "MaxXmitDataSegmentLength": str(config.max_xmit_data_segment_length),
        "MaxBurstLength": str(config.max_burst_length),
        "FirstBurstLength": str(config.first_burst_length),
    }
    return tuple(sorted(params.items()))


def backstore_attributes() -> tuple[tuple[str, str], ...]:
    """UNMAP and WRITE SAME with UNMAP passed to the NBD device as TRIM (the gateway frees
    the blocks); 3PC for EXTENDED COPY."""
    attrs = {"emulate_tpu": "1", "emulate_tpws": "1", "emulate_3pc": "1"}
    return tuple(sorted(attrs.items()))


def desired_state(
    volumes: Iterable[ExportedVolume],
    devices: Mapping[str, str],
    config: LioConfig,
    iqn_base: str,
    rules: Mapping[str, Access],
) -> dict[str, TargetSpec]:
    """The targets LIO should hold, by IQN: one per volume that has a device attached
    (``devices``: volume name -> /dev/nbdN), with the access of its ``rules`` (none:
    closed, unless the volume is legacy open)."""
    out: dict[str, TargetSpec] = {}
    by_volume: dict[str, str] = {}
    for vol in volumes:
        device = devices.get(vol.name)
        if device is None:
            continue
        iqn = target_iqn(iqn_base, vol.name)
        if iqn in out:
            raise ConfigError(
                f"volumes {by_volume[iqn]} and {vol.name} would have the same iSCSI name "
                f"{iqn}; rename one (names differing only in case or '_'/'-' collide)"
            )
        by_volume[iqn] = vol.name
        access = effective_access(rules.get(vol.name), vol.legacy_open)
        out[iqn] = TargetSpec(
            iqn=iqn,
            volume=vol.name,
            backstore=BACKSTORE_PREFIX + vol.name,
            device=device,
            serial=vol.serial,
            portal=(config.portal_host, config.portal_port),
            access=access,
            tpg_attributes=tpg_attributes(config, access),
            parameters=login_parameters(config),
            backstore_attributes=backstore_attributes(),
        )
    return out


def plan(desired: Mapping[str, TargetSpec], live: Mapping[str, TargetSpec]) -> list[Change]:
    """The changes from ``live`` to ``desired``: removals first (a device or name may be
    reused by a new target), then creations, then in-place updates. Nothing for a target
    that already matches."""
    removals: list[Change] = []
    creations: list[Change] = []
    updates: list[Change] = []
    for iqn, have in sorted(live.items()):
        want = desired.get(iqn)
        if want is None:
            removals.append(Remove(have))
        elif want.recreate_needed(have):
            removals.append(Remove(have))
            creations.append(Create(want))
        elif want != have:
            updates.append(Update(want, have))
    for iqn, want in sorted(desired.items()):
        if iqn not in live:
            creations.append(Create(want))
    return removals + creations + updates
