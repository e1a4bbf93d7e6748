"""The iSCSI export's logic without a kernel: [lio] settings, chap.json rules, the
desired LIO state (closed by default, CHAP, initiators without CHAP, open, legacy open),
the plan that reaches it, and the exporter's order of work (LIO objects before /dev/nbdN,
both before the NBD server) and upgrade rule against in-memory LIO and NBD and a real
volume registry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sgw.common.errors import ConfigError, IscsiExportError
from sgw.gateway.lio import kernel
from sgw.gateway.lio.access import Access, InitiatorAccess, access_of, load_access
from sgw.gateway.lio.chap import ChapCredential, ChapStore, VolumeRules
from sgw.gateway.lio.desired import (
    Change,
    Create,
    ExportedVolume,
    Remove,
    TargetSpec,
    Update,
    default_iqn_base,
    desired_state,
    lun_serial,
    plan,
    target_iqn,
)
from sgw.gateway.lio.exporter import LioExporter
from sgw.gateway.lio.settings import LioConfig, parse_lio
from sgw.gateway.volume.engine import REGISTRY_FILE, VolumeEngine, VolumeSpec
from sgw.gateway.volume.wal import DATA_START, MIN_DATA_SIZE

BASE = "iqn.2024-01.com.example:gw1"
HOST1 = "iqn.1993-08.org.debian:01:host1"
HOST2 = "iqn.1993-08.org.debian:01:host2"
CHAP1 = InitiatorAccess(HOST1, "s" * 12)
PLAIN2 = InitiatorAccess(HOST2)  # allowed without CHAP


def volumes(*names: str, legacy: tuple[str, ...] = ()) -> list[ExportedVolume]:
    """Volumes with serials that depend on their names only (as registry ids do)."""
    return [ExportedVolume(n, lun_serial("ab" * 32, sum(n.encode())), n in legacy) for n in names]


def devices(*names: str) -> dict[str, str]:
    return {n: f"/dev/nbd{i}" for i, n in enumerate(names)}


def state(
    names: tuple[str, ...],
    rules: dict[str, Access] | None = None,
    legacy: tuple[str, ...] = (),
    **cfg: Any,
) -> dict[str, TargetSpec]:
    config = replace(LioConfig(enabled=True), **cfg)
    vols = volumes(*names, legacy=legacy)
    return desired_state(vols, devices(*names), config, BASE, rules or {})


def attrs(spec: TargetSpec) -> dict[str, str]:
    return dict(spec.tpg_attributes)


# -- settings -------------------------------------------------------------------------


def test_settings_defaults_and_values() -> None:
    assert parse_lio({}) is None
    cfg = parse_lio({"enabled": True, "portal": "10.0.0.5:3261", "max_sectors_kb": 512})
    assert cfg is not None and cfg.enabled
    assert (cfg.portal_host, cfg.portal_port, cfg.max_sectors_kb) == ("10.0.0.5", 3261, 512)
    assert cfg.block_size == 512 and cfg.cmdsn_depth == 128


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"enabled": "yes"}, "lio.enabled"),
        ({"iqn_base": "iqn.2024-01.Example.com:X"}, "lio.iqn_base"),
        ({"iqn_base": "iqn.2024-01.example_com"}, "lio.iqn_base"),
        ({"iqn_base": "iqn.2024-01.com.example:gw1\n"}, "lio.iqn_base"),
        ({"portal": "example.com:3260"}, "lio.portal"),
        ({"portal": "0.0.0.0"}, "lio.portal"),
        ({"block_size": 1024}, "lio.block_size"),
        ({"max_sectors_kb": 256}, "lio.max_sectors_kb"),
        ({"cmdsn_depth": 0}, "lio.cmdsn_depth"),
        ({"first_burst_length": 1 << 20, "max_burst_length": 1 << 18}, "first_burst_length"),
        ({"runtime_dir": "run/sgw"}, "lio.runtime_dir"),
        ({"chap": True}, "unknown key"),
    ],
)
def test_settings_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_lio(table)


# -- chap.json ------------------------------------------------------------------------


def write_chap(data_dir: Path, doc: dict[str, Any], mode: int = 0o600) -> None:
    path = data_dir / "chap.json"
    path.write_text(json.dumps(doc))
    os.chmod(path, mode)


def test_access_from_a_chap_json_of_format_1(tmp_path: Path) -> None:
    """A file an older gateway wrote (or a seed disk brought) means what it meant: CHAP
    credentials, nothing else."""
    assert load_access(str(tmp_path)) == {}
    write_chap(
        tmp_path,
        {
            "volumes": {
                "vol0": [
                    {"initiator": HOST2.upper(), "secret": "s" * 12, "target_secret": None},
                    {"initiator": HOST1, "secret": "a" * 16, "target_secret": "t" * 14},
                ]
            }
        },
    )
    rules = load_access(str(tmp_path))
    assert [a.initiator for a in rules["vol0"].initiators] == [HOST1, HOST2]
    assert all(a.chap for a in rules["vol0"].initiators) and not rules["vol0"].open
    assert rules["vol0"].initiators[0].target_secret == "t" * 14
    assert "a" * 16 not in repr(rules)
    assert rules["vol0"].label() == "chap 2"


def test_chap_json_of_format_2_round_trip(tmp_path: Path) -> None:
    store = ChapStore(str(tmp_path))
    store.replace("vol0", VolumeRules(chap=(ChapCredential(HOST1, "s" * 12),)))
    store.replace("vol1", VolumeRules(initiators=(HOST2, HOST2, HOST1)))
    store.replace("lab", VolumeRules(chap=(ChapCredential(HOST1, "s" * 12),), open=True))
    doc = json.loads((tmp_path / "chap.json").read_text())
    assert doc["version"] == 2 and doc["open"] == ["lab"]
    assert doc["volumes"]["vol0"] == [
        {"initiator": HOST1, "secret": "s" * 12, "target_secret": None}
    ]
    assert doc["initiators"] == {"vol1": [HOST1, HOST2]}
    rules = load_access(str(tmp_path))
    assert rules["vol1"] == Access((InitiatorAccess(HOST1), InitiatorAccess(HOST2)))
    assert rules["vol1"].label() == "acl 2" and rules["lab"].label() == "OPEN"
    # No rules: the volume leaves the file (it is closed).
    store.replace("vol1", VolumeRules())
    assert sorted(load_access(str(tmp_path))) == ["lab", "vol0"]


def test_a_chap_json_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    write_chap(tmp_path, {"version": 3, "volumes": {}})
    with pytest.raises(ConfigError, match="newer than this gateway reads"):
        load_access(str(tmp_path))
    write_chap(tmp_path, {"version": 2, "initiators": {"vol0": 5}})
    with pytest.raises(ConfigError, match="malformed"):
        load_access(str(tmp_path))


def test_access_keeps_each_initiators_secrets() -> None:
    creds = (ChapCredential(HOST1, "a" * 255, "t" * 12), ChapCredential(HOST2, "b" * 12))
    access = access_of("vol0", VolumeRules(chap=creds))
    assert [(a.initiator, a.secret, a.target_secret) for a in access.initiators] == [
        (HOST1, "a" * 255, "t" * 12),
        (HOST2, "b" * 12, None),
    ]
    with pytest.raises(ConfigError, match="secret: 12-255"):
        access_of("vol0", VolumeRules(chap=(ChapCredential(HOST1, "a" * 256),)))


def test_chap_store_refuses_a_symlink_and_drops_cleared_volumes(tmp_path: Path) -> None:
    store = ChapStore(str(tmp_path))
    store.replace("vol0", VolumeRules(chap=(ChapCredential(HOST1, "s" * 12),)))
    store.replace("vol1", VolumeRules(chap=(ChapCredential(HOST2, "u" * 12),)))
    store.replace("vol0", VolumeRules())  # rules cleared: the volume is closed again
    store.replace("vol9", VolumeRules())  # clearing what was never set changes nothing
    assert list(store.load()) == ["vol1"]
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    (tmp_path / "chap.json").write_text("{}")
    assert store.load() == {}
    # A link planted in the data directory is not followed (O_NOFOLLOW).
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"volumes": {}}))
    os.chmod(other, 0o600)
    os.unlink(store.path)
    os.symlink(other, store.path)
    with pytest.raises(OSError):
        store.load()


def test_access_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    write_chap(tmp_path, {"volumes": {}}, mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_access(str(tmp_path))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (VolumeRules(chap=(ChapCredential("host1", "s" * 12),)), "not an iSCSI initiator name"),
        (VolumeRules(chap=(ChapCredential(HOST1 + "\nx", "s" * 12),)), "not an iSCSI initiator"),
        (VolumeRules(initiators=("iqn.x:y",)), "not an iSCSI initiator name"),
        (VolumeRules(chap=(ChapCredential(HOST1, "short"),)), "secret: 12-255"),
        (VolumeRules(chap=(ChapCredential(HOST1, "with space 12"),)), "secret: 12-255"),
        (VolumeRules(chap=(ChapCredential(HOST1, "s" * 12, "s" * 12),)), "must differ"),
    ],
)
def test_access_refused(rules: VolumeRules, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        access_of("vol0", rules)


def test_an_initiator_with_and_without_chap_is_held_to_chap() -> None:
    rules = VolumeRules(chap=(ChapCredential(HOST1, "s" * 12),), initiators=(HOST1, HOST2))
    assert access_of("vol0", rules) == Access((CHAP1, PLAIN2))


# -- desired state --------------------------------------------------------------------


def test_a_volume_without_rules_is_closed() -> None:
    """No ACL, no generated ACLs, authentication required: LIO refuses every initiator."""
    want = state(("vol0", "Data_1"))
    assert sorted(want) == [f"{BASE}:data-1", f"{BASE}:vol0"]
    t = want[f"{BASE}:vol0"]
    assert (t.volume, t.backstore, t.device, t.portal) == (
        "vol0",
        "sgw-vol0",
        "/dev/nbd0",
        ("0.0.0.0", 3260),
    )
    assert t.access == Access() and t.access.closed and t.access.label() == "closed"
    # Every name is one configfs reads: a misspelt one would be refused or ignored by LIO.
    assert dict(t.tpg_attributes) == {
        "authentication": "1",
        "generate_node_acls": "0",
        "cache_dynamic_acls": "0",
        "demo_mode_write_protect": "0",
        "default_cmdsn_depth": "128",
    }
    assert t.serial == volumes("vol0")[0].serial
    assert dict(t.parameters) == {
        "MaxRecvDataSegmentLength": "262144",
        "MaxXmitDataSegmentLength": "262144",
        "MaxBurstLength": "1048576",
        "FirstBurstLength": "262144",
    }
    assert dict(t.backstore_attributes) == {
        "emulate_tpu": "1",
        "emulate_tpws": "1",
        "emulate_3pc": "1",
    }


def test_credentials_make_acls_with_chap() -> None:
    rules = {"vol0": Access((InitiatorAccess(HOST1, "s" * 12, "t" * 12),))}
    want = state(("vol0", "vol1"), rules, cmdsn_depth=32)
    assert dict(want[f"{BASE}:vol0"].tpg_attributes) == {
        "authentication": "1",
        "generate_node_acls": "0",
        "cache_dynamic_acls": "0",
        "demo_mode_write_protect": "0",
        "default_cmdsn_depth": "32",
    }
    assert want[f"{BASE}:vol0"].access.initiators[0].initiator == HOST1
    # The other volume has no rules: closed, not open.
    assert want[f"{BASE}:vol1"].access.closed
    assert attrs(want[f"{BASE}:vol1"])["generate_node_acls"] == "0"


def test_initiators_without_chap_make_acls_without_authentication() -> None:
    """An ACL alone: the named initiators log in without CHAP, nobody else (no generated
    ACLs); mixed with CHAP, the TPG stops requiring authentication and each ACL decides."""
    acl_only = state(("vol0",), {"vol0": Access((PLAIN2,))})[f"{BASE}:vol0"]
    assert attrs(acl_only)["generate_node_acls"] == "0"
    assert attrs(acl_only)["authentication"] == "0"
    assert acl_only.access.initiators == (PLAIN2,) and not acl_only.access.mixed
    assert acl_only.access.label() == "acl 1"
    mixed = state(("vol0",), {"vol0": Access((CHAP1, PLAIN2))})[f"{BASE}:vol0"]
    assert attrs(mixed)["generate_node_acls"] == "0" and attrs(mixed)["authentication"] == "0"
    assert mixed.access.mixed and mixed.access.label() == "chap 1, acl 1"


def test_the_open_flag_opens_to_any_initiator_and_sets_the_rules_aside() -> None:
    rules = {"lab": Access((CHAP1,), open=True)}
    t = state(("lab",), rules)[f"{BASE}:lab"]
    assert t.access == Access(open=True) and t.access.label() == "OPEN"
    a = attrs(t)
    assert a["generate_node_acls"] == "1" and a["authentication"] == "0"
    assert a["cache_dynamic_acls"] == "1" and a["demo_mode_write_protect"] == "0"


def test_legacy_open_while_a_volume_has_no_rules() -> None:
    """A volume open before the update stays open; any rule replaces that."""
    want = state(("old", "new"), legacy=("old",))
    assert want[f"{BASE}:old"].access == Access(open=True)
    assert attrs(want[f"{BASE}:old"])["generate_node_acls"] == "1"
    assert want[f"{BASE}:new"].access.closed
    ruled = state(("old",), {"old": Access((CHAP1,))}, legacy=("old",))[f"{BASE}:old"]
    assert ruled.access == Access((CHAP1,)) and attrs(ruled)["generate_node_acls"] == "0"


def test_removing_the_last_rule_closes_the_target() -> None:
    live = state(("vol0",), {"vol0": Access((CHAP1,))})
    want = state(("vol0",), {})
    changes = plan(want, live)
    assert kinds(changes) == [("Update", "vol0")]
    update = changes[0]
    assert isinstance(update, Update) and update.spec.access.closed
    assert attrs(update.spec)["generate_node_acls"] == "0"
    assert attrs(update.spec)["authentication"] == "1"


def test_login_parameters_come_from_the_settings() -> None:
    t = state(
        ("vol0",),
        max_recv_data_segment_length=8192,
        max_xmit_data_segment_length=16384,
        max_burst_length=65536,
        first_burst_length=32768,
    )[f"{BASE}:vol0"]
    assert dict(t.parameters) == {
        "MaxRecvDataSegmentLength": "8192",
        "MaxXmitDataSegmentLength": "16384",
        "MaxBurstLength": "65536",
        "FirstBurstLength": "32768",
    }


def test_volume_without_device_is_not_exported() -> None:
    config = LioConfig(enabled=True)
    want = desired_state(volumes("vol0", "vol1"), {"vol1": "/dev/nbd3"}, config, BASE, {})
    assert [t.volume for t in want.values()] == ["vol1"]


def test_colliding_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="same iSCSI name"):
        state(("Vol_0", "vol-0"))


def test_names_and_serials() -> None:
    assert default_iqn_base("ABCDEF0123456789" * 4) == "iqn.2024-01.org.sgw:abcdef012345"
    assert target_iqn(BASE, "My_Vol.1") == f"{BASE}:my-vol.1"
    # An IQN is 223 characters at most (RFC 3720); a bad base is refused at any length.
    longest = target_iqn(BASE, "v" * (223 - len(BASE) - 1))
    assert len(longest) == 223
    with pytest.raises(ConfigError, match="223 at most"):
        target_iqn(BASE, "v" * (224 - len(BASE) - 1))
    with pytest.raises(ConfigError, match="not a valid iSCSI name"):
        target_iqn("not-an-iqn", "vol0")
    assert lun_serial("ab" * 32, 1) == lun_serial("ab" * 32, 1)
    assert lun_serial("ab" * 32, 1) != lun_serial("cd" * 32, 1)
    assert lun_serial("ab" * 32, 1) != lun_serial("ab" * 32, 2)


# -- plan -----------------------------------------------------------------------------


def kinds(changes: list[Change]) -> list[tuple[str, str]]:
    out = []
    for c in changes:
        spec = c.live if isinstance(c, Remove) else c.spec
        out.append((type(c).__name__, spec.volume))
    return out


def test_plan_from_nothing_creates_and_matching_state_does_nothing() -> None:
    want = state(("vol0", "vol1"))
    assert kinds(plan(want, {})) == [("Create", "vol0"), ("Create", "vol1")]
    assert plan(want, want) == []


def test_plan_removes_before_it_creates() -> None:
    live = state(("old",))
    want = state(("vol0",))
    # vol0 takes the device old had: old's LUN must be gone first.
    assert want[f"{BASE}:vol0"].device == live[f"{BASE}:old"].device
    assert kinds(plan(want, live)) == [("Remove", "old"), ("Create", "vol0")]
    assert kinds(plan({}, live)) == [("Remove", "old")]


def test_plan_updates_attributes_and_access_in_place() -> None:
    live = state(("vol0",))
    rules = {"vol0": Access((InitiatorAccess(HOST1, "s" * 12),))}
    want = state(("vol0",), rules, cmdsn_depth=64)
    changes = plan(want, live)
    assert kinds(changes) == [("Update", "vol0")]
    assert isinstance(changes[0], Update) and changes[0].live == live[f"{BASE}:vol0"]


def test_plan_recreates_when_the_device_changes() -> None:
    live = state(("vol0",))
    iqn = f"{BASE}:vol0"
    moved = {iqn: replace(live[iqn], device="/dev/nbd7")}
    assert kinds(plan(moved, live)) == [("Remove", "vol0"), ("Create", "vol0")]


def test_plan_removes_a_half_made_target() -> None:
    bare = TargetSpec(f"{BASE}:x", "", "", "", "", ("", 0), Access(), (), (), ())
    assert kinds(plan({}, {bare.iqn: bare})) == [("Remove", "")]


# -- the exporter's order of work ------------------------------------------------------


class FakeLio:
    """LIO in memory: targets by IQN; every call is logged."""

    def __init__(self, log: list[str]) -> None:
        self.targets: dict[str, TargetSpec] = {}
        self.log = log

    def live(self, extra_iqns: frozenset[str] = frozenset()) -> dict[str, TargetSpec]:
        return dict(self.targets)

    def apply(self, change: Change) -> None:
        if isinstance(change, Remove):
            self.log.append(f"lio remove {change.live.volume}")
            del self.targets[change.live.iqn]
        else:
            assert isinstance(change, Create | Update)
            self.log.append(f"lio {type(change).__name__.lower()} {change.spec.volume}")
            self.targets[change.spec.iqn] = change.spec

    def orphan_backstores(self) -> list[str]:
        return []

    def remove_backstore(self, name: str) -> None:
        raise AssertionError(name)


class FakeNbd:
    """The kernel NBD devices in memory: ``alive`` devices can be reattached."""

    def __init__(self, log: list[str], alive: set[str] | None = None) -> None:
        self.log = log
        self.n = 0
        self.alive = alive if alive is not None else set()

    async def attach(self, volume: str, taken: set[str]) -> str:
        self.log.append(f"attach {volume}")
        self.n += 1
        device = f"/dev/nbd{self.n}"
        self.alive.add(device)
        return device

    async def reattach(self, volume: str, device: str) -> bool:
        self.log.append(f"reattach {volume} {device}")
        return device in self.alive

    async def detach(self, device: str) -> None:
        self.log.append(f"detach {device}")
        self.alive.discard(device)

    def detaching(self, device: str) -> bool:
        return False


def test_exporter_removes_lio_objects_before_detaching(tmp_path: Path) -> None:
    log: list[str] = []
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=FakeLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )

    async def scenario() -> None:
        await exporter.apply(volumes("vol0", "vol1"))
        assert log == ["attach vol0", "attach vol1", "lio create vol0", "lio create vol1"]
        log.clear()
        write_chap(tmp_path, {"volumes": {"vol1": [{"initiator": HOST1, "secret": "s" * 12}]}})
        await exporter.apply(volumes("vol1"))
        assert log == ["lio remove vol0", "lio update vol1", "detach /dev/nbd1"]
        log.clear()
        await exporter.clear()
        assert log == ["lio remove vol1", "detach /dev/nbd2"]

    asyncio.run(scenario())
    recorded = json.loads((tmp_path / "run" / "lio-exports.json").read_text())
    assert recorded == {"devices": {}, "iqns": []}


def test_exporter_clears_what_a_crashed_run_left(tmp_path: Path) -> None:
    log: list[str] = []
    run = tmp_path / "run"
    run.mkdir()
    (run / "lio-exports.json").write_text(json.dumps({"devices": {"vol0": "/dev/nbd4"}}))
    lio = FakeLio(log)
    left = state(("vol0",))
    lio.targets = dict(left)
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(run))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=lio,
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )
    asyncio.run(exporter.clear())
    assert log == ["lio remove vol0", "detach /dev/nbd4"]


def test_the_cleanup_after_a_dead_daemon_detaches_the_devices_first(tmp_path: Path) -> None:
    """A device whose daemon died holds LIO's requests for a reattach; detached first,
    it fails them, so that LIO can let go of its backstore at once."""
    log: list[str] = []
    run = tmp_path / "run"
    run.mkdir()
    (run / "lio-exports.json").write_text(json.dumps({"devices": {"vol0": "/dev/nbd4"}}))
    lio = FakeLio(log)
    lio.targets = dict(state(("vol0",)))
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(run))
    nbd = FakeNbd(log, alive={"/dev/nbd4"})
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=lio,
        attacher=nbd,  # type: ignore[arg-type]
    )
    asyncio.run(exporter.clear(devices_first=True))
    assert log == ["detach /dev/nbd4", "lio remove vol0"]
    assert not nbd.alive and not lio.targets


def test_exporter_fails_closed_on_a_damaged_chap_file(tmp_path: Path) -> None:
    log: list[str] = []
    (tmp_path / "chap.json").write_text("{not json")
    os.chmod(tmp_path / "chap.json", 0o600)
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=FakeLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )
    asyncio.run(exporter.apply(volumes("vol0")))
    assert log == []
    assert "chap.json" in exporter.errors["vol0"]


def test_exporter_records_a_failed_target(tmp_path: Path) -> None:
    log: list[str] = []

    class RefusingLio(FakeLio):
        def apply(self, change: Change) -> None:
            if isinstance(change, Create) and change.spec.volume == "bad":
                from sgw.common.errors import IscsiExportError

                raise IscsiExportError("LIO create of bad failed: no")
            super().apply(change)

    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=RefusingLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )
    asyncio.run(exporter.apply(volumes("bad", "good")))
    assert exporter.errors == {"bad": "LIO create of bad failed: no"}
    assert "lio create good" in log


# -- the upgrade rule: legacy open -------------------------------------------------------

LOG_SIZE = DATA_START + MIN_DATA_SIZE


def open_engine(data_dir: Path, *names: str) -> VolumeEngine:
    specs = [VolumeSpec(n, 1 << 20, str(data_dir / f"{n}.img")) for n in names]
    return VolumeEngine.open(str(data_dir), str(data_dir / "writelog"), LOG_SIZE, specs)


def registry_flags(data_dir: Path) -> dict[str, object]:
    doc = json.loads((data_dir / REGISTRY_FILE).read_text())
    return {name: entry.get("iscsi_legacy_open", "absent") for name, entry in doc.items()}


def test_volumes_open_before_the_update_stay_open_until_their_access_is_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway updated from a version that exported volumes without CHAP to anyone: such
    a volume stays open (flagged, warned about) and is recorded so, once; one with CHAP
    keeps it; a volume created after the update starts closed; the admin's first access
    change ends legacy open for good."""
    data = tmp_path / "gw"
    open_engine(data, "old", "chapped").close()
    # As the older version left them: registry entries without the flag, chap.json of
    # format 1 with the CHAP credentials of one volume.
    doc = json.loads((data / REGISTRY_FILE).read_text())
    for entry in doc.values():
        del entry["iscsi_legacy_open"]
    (data / REGISTRY_FILE).write_text(json.dumps(doc))
    write_chap(data, {"volumes": {"chapped": [{"initiator": HOST1, "secret": "s" * 12}]}})
    assert registry_flags(data) == {"old": "absent", "chapped": "absent"}

    log: list[str] = []
    lio = FakeLio(log)
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))

    def exporter_over(engine: VolumeEngine) -> LioExporter:
        return LioExporter(
            config,
            str(data),
            "ab" * 32,
            backend=lio,
            attacher=FakeNbd(log),  # type: ignore[arg-type]
        )

    async def run_once(engine: VolumeEngine) -> dict[str, str]:
        exporter = exporter_over(engine)
        await exporter.start(engine)
        access = dict(exporter.access)
        targets = {t.volume: t for t in lio.targets.values()}
        assert targets["old"].access == Access(open=True)
        await exporter.stop()
        return access

    engine = open_engine(data, "old", "chapped", "fresh")  # "fresh": new after the update
    assert engine.registry["old"].iscsi_legacy_open is None
    assert engine.registry["fresh"].iscsi_legacy_open is False
    with caplog.at_level(logging.WARNING, logger="sgw.gateway.lio.exporter"):
        access = asyncio.run(run_once(engine))
    assert access == {"chapped": "chap 1", "fresh": "closed", "old": "OPEN (legacy)"}
    assert registry_flags(data) == {"old": True, "chapped": False, "fresh": False}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert {getattr(r, "volume", None) for r in warned} == {"old"}
    assert any("iSCSI target OPEN" in r.getMessage() for r in warned)
    engine.close()

    # Restarted: the decision stands (not taken again), the volume is still open.
    engine = open_engine(data, "old", "chapped", "fresh")
    assert asyncio.run(run_once(engine))["old"] == "OPEN (legacy)"
    engine.close()

    # The admin sets its access (sync_chap: legacy open ends, the rules are stored); with
    # no rule at all the volume is closed from now on, across restarts.
    engine = open_engine(data, "old", "chapped", "fresh")
    engine.registry["old"].iscsi_legacy_open = False
    engine.save_registry()
    ChapStore(str(data)).replace("old", VolumeRules())

    async def closed_now() -> None:
        exporter = exporter_over(engine)
        await exporter.start(engine)
        targets = {t.volume: t for t in lio.targets.values()}
        assert targets["old"].access.closed and exporter.access["old"] == "closed"
        await exporter.stop()

    asyncio.run(closed_now())
    engine.close()
    assert registry_flags(data)["old"] is False


def test_a_damaged_chap_file_decides_nothing(tmp_path: Path) -> None:
    """Legacy flags are decided from readable rules only: with chap.json damaged nothing
    is exported and the undecided volumes stay undecided."""
    data = tmp_path / "gw"
    open_engine(data, "old").close()
    doc = json.loads((data / REGISTRY_FILE).read_text())
    del doc["old"]["iscsi_legacy_open"]
    (data / REGISTRY_FILE).write_text(json.dumps(doc))
    (data / "chap.json").write_text("{not json")
    os.chmod(data / "chap.json", 0o600)
    engine = open_engine(data, "old")
    log: list[str] = []
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(data),
        "ab" * 32,
        backend=FakeLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )

    async def scenario() -> None:
        await exporter.start(engine)
        await exporter.stop()

    asyncio.run(scenario())
    assert "lio create old" not in log and "chap.json" in exporter.errors["old"]
    assert engine.registry["old"].iscsi_legacy_open is None
    engine.close()
    assert registry_flags(data) == {"old": "absent"}


def test_every_export_of_an_open_target_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_chap(tmp_path, {"version": 2, "open": ["lab"]})
    log: list[str] = []
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "ab" * 32,
        backend=FakeLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )

    async def scenario() -> None:
        await exporter.apply(volumes("lab", "vol0"))
        await exporter.apply(volumes("lab", "vol0"))  # nothing changes: no new export
        await exporter.clear()
        await exporter.apply(volumes("lab", "vol0"))

    with caplog.at_level(logging.WARNING, logger="sgw.gateway.lio.exporter"):
        asyncio.run(scenario())
    opened = [r for r in caplog.records if "iSCSI target OPEN" in r.getMessage()]
    assert [getattr(r, "volume", None) for r in opened] == ["lab", "lab"]
    assert "open flag" in opened[0].getMessage()
    assert exporter.access == {"lab": "OPEN", "vol0": "closed"}


# -- the adapter's reading and writing of one ACL (rtslib-fb objects faked) ----------------


class FakeAcl:
    """An rtslib NodeACL: its attributes (None: a kernel without per-ACL authentication)
    and CHAP fields."""

    def __init__(self, attrs: dict[str, str] | None, userid: str = "", password: str = "") -> None:
        self.node_wwn = HOST1
        self.attrs = attrs
        self.chap_userid, self.chap_password = userid, password
        self.chap_mutual_userid = self.chap_mutual_password = ""

    def list_attributes(self) -> list[str]:
        return [] if self.attrs is None else list(self.attrs)

    def get_attribute(self, name: str) -> str:
        assert self.attrs is not None
        return self.attrs[name]

    def set_attribute(self, name: str, value: str) -> None:
        assert self.attrs is not None and name in self.attrs
        self.attrs[name] = value


@pytest.mark.parametrize(
    ("acl", "read"),
    [
        (FakeAcl({"authentication": "0"}), InitiatorAccess(HOST1)),
        (FakeAcl({"authentication": "1"}, HOST1, "s" * 12), CHAP1),
        (FakeAcl({"authentication": "-1"}), InitiatorAccess(HOST1)),
        (FakeAcl(None), InitiatorAccess(HOST1)),
        (FakeAcl(None, HOST1, "s" * 12), CHAP1),
        # Written otherwise (another CHAP user): differs from any rule, so it is rewritten.
        (FakeAcl(None, "someone", "s" * 12), InitiatorAccess(HOST1, "")),
    ],
)
def test_an_acl_reads_back_as_the_rule_that_wrote_it(acl: FakeAcl, read: InitiatorAccess) -> None:
    assert kernel._read_acl(acl, f"{BASE}:vol0") == read


def test_each_acl_says_whether_it_needs_chap_and_old_kernels_refuse_mixing() -> None:
    mixed = Access((CHAP1, PLAIN2))
    for rule, expected in ((CHAP1, "1"), (PLAIN2, "0")):
        acl = FakeAcl({"authentication": "-1"})
        kernel.RtslibLio._set_acl_authentication(acl, rule, mixed)
        assert acl.attrs == {"authentication": expected}
    # Without the kernel's per-ACL switch: fine when the TPG's decides for every ACL...
    kernel.RtslibLio._set_acl_authentication(FakeAcl(None), CHAP1, Access((CHAP1,)))
    kernel.RtslibLio._set_acl_authentication(FakeAcl(None), PLAIN2, Access((PLAIN2,)))
    # ... refused (not opened) when it cannot.
    with pytest.raises(IscsiExportError, match=r"Linux 6\.0 or newer"):
        kernel.RtslibLio._set_acl_authentication(FakeAcl(None), PLAIN2, mixed)


def test_a_restarted_daemon_reattaches_its_devices_and_leaves_lio_alone(tmp_path: Path) -> None:
    """A daemon that died left its devices (the kernel holds their requests): the next
    start gives them new connections; LIO's targets are not touched. A device that cannot
    be reattached loses its target first, then is detached and attached afresh."""
    log: list[str] = []
    lio = FakeLio(log)
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    write_chap(tmp_path, {"volumes": {"vol0": [{"initiator": HOST1, "secret": "s" * 12}]}})
    write_chap(
        tmp_path,
        {
            "volumes": {
                "vol0": [{"initiator": HOST1, "secret": "s" * 12}],
                "vol1": [{"initiator": HOST1, "secret": "s" * 12}],
            }
        },
    )
    nbd = FakeNbd(log)
    first = LioExporter(config, str(tmp_path), "ab" * 32, backend=lio, attacher=nbd)  # type: ignore[arg-type]
    engine = SimpleNamespace(  # what the exporter reads of the engine
        volumes={"vol0": None, "vol1": None},
        registry={
            "vol0": SimpleNamespace(id=1, iscsi_legacy_open=False),
            "vol1": SimpleNamespace(id=2, iscsi_legacy_open=False),
        },
    )

    async def scenario() -> None:
        await first.start(engine)  # type: ignore[arg-type]
        assert log[-2:] == ["lio create vol0", "lio create vol1"]
        devices = dict(first.devices)
        log.clear()
        # The daemon dies (no stop): a new one starts; vol1's device is gone meanwhile.
        nbd.alive.discard(devices["vol1"])
        second = LioExporter(config, str(tmp_path), "ab" * 32, backend=lio, attacher=nbd)  # type: ignore[arg-type]
        await second.start(engine)  # type: ignore[arg-type]
        assert f"reattach vol0 {devices['vol0']}" in log
        assert "lio create vol0" not in log and "lio remove vol0" not in log
        assert second.devices["vol0"] == devices["vol0"]
        # vol1: its target goes before its device, then both come back.
        assert log.index("lio remove vol1") < log.index(f"detach {devices['vol1']}")
        assert log.index(f"detach {devices['vol1']}") < log.index("attach vol1")
        assert log[-1] == "lio create vol1"

    asyncio.run(scenario())
