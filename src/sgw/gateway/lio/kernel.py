"""LIO through rtslib-fb: reads the live objects the gateway owns, carries out changes.

Only storage objects named ``sgw-*`` and the targets whose LUNs use them (or whose IQN
the caller names) are read or touched. rtslib-fb is Debian's ``python3-rtslib-fb``,
visible to the appliance's virtualenv through its system site-packages; it is imported
when a kernel object is made, so that hosts without LIO can import this module. Every
call does blocking configfs I/O: callers run it in a worker thread.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol

from sgw.common.errors import IscsiExportError
from sgw.gateway.lio.access import Access, InitiatorAccess
from sgw.gateway.lio.desired import (
    BACKSTORE_PREFIX,
    LUN,
    TPG_TAG,
    Change,
    Create,
    Remove,
    TargetSpec,
    Update,
)

LOG = logging.getLogger(__name__)

CONFIGFS_TARGET = "/sys/kernel/config/target"


class LioBackend(Protocol):
    """What the exporter needs from LIO (rtslib-fb on the appliance)."""

    def live(self, extra_iqns: frozenset[str] = frozenset()) -> dict[str, TargetSpec]: ...

    def apply(self, change: Change) -> None: ...

    def orphan_backstores(self) -> list[str]: ...

    def remove_backstore(self, name: str) -> None: ...


class RtslibLio:
    """The LIO kernel target through rtslib-fb."""

    def __init__(self) -> None:
        try:
            self._rts: Any = importlib.import_module("rtslib_fb")
        except ImportError as exc:
            raise IscsiExportError(
                "rtslib-fb is not importable (apt-get install python3-rtslib-fb; the "
                "virtualenv needs --system-site-packages)"
            ) from exc
        try:
            self._root: Any = self._rts.RTSRoot()
        except (self._rts.RTSLibError, OSError) as exc:
            raise IscsiExportError(
                f"LIO is not available ({exc}): load configfs, target_core_mod, "
                "iscsi_target_mod and target_core_iblock"
            ) from exc

    # Reading

    def live(self, extra_iqns: frozenset[str] = frozenset()) -> dict[str, TargetSpec]:
        """The targets the gateway owns, as TargetSpecs: those with a LUN on an ``sgw-*``
        storage object, and those named in ``extra_iqns`` (e.g. left half-made)."""
        out: dict[str, TargetSpec] = {}
        try:
            for target in self._root.targets:
                if target.fabric_module.name != "iscsi":
                    continue
                spec = self._read_target(target)
                if spec is not None and (spec.backstore or target.wwn in extra_iqns):
                    out[target.wwn] = spec
        except (self._rts.RTSLibError, OSError) as exc:
            raise IscsiExportError(f"reading LIO's targets: {exc}") from exc
        return out

    def orphan_backstores(self) -> list[str]:
        """``sgw-*`` storage objects that no target uses."""
        try:
            return [
                so.name
                for so in self._root.storage_objects
                if so.plugin == "block"
                and so.name.startswith(BACKSTORE_PREFIX)
                and not list(so.attached_luns)
            ]
        except (self._rts.RTSLibError, OSError) as exc:
            raise IscsiExportError(f"reading LIO's storage objects: {exc}") from exc

    def _read_target(self, target: Any) -> TargetSpec | None:
        tpgs = list(target.tpgs)
        tpg = next((t for t in tpgs if t.tag == TPG_TAG), tpgs[0] if tpgs else None)
        so = None
        if tpg is not None:
            lun = next((lu for lu in tpg.luns if lu.lun == LUN), None)
            so = lun.storage_object if lun is not None else None
        if so is not None and not so.name.startswith(BACKSTORE_PREFIX):
            return None
        if tpg is None:
            return _bare(target.wwn)
        portals = list(tpg.network_portals)
        tpg_attributes = _read(tpg.get_attribute, _TPG_ATTRIBUTES)
        access = Access(
            tuple(
                _read_acl(acl, target.wwn)
                for acl in sorted(tpg.node_acls, key=lambda a: str(a.node_wwn))
            ),
            open=dict(tpg_attributes).get("generate_node_acls") == "1",
        )
        return TargetSpec(
            iqn=target.wwn,
            volume=so.name.removeprefix(BACKSTORE_PREFIX) if so is not None else "",
            backstore=so.name if so is not None else "",
            device=so.udev_path if so is not None else "",
            serial=so.wwn if so is not None else "",
            portal=(portals[0].ip_address, int(portals[0].port)) if portals else ("", 0),
            access=access,
            tpg_attributes=tpg_attributes,
            parameters=_read(tpg.get_parameter, _PARAMETERS),
            backstore_attributes=(
                _read(so.get_attribute, _BACKSTORE_ATTRIBUTES) if so is not None else ()
            ),
        )

    # Changing

    def apply(self, change: Change) -> None:
        """Carries out one change; an error names the target and what failed."""
        try:
            if isinstance(change, Remove):
                self._remove(change.live)
            elif isinstance(change, Create):
                self._create(change.spec)
            else:
                assert isinstance(change, Update)
                self._update(change.spec, change.live)
        except (self._rts.RTSLibError, OSError) as exc:
            what = type(change).__name__.lower()
            iqn = change.live.iqn if isinstance(change, Remove) else change.spec.iqn
            raise IscsiExportError(f"LIO {what} of {iqn} failed: {exc}") from exc

    def remove_backstore(self, name: str) -> None:
        try:
            for so in self._root.storage_objects:
                if so.name == name and so.plugin == "block":
                    so.delete()
        except (self._rts.RTSLibError, OSError) as exc:
            raise IscsiExportError(f"LIO: removing storage object {name} failed: {exc}") from exc

    def _create(self, spec: TargetSpec) -> None:
        rts = self._rts
        so = rts.BlockStorageObject(spec.backstore, dev=spec.device, wwn=spec.serial)
        for name, value in spec.backstore_attributes:
            so.set_attribute(name, value)
        target = rts.Target(rts.FabricModule("iscsi"), spec.iqn, mode="create")
        try:
            tpg = rts.TPG(target, TPG_TAG, mode="create")
            for name, value in spec.parameters:
                tpg.set_parameter(name, value)
            for name, value in _in_order(spec.tpg_attributes):
                tpg.set_attribute(name, value)
            lun = rts.LUN(tpg, LUN, so)
            self._set_access(tpg, lun, spec.iqn, spec.access)
            rts.NetworkPortal(tpg, spec.portal[0], spec.portal[1], mode="create")
            tpg.enable = True
        except BaseException:
            target.delete()
            so.delete()
            raise
        LOG.info(
            "iSCSI target created",
            extra={
                "iqn": spec.iqn,
                "volume": spec.volume,
                "device": spec.device,
                "access": spec.access.label(),
                "initiators": [a.initiator for a in spec.access.initiators],
                "mutual_chap": [a.initiator for a in spec.access.initiators if a.target_secret],
            },
        )

    def _update(self, spec: TargetSpec, live: TargetSpec) -> None:
        rts = self._rts
        target = rts.Target(rts.FabricModule("iscsi"), spec.iqn, mode="lookup")
        tpg = rts.TPG(target, TPG_TAG, mode="lookup")
        for name, value in spec.parameters:
            if (name, value) not in live.parameters:
                tpg.set_parameter(name, value)
        # The ACLs first: each says whether it needs CHAP before the TPG stops requiring
        # authentication (a volume that starts mixing initiators with and without CHAP).
        if spec.access != live.access:
            lun = rts.LUN(tpg, LUN)
            self._set_access(tpg, lun, spec.iqn, spec.access)
        for name, value in _in_order(spec.tpg_attributes):
            if (name, value) not in live.tpg_attributes:
                tpg.set_attribute(name, value)
        so = rts.BlockStorageObject(spec.backstore)
        for name, value in spec.backstore_attributes:
            if (name, value) not in live.backstore_attributes:
                so.set_attribute(name, value)
        if spec.portal != live.portal:
            for portal in list(tpg.network_portals):
                portal.delete()
            rts.NetworkPortal(tpg, spec.portal[0], spec.portal[1], mode="create")
        LOG.info(
            "iSCSI target updated",
            extra={"iqn": spec.iqn, "volume": spec.volume, "access": spec.access.label()},
        )

    def _set_access(self, tpg: Any, lun: Any, iqn: str, access: Access) -> None:
        """An ACL per allowed initiator, with LUN 0 and its CHAP secrets (or none); ACLs
        of initiators no longer allowed, or that change between CHAP and none, are
        deleted first (their sessions end). An open target has no ACL."""
        rts = self._rts
        wanted = {a.initiator: a for a in access.initiators}
        for acl in list(tpg.node_acls):
            rule = wanted.get(acl.node_wwn)
            if rule is None or _read_acl(acl, iqn).chap != rule.chap:
                acl.delete()
        for name, rule in wanted.items():
            acl = rts.NodeACL(tpg, name)
            if not list(acl.mapped_luns):
                rts.MappedLUN(acl, LUN, lun)
            self._set_acl_authentication(acl, rule, access)
            if rule.secret is None:
                continue
            acl.chap_userid = name
            acl.chap_password = rule.secret
            acl.chap_mutual_userid = iqn if rule.target_secret else ""
            acl.chap_mutual_password = rule.target_secret or ""

    @staticmethod
    def _set_acl_authentication(acl: Any, rule: InitiatorAccess, access: Access) -> None:
        """The ACL's own authentication switch (Linux 6.0+): 1 for CHAP, 0 without. Where
        the kernel has none, the TPG's switch decides, which serves every volume but one
        that mixes initiators with and without CHAP: that one is refused, not opened."""
        if "authentication" in acl.list_attributes():
            acl.set_attribute("authentication", "1" if rule.chap else "0")
        elif access.mixed:
            raise IscsiExportError(
                f"initiators with and without CHAP on one volume need per-ACL "
                f"authentication (Linux 6.0 or newer): {rule.initiator} was not allowed; "
                "give every initiator of the volume CHAP, or none"
            )

    def _remove(self, live: TargetSpec) -> None:
        for target in self._root.targets:
            if target.wwn == live.iqn and target.fabric_module.name == "iscsi":
                target.delete()
        if live.backstore:
            for so in self._root.storage_objects:
                if so.name == live.backstore and so.plugin == "block":
                    so.delete()
        LOG.info("iSCSI target removed", extra={"iqn": live.iqn, "volume": live.volume})


# What is read back and compared: the keys the desired state sets.
_TPG_ATTRIBUTES = (
    "authentication",
    "cache_dynamic_acls",
    "default_cmdsn_depth",
    "demo_mode_write_protect",
    "generate_node_acls",
)
_PARAMETERS = (
    "FirstBurstLength",
    "MaxBurstLength",
    "MaxRecvDataSegmentLength",
    "MaxXmitDataSegmentLength",
)
_BACKSTORE_ATTRIBUTES = ("emulate_3pc", "emulate_tpu", "emulate_tpws")


def _in_order(attrs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """generate_node_acls first: LIO keeps cache_dynamic_acls on while it is set."""
    return sorted(attrs, key=lambda kv: kv[0] != "generate_node_acls")


def _read(get: Any, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, str(get(name)).strip()) for name in names))


def _read_acl(acl: Any, iqn: str) -> InitiatorAccess:
    """An ACL's rule as the desired state would write it: without CHAP if its own
    authentication switch is off, or (kernels without one) if it has no CHAP user;
    anything else not as written (another CHAP user name, no secret) reads as an empty
    secret, so that it differs and is rewritten."""
    name = str(acl.node_wwn)
    if (
        "authentication" in acl.list_attributes()
        and str(acl.get_attribute("authentication")).strip() == "0"
    ):
        return InitiatorAccess(name)
    userid, secret = acl.chap_userid or "", acl.chap_password or ""
    if not userid and not secret:
        return InitiatorAccess(name)
    mutual_id, mutual = acl.chap_mutual_userid or "", acl.chap_mutual_password or ""
    return InitiatorAccess(
        name,
        secret if userid == name else "",
        mutual if mutual and mutual_id == iqn else None,
    )


def _bare(iqn: str) -> TargetSpec:
    """A target without a TPG (left half-made): removed by the next plan."""
    return TargetSpec(iqn, "", "", "", "", ("", 0), Access(), (), (), ())
