"""The gateway's console commands (sgw.gateway.link.command_runner) against an in-memory
gateway (``FakeHost``, a ``CommandHost``): what each command does on the gateway, in
which order, and what it refuses; the provider's answers to the access rules' fetch
come from an httpx ``MockTransport``. The integration tests
(tests/integration/test_control*.py) run the same commands on real gateways."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from sgw import __version__
from sgw.common.commands import TYPES
from sgw.common.errors import CommandError, RemoteError, SgwError, VolumeStateError
from sgw.gateway.config import RemoteConfig
from sgw.gateway.link import command_runner
from sgw.gateway.link.command_runner import BANDWIDTH_FILE, CommandRunner
from sgw.gateway.link.journal import Command
from sgw.gateway.lio.chap import ChapCredential, ChapStore, VolumeRules
from sgw.gateway.volume.engine import RegistryEntry, VolumeSpec
from sgw.gateway.volume.upload import TokenBucket
from sgw.gateway.volume.volume import VolumeStatus

URL = "http://provider.test"
T = TypeVar("T")


@dataclass
class FakeVolume:
    mode: str
    size: int
    status: VolumeStatus = VolumeStatus.AVAILABLE


@dataclass
class FakeHost:
    """A gateway in memory: volumes, registry, write log and iSCSI as plain data, every
    operation recorded in ``calls`` (in order)."""

    data_dir: str
    remote: RemoteConfig | None = field(default_factory=lambda: RemoteConfig(URL))
    iscsi: bool = False
    registry: dict[str, RegistryEntry] = field(default_factory=dict)
    volumes: dict[str, FakeVolume] = field(default_factory=dict)
    log_data: set[str] = field(default_factory=set)  # volumes the write log holds data of
    hurries_to_drain: int = 2  # hurry_destager calls until the log is drained
    connections: dict[str, int] = field(default_factory=dict)
    health_reports: int = 0
    bind_error: BaseException | None = None
    destage_error: str = ""
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    provider_auth: httpx.Auth = field(default_factory=httpx.Auth)
    download_bucket: TokenBucket = field(default_factory=lambda: TokenBucket(None))
    upload_bucket: TokenBucket | None = None
    chap: ChapStore = field(init=False)

    def __post_init__(self) -> None:
        self.chap = ChapStore(self.data_dir)
        if self.remote is not None:
            self.upload_bucket = TokenBucket(None)

    def add(self, name: str, *, remote_id: str | None = "vol-1", managed: bool = True) -> None:
        """A volume that exists already."""
        entry = RegistryEntry(len(self.registry) + 1, 1 << 20, "", remote_id, managed=managed)
        self.registry[name] = entry
        self.volumes[name] = FakeVolume("cached", 1 << 20)

    def configuration(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "remote": {"url": URL, "token": "t0ps3cret"}}

    def status(self) -> dict[str, Any]:
        return {"volumes": sorted(self.volumes)}

    async def snapshot(self, volume: str, description: str | None, wait: bool) -> dict[str, Any]:
        self.calls.append(("snapshot", volume, description, wait))
        return {"volume": volume, "state": "COMPLETED" if wait else "PENDING"}

    def control_info(self) -> dict[str, Any]:
        return {"connected": True}

    async def health_report(self) -> dict[str, Any]:
        self.health_reports += 1
        return {"seq": self.health_reports - 1, "report": {"seq": self.health_reports - 1}}

    def volume(self, name: str) -> FakeVolume | None:
        return self.volumes.get(name)

    async def create_volume(self, spec: VolumeSpec, remote_id: str) -> None:
        self.calls.append(("create", spec, remote_id))
        if spec.name in self.registry:
            raise VolumeStateError(f"a volume named {spec.name} exists on this gateway already")
        entry = RegistryEntry(
            len(self.registry) + 1,
            spec.size,
            spec.path,
            remote_id,
            mode=spec.mode,
            snapshot=spec.snapshot,
            managed=True,
        )
        self.registry[spec.name] = entry
        self.volumes[spec.name] = FakeVolume(spec.mode, spec.size)

    async def bind_volume(self, name: str) -> None:
        self.calls.append(("bind", name))
        if self.bind_error is not None:
            raise self.bind_error

    def serve_new_volume(self, name: str) -> None:
        self.calls.append(("serve", name))

    async def retire_volume(self, name: str) -> None:
        self.calls.append(("retire", name))

    async def remove_volume(self, name: str) -> None:
        self.calls.append(("remove", name))
        del self.registry[name], self.volumes[name]

    def connections_to(self, name: str) -> int:
        return self.connections.get(name, 0)

    async def unexport(self, name: str) -> None:
        self.calls.append(("unexport", name))

    async def reexport(self) -> None:
        self.calls.append(("reexport",))

    async def end_legacy_open(self, name: str) -> None:
        self.calls.append(("end_legacy_open", name, self.chap.load().get(name)))
        self.registry[name].iscsi_legacy_open = False

    def holds_log_data(self, name: str) -> bool:
        return name in self.log_data

    def hurry_destager(self) -> None:
        self.calls.append(("hurry",))
        self.hurries_to_drain -= 1
        if self.hurries_to_drain <= 0:
            self.log_data.clear()
            for entry in self.registry.values():
                entry.dirty = []


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def execute(runner: CommandRunner, type_: str, args: dict[str, Any] | None = None) -> Any:
    """Runs one command as the control channel would."""
    cmd = Command("c1", type_, args or {}, "k1", 0.0)
    return run(runner(cmd))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(str(tmp_path))


@pytest.fixture(autouse=True)
def quick_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command_runner, "DRAIN_POLL_S", 0.001)
    monkeypatch.setattr(command_runner, "DETACH_POLL_S", 0.001)
    monkeypatch.setattr(command_runner, "DETACH_WAIT_S", 0.05)


# -- dispatch ----------------------------------------------------------------------------


def test_an_unknown_command_is_refused_naming_the_version(host: FakeHost) -> None:
    with pytest.raises(CommandError) as err:
        execute(CommandRunner(host), "frobnicate")
    assert str(err.value) == (
        f"this gateway (sgw {__version__}) does not know the command 'frobnicate'; update it"
    )


@pytest.mark.parametrize("type_", TYPES)
def test_every_command_type_has_a_handler(host: FakeHost, type_: str) -> None:
    try:
        execute(CommandRunner(host), type_)
    except SgwError as exc:  # refused for lack of arguments, never as unknown
        assert "does not know the command" not in str(exc)


# -- state -------------------------------------------------------------------------------


def test_describe_adds_the_gateway_facts_to_its_status(host: FakeHost) -> None:
    host.add("data")
    assert host.upload_bucket is not None
    host.upload_bucket.set_rate(1000)
    got = execute(CommandRunner(host), "describe")
    assert got["volumes"] == ["data"]
    gateway = got["gateway"]
    assert gateway["version"] == __version__ and gateway["uptime_s"] >= 0
    assert gateway["bandwidth"] == {"upload": 1000, "download": None}
    assert gateway["control"] == {"connected": True}


def test_health_report_samples_through_the_host_each_time(host: FakeHost) -> None:
    runner = CommandRunner(host)
    assert execute(runner, "health_report") == {"seq": 0, "report": {"seq": 0}}
    assert execute(runner, "health_report")["seq"] == 1
    assert host.health_reports == 2


def test_health_report_runs_beside_other_commands() -> None:
    from sgw.gateway.link.channel import lane_of
    from sgw.gateway.link.journal import Command

    cmds = [Command(str(i), "health_report", {}, str(i), 0.0) for i in range(2)]
    assert lane_of(cmds[0]) != lane_of(cmds[1])
    assert lane_of(cmds[0]) != "gateway"


def test_diagnostics_bundle_holds_state_configuration_and_logs(host: FakeHost) -> None:
    host.add("data")
    host.registry["data"].restore_token = "tok"
    runner = CommandRunner(host)
    runner.install()
    try:
        logging.getLogger("sgw.test").warning("a line for the bundle")
        got = execute(runner, "diagnostics")
    finally:
        run(runner.close())
    bundle = base64.b64decode(got["bundle"])
    assert got["size"] == len(bundle) and got["sha256"] == hashlib.sha256(bundle).hexdigest()
    names = ["config.json", "control.json", "status.json", "system.json", "volumes.json"]
    assert got["files"] == [*names, "logs.jsonl"]
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        assert set(members) == set(got["files"])

        def doc(name: str) -> Any:
            f = tar.extractfile(members[name])
            assert f is not None
            return f.read()

        assert json.loads(doc("status.json")) == {"volumes": ["data"]}
        assert json.loads(doc("control.json")) == {"connected": True}
        volumes = json.loads(doc("volumes.json"))
        assert volumes["data"]["remote_id"] == "vol-1" and "restore_token" not in volumes["data"]
        config = json.loads(doc("config.json"))
        assert config["data_dir"] == host.data_dir
        assert b"t0ps3cret" not in doc("config.json")  # redacted
        assert b"a line for the bundle" in doc("logs.jsonl")


def test_snapshot_goes_to_the_admin_operations(host: FakeHost) -> None:
    host.add("data")
    got = execute(
        CommandRunner(host),
        "snapshot",
        {"volume_id": "vol-1", "description": "nightly", "wait": True, "volume": "data"},
    )
    assert got == {"volume": "data", "state": "COMPLETED"}
    assert host.calls == [("snapshot", "data", "nightly", True)]
    with pytest.raises(CommandError, match="the command lacks 'volume'"):
        execute(CommandRunner(host), "snapshot", {"volume_id": "vol-1"})


# -- create_volume -----------------------------------------------------------------------


def create_args(mode: str = "stored", **over: Any) -> dict[str, Any]:
    return {
        "name": "data",
        "size": 1 << 20,
        "mode": mode,
        "volume_id": "vol-9",
        "snapshot_id": None,
        **over,
    }


def test_create_volume_makes_binds_and_serves_it(host: FakeHost) -> None:
    got = execute(CommandRunner(host), "create_volume", create_args(snapshot_id="snap-1"))
    path = str(Path(host.data_dir) / "volumes" / "data.img")
    spec = VolumeSpec("data", 1 << 20, path, "stored", "snap-1")
    assert host.calls == [("create", spec, "vol-9"), ("bind", "data"), ("serve", "data")]
    assert got == {
        "name": "data",
        "mode": "stored",
        "size": 1 << 20,
        "remote_id": "vol-9",
        "snapshot_id": "snap-1",
        "status": str(VolumeStatus.AVAILABLE),
    }


def test_a_cached_volume_has_no_disk_file(host: FakeHost) -> None:
    execute(CommandRunner(host), "create_volume", create_args("cached"))
    assert host.calls[0] == ("create", VolumeSpec("data", 1 << 20, "", "cached", None), "vol-9")


def test_create_volume_again_answers_as_the_first_time(host: FakeHost) -> None:
    runner = CommandRunner(host)
    first = execute(runner, "create_volume", create_args())
    host.calls.clear()
    assert execute(runner, "create_volume", create_args()) == first
    assert host.calls == []


def test_create_volume_refuses_a_name_taken_by_another_volume(host: FakeHost) -> None:
    host.add("data", remote_id="vol-1")
    with pytest.raises(CommandError, match="a volume named data exists on this gateway"):
        execute(CommandRunner(host), "create_volume", create_args())
    assert host.calls == []


def test_create_volume_needs_a_provider(tmp_path: Path) -> None:
    host = FakeHost(str(tmp_path), remote=None)
    with pytest.raises(CommandError, match=r"no provider configured \(\[remote\] url\)"):
        execute(CommandRunner(host), "create_volume", create_args())
    assert host.calls == []


def test_create_volume_refuses_an_unknown_mode(host: FakeHost) -> None:
    with pytest.raises(CommandError, match="mode 'fast' is not stored or cached"):
        execute(CommandRunner(host), "create_volume", create_args("fast"))
    assert host.calls == []


@pytest.mark.parametrize("name", ["data\n", "../../etc/cron.d/x", "data.img/..", " data"])
def test_create_volume_refuses_a_name_the_gateway_would_not_give(host: FakeHost, name: str) -> None:
    """The gateway checks a name the provider sent by its own rule (the name becomes a
    disk file's and an NBD export's): nothing is made, nothing is written."""
    with pytest.raises(CommandError, match="is not a volume name"):
        execute(CommandRunner(host), "create_volume", create_args(name=name))
    assert host.calls == []
    assert not (Path(host.data_dir) / "volumes").exists()


@pytest.mark.parametrize("type_", ["snapshot", "delete_volume", "sync_chap"])
def test_commands_on_a_volume_refuse_a_name_with_a_newline(host: FakeHost, type_: str) -> None:
    host.add("data")
    with pytest.raises(CommandError, match="'volume' 'data\\\\n' is not a volume name"):
        execute(CommandRunner(host), type_, {"volume": "data\n", "volume_id": "vol-1"})
    assert host.calls == []


def test_a_volume_that_cannot_bind_is_removed_again(host: FakeHost) -> None:
    host.bind_error = RemoteError("the provider's volume vol-9 has another size")
    with pytest.raises(CommandError, match="volume data not created: the provider's volume"):
        execute(CommandRunner(host), "create_volume", create_args())
    assert [c[0] for c in host.calls] == ["create", "bind", "remove"]
    assert host.registry == {} and host.volumes == {}


def test_an_unexpected_bind_failure_removes_the_volume_and_propagates(host: FakeHost) -> None:
    host.bind_error = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        execute(CommandRunner(host), "create_volume", create_args())
    assert [c[0] for c in host.calls] == ["create", "bind", "remove"]


# -- delete_volume -----------------------------------------------------------------------


def delete_args(drain: bool = False) -> dict[str, Any]:
    return {"volume_id": "vol-1", "drain": drain, "volume": "data"}


def test_deleting_an_unknown_volume_is_done_already(host: FakeHost) -> None:
    got = execute(CommandRunner(host), "delete_volume", delete_args())
    assert got == {"name": "data", "deleted": False, "reason": "no such volume on this gateway"}


def test_delete_volume_removes_it_and_its_chap_credentials(host: FakeHost) -> None:
    host.iscsi = True
    host.add("data")
    host.chap.replace("data", VolumeRules(chap=(ChapCredential("iqn.x", "s" * 12),)))
    got = execute(CommandRunner(host), "delete_volume", delete_args())
    assert got == {"name": "data", "deleted": True, "remote_id": "vol-1"}
    assert host.calls == [("unexport", "data"), ("retire", "data"), ("remove", "data")]
    assert host.chap.load() == {}


def test_delete_volume_refuses_a_volume_bound_elsewhere(host: FakeHost) -> None:
    host.add("data", remote_id="vol-7")
    with pytest.raises(CommandError, match="volume data on this gateway is bound to vol-7, not"):
        execute(CommandRunner(host), "delete_volume", delete_args())
    assert host.calls == []


def test_delete_volume_refuses_a_configured_volume(host: FakeHost) -> None:
    host.add("data", managed=False)
    with pytest.raises(CommandError, match="in the gateway's configuration: remove it there"):
        execute(CommandRunner(host), "delete_volume", delete_args())
    assert host.calls == []


def test_delete_volume_refuses_data_not_uploaded_without_drain(host: FakeHost) -> None:
    host.add("data")
    host.log_data.add("data")
    with pytest.raises(CommandError, match=r"write log still holds data of volume data.*drain"):
        execute(CommandRunner(host), "delete_volume", delete_args())
    assert host.calls == []


def test_a_volume_in_use_is_exported_again_and_kept(host: FakeHost) -> None:
    host.iscsi = True
    host.add("data")
    host.connections["data"] = 2
    with pytest.raises(CommandError, match=r"in use by 2 NBD connection\(s\)"):
        execute(CommandRunner(host), "delete_volume", delete_args())
    assert host.calls == [("unexport", "data"), ("reexport",)]
    assert "data" in host.registry


def test_delete_with_drain_waits_for_the_log_and_the_dirty_ranges(host: FakeHost) -> None:
    host.add("data")
    host.log_data.add("data")
    host.registry["data"].dirty = [[0, 4096]]
    host.hurries_to_drain = 3
    got = execute(CommandRunner(host), "delete_volume", delete_args(drain=True))
    assert got["deleted"] is True
    assert host.calls == [("hurry",)] * 3 + [("retire", "data"), ("remove", "data")]


def test_a_drain_that_does_not_finish_refuses_the_delete(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command_runner, "DRAIN_TIMEOUT_S", 0.02)
    host.add("data")
    host.log_data.add("data")
    host.hurries_to_drain = 1 << 30
    host.destage_error = "503 from the provider"
    with pytest.raises(CommandError, match=r"did not leave the write log .*503 from the provider"):
        execute(CommandRunner(host), "delete_volume", delete_args(drain=True))
    assert "data" in host.registry


# -- sync_chap: the volume's access rules ----------------------------------------------

HOST_A = "iqn.2024-01.test:a"
HOST_B = "iqn.2024-01.test:b"
HOST_C = "iqn.2024-01.test:c"
ACCESS = {
    "chap": [
        {"initiator": HOST_B, "secret": "b" * 12, "target_secret": "t" * 12},
        {"initiator": HOST_A, "secret": "a" * 12, "target_secret": None},
    ],
    "acl": [HOST_C],
    "open": False,
}


def access_provider(
    answers: dict[str, tuple[int, Any]],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A provider answering by path (a path not listed: 404, as a route it lacks)."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body = answers.get(request.url.path, (404, {"detail": "Not Found"}))
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(answer), seen


def sync(host: FakeHost, transport: httpx.MockTransport) -> Any:
    runner = CommandRunner(host, transport=transport)
    try:
        return execute(runner, "sync_chap", {"volume_id": "vol-1", "volume": "data"})
    finally:
        run(runner.close())


def test_sync_fetches_and_stores_the_access_rules(host: FakeHost) -> None:
    host.add("data")
    host.registry["data"].iscsi_legacy_open = True
    transport, seen = access_provider({"/v1/gateway/volumes/vol-1/access": (200, ACCESS)})
    got = sync(host, transport)
    assert [str(r.url) for r in seen] == [f"{URL}/v1/gateway/volumes/vol-1/access"]
    assert got == {
        "volume": "data",
        "initiators": [
            {"initiator": HOST_B, "mutual": True},
            {"initiator": HOST_A, "mutual": False},
        ],
        "acl": [HOST_C],
        "open": False,
        "iscsi_access": "chap 2, acl 1",
    }
    assert host.chap.load() == {
        "data": VolumeRules(
            chap=(
                ChapCredential(HOST_A, "a" * 12, None),
                ChapCredential(HOST_B, "b" * 12, "t" * 12),
            ),
            initiators=(HOST_C,),
        )
    }
    assert "a" * 12 not in json.dumps(got)  # no secret in the reply
    # Legacy open ended before the rules were written (a crash between leaves it closed).
    assert host.calls == [("end_legacy_open", "data", None)]
    assert host.registry["data"].iscsi_legacy_open is False


def test_sync_of_no_rules_closes_the_volume(host: FakeHost) -> None:
    """The last rule removed at the provider: the volume leaves chap.json (closed)."""
    host.add("data")
    host.chap.replace("data", VolumeRules(initiators=(HOST_C,)))
    empty = {"chap": [], "acl": [], "open": False}
    transport, _seen = access_provider({"/v1/gateway/volumes/vol-1/access": (200, empty)})
    assert sync(host, transport)["iscsi_access"] == "closed"
    assert host.chap.load() == {}


def test_sync_stores_the_open_flag(host: FakeHost) -> None:
    host.add("data")
    flagged = {**ACCESS, "open": True}
    transport, _seen = access_provider({"/v1/gateway/volumes/vol-1/access": (200, flagged)})
    assert sync(host, transport)["iscsi_access"] == "OPEN"
    assert host.chap.load()["data"].open


def test_sync_from_a_provider_without_access_rules_takes_its_chap(host: FakeHost) -> None:
    """A provider from before access rules has only the CHAP route: its credentials are
    the volume's rules."""
    host.add("data")
    transport, seen = access_provider({"/v1/gateway/volumes/vol-1/chap": (200, ACCESS["chap"])})
    assert sync(host, transport)["iscsi_access"] == "chap 2"
    assert [r.url.path for r in seen] == [
        "/v1/gateway/volumes/vol-1/access",
        "/v1/gateway/volumes/vol-1/chap",
    ]
    assert host.chap.load()["data"].initiators == ()


def test_sync_refuses_rules_lio_would_refuse_and_stores_nothing(host: FakeHost) -> None:
    """One bad name would make chap.json unreadable for every volume (fail closed):
    refused here, with the name, before anything is written."""
    host.add("data")
    host.registry["data"].iscsi_legacy_open = True
    bad = {**ACCESS, "acl": ["iqn.x:y"]}
    transport, _seen = access_provider({"/v1/gateway/volumes/vol-1/access": (200, bad)})
    with pytest.raises(CommandError, match=r"'iqn\.x:y' is not an iSCSI initiator name"):
        sync(host, transport)
    assert host.chap.load() == {} and host.calls == []
    assert host.registry["data"].iscsi_legacy_open is True


def test_sync_refuses_an_unknown_or_foreign_volume(host: FakeHost) -> None:
    transport, seen = access_provider({})
    with pytest.raises(CommandError, match="no volume named 'data' on this gateway"):
        sync(host, transport)
    host.add("data", remote_id="vol-7")
    with pytest.raises(CommandError, match="volume data is bound to vol-7, not vol-1"):
        sync(host, transport)
    assert seen == []


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        (
            {"/v1/gateway/volumes/vol-1/chap": (404, "no such volume")},
            "access rules of vol-1: 404 no such volume",
        ),
        (
            {"/v1/gateway/volumes/vol-1/access": (403, "not yours")},
            "access rules of vol-1: 403 not yours",
        ),
        (
            {"/v1/gateway/volumes/vol-1/access": (200, {"chap": []})},
            "access rules of vol-1 are malformed",
        ),
    ],
)
def test_sync_reports_the_providers_refusal(
    host: FakeHost, answers: dict[str, tuple[int, Any]], message: str
) -> None:
    host.add("data")
    transport, _seen = access_provider(answers)
    with pytest.raises(CommandError, match=message):
        sync(host, transport)
    assert host.chap.load() == {}


# -- set_bandwidth -----------------------------------------------------------------------


def test_set_bandwidth_applies_and_keeps_the_limits(host: FakeHost) -> None:
    runner = CommandRunner(host)
    got = execute(runner, "set_bandwidth", {"upload": 1000, "download": 2000})
    assert got == {"upload": 1000, "download": 2000}
    assert host.upload_bucket is not None and host.upload_bucket.rate == 1000
    assert host.download_bucket.rate == 2000
    stored = Path(host.data_dir, BANDWIDTH_FILE)
    assert json.loads(stored.read_text()) == got
    # A limit not given stays; 0 lifts one.
    got = execute(runner, "set_bandwidth", {"upload": 0})
    assert got == {"upload": None, "download": 2000} == json.loads(stored.read_text())
    assert host.upload_bucket.rate is None and host.download_bucket.rate == 2000


def test_stored_limits_apply_at_start(host: FakeHost) -> None:
    Path(host.data_dir, BANDWIDTH_FILE).write_text('{"upload": 300, "download": null}')
    runner = CommandRunner(host)
    runner.install()
    run(runner.close())
    assert host.upload_bucket is not None and host.upload_bucket.rate == 300
    assert host.download_bucket.rate is None


def test_set_bandwidth_refuses_a_bad_rate(host: FakeHost) -> None:
    with pytest.raises(CommandError, match="upload bandwidth -5: give bytes per second"):
        execute(CommandRunner(host), "set_bandwidth", {"upload": -5})
    assert not Path(host.data_dir, BANDWIDTH_FILE).exists()


def test_a_gateway_without_provider_has_no_upload_limit(tmp_path: Path) -> None:
    host = FakeHost(str(tmp_path), remote=None)
    runner = CommandRunner(host)
    with pytest.raises(CommandError, match=r"uploads nothing \(no \[remote\]\): no upload limit"):
        execute(runner, "set_bandwidth", {"upload": 1000})
    assert execute(runner, "set_bandwidth", {"download": 50}) == {"upload": None, "download": 50}


# -- update ------------------------------------------------------------------------------


def test_update_is_handed_to_the_update_agent_and_replies_its_answer(
    host: FakeHost, tmp_path: Path
) -> None:
    """The runner sends the agent's socket one "check" line and replies what it answers."""
    path = str(tmp_path / "agent.sock")
    asked: list[dict[str, Any]] = []

    async def scenario() -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            asked.append(json.loads(await reader.readline()))
            answer = {"ok": True, "state": "downloading", "version": "2.0.0"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        try:
            runner = CommandRunner(host, update_socket=path)
            return await runner(Command("c1", "update", {"version": "2.0.0", "now": True}, "k", 0))
        finally:
            server.close()
            await server.wait_closed()

    got = run(scenario())
    assert asked == [{"op": "check", "version": "2.0.0", "now": True}]
    assert got == {"state": "downloading", "version": "2.0.0"}


def test_update_without_an_agent_names_the_socket_and_the_fix(
    host: FakeHost, tmp_path: Path
) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(CommandError) as err:
        execute(CommandRunner(host, update_socket=path), "update", {"now": True})
    assert str(err.value) == (
        f"no update agent listens at {path}: start it (systemctl start sgw-update-agent on "
        "the appliance) or check [updates] socket"
    )
    with pytest.raises(CommandError, match="runs no update agent"):
        execute(CommandRunner(host), "update", {})


def test_an_agent_refusal_becomes_the_commands_failure(host: FakeHost, tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")

    async def scenario() -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b'{"ok": false, "error": "not activated"}\n')
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        try:
            return await CommandRunner(host, update_socket=path)(
                Command("c1", "update", {}, "k", 0)
            )
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(CommandError, match="the update agent refused: not activated"):
        run(scenario())
