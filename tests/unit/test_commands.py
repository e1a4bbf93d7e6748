"""The console commands' shared schema (sgw.common.commands): what the provider sends
parses back to the same arguments, bad input is refused naming the field, unknown keys
are skipped, and the provider's planner sends byte for byte what earlier versions sent
(gateways and providers of different versions talk to each other) and records what a
gateway's describe says of its volumes' iSCSI access."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgw.common.commands import (
    SCHEMAS,
    TYPES,
    CommandArgs,
    CreateVolumeArgs,
    DeleteVolumeArgs,
    DescribeArgs,
    DiagnosticsArgs,
    HealthReportArgs,
    SetBandwidthArgs,
    SnapshotArgs,
    SyncChapArgs,
)
from sgw.common.errors import CommandError
from sgw.common.names import VOLUME_NAME, is_volume_name
from sgw.provider.blockstore.maps import VolumeInfo, VolumeMode
from sgw.provider.blockstore.service import BlockService
from sgw.provider.control.planner import CommandPlanner
from sgw.provider.control.store import MessageInfo
from sgw.provider.management.gateways import Gateways
from sgw.provider.management.volume_settings import VolumeSettings

names = st.text(min_size=1, max_size=20)
# A volume's name on the gateway (sgw.common.names), which ``from_args`` checks.
volume_names = st.from_regex(VOLUME_NAME, fullmatch=True)
rates = st.none() | st.integers(min_value=0, max_value=(1 << 63) - 1)

any_args = st.one_of(
    st.builds(DescribeArgs),
    st.builds(DiagnosticsArgs),
    st.builds(HealthReportArgs),
    st.builds(SetBandwidthArgs, upload=rates, download=rates),
    st.builds(
        SnapshotArgs,
        volume=volume_names,
        volume_id=st.none() | names,
        description=st.none() | st.text(max_size=255),
        wait=st.booleans(),
    ),
    st.builds(
        CreateVolumeArgs,
        name=volume_names,
        size=st.integers(min_value=1, max_value=(1 << 63) - 1),
        mode=st.sampled_from(["stored", "cached"]),
        volume_id=names,
        snapshot_id=st.none() | names,
    ),
    st.builds(
        DeleteVolumeArgs, volume=volume_names, volume_id=st.none() | names, drain=st.booleans()
    ),
    st.builds(SyncChapArgs, volume=volume_names, volume_id=names),
)


@given(any_args)
def test_what_is_sent_parses_back_to_the_same_arguments(args: CommandArgs) -> None:
    wire = json.loads(json.dumps(args.to_args()))  # as stored and delivered
    assert type(args).from_args(wire) == args


def test_every_type_has_a_schema() -> None:
    assert set(SCHEMAS) == set(TYPES)


@given(st.text(max_size=70))
def test_a_volume_name_is_the_whole_text_and_nothing_more(text: str) -> None:
    """``fullmatch``: no newline (or anything else) may follow a good name."""
    good = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text) is not None
    assert is_volume_name(text) == good
    assert not is_volume_name(text + "\n")


def test_unknown_keys_are_skipped() -> None:
    """A newer provider may send keys an older gateway does not know."""
    got = SyncChapArgs.from_args({"volume": "data", "volume_id": "vol-1", "later": 1})
    assert got == SyncChapArgs("data", "vol-1")
    assert DescribeArgs.from_args({"n": 3}) == DescribeArgs()


def test_defaults_are_what_the_gateway_assumed_before() -> None:
    assert SnapshotArgs.from_args({"volume": "data"}) == SnapshotArgs("data", None, None, False)
    assert DeleteVolumeArgs.from_args({"volume": "data"}) == DeleteVolumeArgs("data", None, False)
    # A limit absent stays as it is; null means no limit (0), as 0 does.
    assert SetBandwidthArgs.from_args({}) == SetBandwidthArgs(None, None)
    assert SetBandwidthArgs.from_args({"upload": None, "download": 0}) == SetBandwidthArgs(0, 0)
    assert SetBandwidthArgs(upload=0).to_args() == {"upload": 0}


@pytest.mark.parametrize(
    ("schema", "args", "message"),
    [
        (SnapshotArgs, {}, "the command lacks 'volume'"),
        (SnapshotArgs, {"volume": ""}, "the command lacks 'volume'"),
        (SnapshotArgs, {"volume": "v", "description": 3}, "'description' is int, not text"),
        (SnapshotArgs, {"volume": "v", "wait": "yes"}, "'wait' is 'yes', not true or false"),
        (SyncChapArgs, {"volume": "v"}, "the command lacks 'volume_id'"),
        (DeleteVolumeArgs, {"volume": "v", "drain": 1}, "'drain' is 1, not true or false"),
        (CreateVolumeArgs, {"mode": "cached"}, "the command lacks 'name'"),
        (CreateVolumeArgs, {"name": "v", "mode": "cached"}, "the command lacks 'size'"),
        (
            CreateVolumeArgs,
            {"name": "v", "mode": "cached", "size": True, "volume_id": "x"},
            "'size' is True, not a whole number",
        ),
        (
            CreateVolumeArgs,
            {"name": "v", "mode": "cached", "size": "1G", "volume_id": "x"},
            "'size' is '1G', not a whole number",
        ),
        (
            CreateVolumeArgs,
            {"name": "v", "mode": "fast", "size": 4096, "volume_id": "x"},
            "mode 'fast' is not stored or cached",
        ),
        (
            CreateVolumeArgs,
            {"name": "v", "mode": "cached", "size": 4096, "volume_id": "x", "snapshot_id": 7},
            "'snapshot_id' is int, not text",
        ),
        # A volume's name, by the gateway's rule, whoever sent it: a name ending in a
        # newline (which re.match with "$" let through), a path, a space.
        *(
            (
                CreateVolumeArgs,
                {"name": bad, "mode": "cached", "size": 4096, "volume_id": "x"},
                f"the command's 'name' {bad!r} is not a volume name: give 1 to 64 letters",
            )
            for bad in ("vol\n", "../etc/x", "a b", "-v", "v" * 65)
        ),
        *(
            (
                schema,
                {"volume": "vol\n", "volume_id": "x"},
                "the command's 'volume' 'vol\\n' is not a volume name",
            )
            for schema in (SnapshotArgs, DeleteVolumeArgs, SyncChapArgs)
        ),
        (SetBandwidthArgs, {"upload": -1}, "upload bandwidth -1: give bytes per second"),
        (SetBandwidthArgs, {"download": "10M"}, "download bandwidth '10M': give bytes per"),
        (SetBandwidthArgs, {"download": 1.5}, "download bandwidth 1.5: give bytes per second"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(
    schema: type[CommandArgs], args: dict[str, Any], message: str
) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        schema.from_args(args)


# -- the provider's planner: what goes on the wire ----------------------------------------

ACCOUNT, GATEWAY = "acct-1", "gw-1"


def _volume(volume_id: str, name: str, mode: VolumeMode = VolumeMode.CACHED) -> VolumeInfo:
    return VolumeInfo(
        id=volume_id,
        account_id=ACCOUNT,
        gateway_id=GATEWAY,
        name=name,
        size=1 << 30,
        chunk_size=1 << 20,
        mode=mode,
        map_version=0,
        created=datetime.now(UTC),
        key_scope="k",
    )


class FakeBlocks:
    """The block service as the planner uses it: one volume on the gateway."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def get_volume(self, account: str, volume_id: str) -> VolumeInfo:
        assert (account, volume_id) == (ACCOUNT, "vol-1")
        return _volume("vol-1", "data")

    def create_volume(self, account: str, name: str, size: int, **kw: Any) -> VolumeInfo:
        self.created.append({"name": name, "size": size, **kw})
        return _volume("vol-2", name, kw["mode"])


class FakeGateways:
    def signing_key(self, gateway_id: str) -> Any:
        return SimpleNamespace(account_id=ACCOUNT)


@pytest.mark.parametrize(
    ("type_", "admin_args", "wire"),
    [
        ("describe", {}, "{}"),
        ("diagnostics", {}, "{}"),
        ("set_bandwidth", {"upload": 10, "download": 0}, '{"upload": 10, "download": 0}'),
        ("set_bandwidth", {"download": 5}, '{"download": 5}'),
        (
            "snapshot",
            {"volume_id": "vol-1"},
            '{"volume_id": "vol-1", "description": null, "wait": true, "volume": "data"}',
        ),
        (
            "snapshot",
            {"volume_id": "vol-1", "description": "before", "wait": False},
            '{"volume_id": "vol-1", "description": "before", "wait": false, "volume": "data"}',
        ),
        (
            "delete_volume",
            {"volume_id": "vol-1", "drain": True},
            '{"volume_id": "vol-1", "drain": true, "volume": "data"}',
        ),
        ("sync_chap", {"volume_id": "vol-1"}, '{"volume_id": "vol-1", "volume": "data"}'),
        (
            "create_volume",
            {"name": "new", "size": 1 << 30},
            '{"name": "new", "size": 1073741824, "mode": "cached", "volume_id": "vol-2", '
            '"snapshot_id": null}',
        ),
        (
            "create_volume",
            {"name": "new", "size": 1 << 30, "mode": "stored", "from_snapshot_id": "snap-1"},
            '{"name": "new", "size": 1073741824, "mode": "stored", "volume_id": "vol-2", '
            '"snapshot_id": "snap-1"}',
        ),
    ],
)
def test_the_planner_sends_what_earlier_versions_sent(
    type_: str, admin_args: dict[str, Any], wire: str
) -> None:
    planner = CommandPlanner(cast(BlockService, FakeBlocks()), cast(Gateways, FakeGateways()))
    prepared = planner.prepare(ACCOUNT, GATEWAY, type_, admin_args)
    assert json.dumps(prepared.args) == wire
    # ... and the gateway reads it with the same schema.
    assert SCHEMAS[type_].from_args(prepared.args).to_args() == prepared.args


class RecordingSettings:
    """Where the planner records what gateways report of their volumes' access."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, bool]]] = []

    def record_reported_access(self, gateway_id: str, legacy_open: dict[str, bool]) -> None:
        self.reports.append((gateway_id, legacy_open))


def finished(type_: str, status: str, result: dict[str, Any] | None) -> MessageInfo:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return MessageInfo(
        "m-1", ACCOUNT, GATEWAY, type_, {}, "k-1", status, None, now, now, now, 1, now, now,
        result, None,
    )  # fmt: skip


DESCRIBED = {
    "volumes": [
        {"name": "old", "remote_id": "vol-1", "iscsi_access": "OPEN (legacy)"},
        {"name": "new", "remote_id": "vol-2", "iscsi_access": "closed"},
        {"name": "local", "remote_id": None, "iscsi_access": "OPEN (legacy)"},
        {"name": "older", "remote_id": "vol-3"},  # a gateway from before access rules
    ]
}


@pytest.mark.parametrize(
    ("message", "reports"),
    [
        (
            finished("describe", "succeeded", DESCRIBED),
            [(GATEWAY, {"vol-1": True, "vol-2": False})],
        ),
        (finished("describe", "succeeded", {"volumes": [{"remote_id": "vol-3"}]}), []),
        (finished("describe", "failed", DESCRIBED), []),
        (finished("snapshot", "succeeded", DESCRIBED), []),
    ],
)
def test_a_describe_answer_records_which_volumes_are_legacy_open(
    message: MessageInfo, reports: list[tuple[str, dict[str, bool]]]
) -> None:
    settings = RecordingSettings()
    planner = CommandPlanner(
        cast(BlockService, FakeBlocks()),
        cast(Gateways, FakeGateways()),
        cast(VolumeSettings, settings),
    )
    asyncio.run(planner.follow_up(message))
    assert settings.reports == reports
