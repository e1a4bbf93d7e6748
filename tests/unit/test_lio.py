"""The iSCSI export's logic without a kernel: [lio] settings, chap.json rules, the
desired LIO state, the plan that reaches it, and the exporter's order of work (LIO
objects before /dev/nbdN, both before the NBD server) against in-memory LIO and NBD."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sgw.common.errors import ConfigError
from sgw.gateway.lio.access import Access, InitiatorAccess, access_of, load_access
from sgw.gateway.lio.chap import ChapCredential, ChapStore
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

BASE = "iqn.2024-01.com.example:gw1"
HOST1 = "iqn.1993-08.org.debian:01:host1"
HOST2 = "iqn.1993-08.org.debian:01:host2"


def volumes(*names: str) -> list[ExportedVolume]:
    """Volumes with serials that depend on their names only (as registry ids do)."""
    return [ExportedVolume(n, lun_serial("ab" * 32, sum(n.encode()))) for n in names]


def devices(*names: str) -> dict[str, str]:
    return {n: f"/dev/nbd{i}" for i, n in enumerate(names)}


def state(
    names: tuple[str, ...], rules: dict[str, Access] | None = None, **cfg: Any
) -> dict[str, Any]:
    config = replace(LioConfig(enabled=True), **cfg)
    return desired_state(volumes(*names), devices(*names), config, BASE, rules or {})


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


def test_access_from_chap_json(tmp_path: Path) -> None:
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
    assert rules["vol0"].initiators[0].target_secret == "t" * 14
    assert "a" * 16 not in repr(rules)


def test_access_keeps_each_initiators_secrets() -> None:
    creds = [ChapCredential(HOST1, "a" * 255, "t" * 12), ChapCredential(HOST2, "b" * 12)]
    access = access_of("vol0", creds)
    assert [(a.initiator, a.secret, a.target_secret) for a in access.initiators] == [
        (HOST1, "a" * 255, "t" * 12),
        (HOST2, "b" * 12, None),
    ]
    with pytest.raises(ConfigError, match="secret: 12-255"):
        access_of("vol0", [ChapCredential(HOST1, "a" * 256)])


def test_chap_store_refuses_a_symlink_and_drops_cleared_volumes(tmp_path: Path) -> None:
    store = ChapStore(str(tmp_path))
    store.replace("vol0", [ChapCredential(HOST1, "s" * 12)])
    store.replace("vol1", [ChapCredential(HOST2, "u" * 12)])
    store.replace("vol0", [])  # CHAP cleared: the volume is open again
    store.replace("vol9", [])  # clearing what was never set changes nothing
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
    ("cred", "message"),
    [
        (ChapCredential("host1", "s" * 12), "not an iSCSI initiator name"),
        (ChapCredential(HOST1, "short"), "secret: 12-255"),
        (ChapCredential(HOST1, "with space 12"), "secret: 12-255"),
        (ChapCredential(HOST1, "s" * 12, "s" * 12), "must differ"),
    ],
)
def test_access_refused(cred: ChapCredential, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        access_of("vol0", [cred])


# -- desired state --------------------------------------------------------------------


def test_one_open_target_per_volume() -> None:
    want = state(("vol0", "Data_1"))
    assert sorted(want) == [f"{BASE}:data-1", f"{BASE}:vol0"]
    t = want[f"{BASE}:vol0"]
    assert (t.volume, t.backstore, t.device, t.portal) == (
        "vol0",
        "sgw-vol0",
        "/dev/nbd0",
        ("0.0.0.0", 3260),
    )
    # Every name is one configfs reads: a misspelt one would be refused or ignored by LIO.
    assert dict(t.tpg_attributes) == {
        "authentication": "0",
        "generate_node_acls": "1",
        "cache_dynamic_acls": "1",
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
    assert dict(want[f"{BASE}:vol1"].tpg_attributes)["generate_node_acls"] == "1"


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
    """nbd-client in memory."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.n = 0

    async def attach(self, volume: str, taken: set[str]) -> str:
        self.log.append(f"attach {volume}")
        self.n += 1
        return f"/dev/nbd{self.n}"

    async def detach(self, device: str) -> None:
        self.log.append(f"detach {device}")


def test_exporter_removes_lio_objects_before_detaching(tmp_path: Path) -> None:
    log: list[str] = []
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "",
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
        "",
        "ab" * 32,
        backend=lio,
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )
    asyncio.run(exporter.clear())
    assert log == ["lio remove vol0", "detach /dev/nbd4"]


def test_exporter_fails_closed_on_a_damaged_chap_file(tmp_path: Path) -> None:
    log: list[str] = []
    (tmp_path / "chap.json").write_text("{not json")
    os.chmod(tmp_path / "chap.json", 0o600)
    config = LioConfig(enabled=True, iqn_base=BASE, runtime_dir=str(tmp_path / "run"))
    exporter = LioExporter(
        config,
        str(tmp_path),
        "",
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
        "",
        "ab" * 32,
        backend=RefusingLio(log),
        attacher=FakeNbd(log),  # type: ignore[arg-type]
    )
    asyncio.run(exporter.apply(volumes("bad", "good")))
    assert exporter.errors == {"bad": "LIO create of bad failed: no"}
    assert "lio create good" in log
