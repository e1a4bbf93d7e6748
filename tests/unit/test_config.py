"""Configuration: flags and TOML, and the one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgw.common.errors import ConfigError
from sgw.gateway.config import Listener, load, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30), ("1TiB", 1 << 40), (8192, 8192)],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text, "x") == expected


@pytest.mark.parametrize("text", ["abc", "-1", "0", "10X", ""])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match="volume size"):
        parse_size(text, "volume size")


def test_flags(tmp_path: Path) -> None:
    cfg = load(
        data_dir=str(tmp_path),
        volumes=["a:1G", "b:4M"],
        nbd=["unix:/tmp/x.sock", "tcp:127.0.0.1:10809"],
        log_size="256M",
    )
    assert [(v.name, v.size) for v in cfg.volumes] == [("a", 1 << 30), ("b", 4 << 20)]
    assert cfg.volumes[0].path == str(tmp_path / "volumes" / "a.img")
    assert cfg.listeners == (
        Listener("unix", path="/tmp/x.sock"),
        Listener("tcp", host="127.0.0.1", port=10809),
    )
    assert cfg.log_size == 256 << 20
    assert cfg.log_path == str(tmp_path / "writelog")


def test_toml_and_flags_combine(tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f"""
data_dir = "{tmp_path}"
log_level = "debug"
[write_log]
size = "200M"
[destage]
start_fill = 0.5
idle_seconds = 3
batch = "8M"
[nbd]
listen = ["unix:{tmp_path}/n.sock"]
[[volumes]]
name = "db"
size = "2G"
path = "{tmp_path}/db.img"
"""
    )
    cfg = load(str(conf), volumes=["extra:1G"])
    assert [v.name for v in cfg.volumes] == ["db", "extra"]
    assert cfg.volumes[0].path == f"{tmp_path}/db.img"
    assert cfg.destage.start_fill == 0.5
    assert cfg.destage.batch_bytes == 8 << 20
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"volumes": ["vol0"]}, "NAME:SIZE"),
        ({"volumes": ["vol0:abc"]}, "not a size"),
        ({"volumes": ["bad/name:1G"]}, "not valid"),
        ({"volumes": ["vol0\n:1G"]}, "volume name 'vol0\\\\n' is not valid"),
        ({"volumes": ["a:1G", "a:2G"]}, "configured twice"),
        ({"volumes": ["a:1000"]}, "multiple of 4 KiB"),
        ({"volumes": []}, "no volumes"),
        ({"volumes": ["a:1G"], "nbd": ["foo"]}, "unix:PATH or tcp:HOST:PORT"),
        ({"volumes": ["a:1G"], "nbd": ["tcp:127.0.0.1:99999"]}, "tcp:HOST:PORT"),
        ({"volumes": ["a:1G"], "log_size": "1M"}, "too small"),
        ({"volumes": ["a:1G"], "log_level": "loud"}, "log_level"),
    ],
)
def test_bad_values(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(data_dir=str(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_no_data_dir() -> None:
    with pytest.raises(ConfigError, match="--data-dir"):
        load(volumes=["a:1G"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("data_dir = ", "not valid TOML"),
        ('data_dir = "/x"\nbogus = 1', "unknown key 'bogus'"),
        ('data_dir = "/x"\n[destage]\nstart_fill = 2', "destage.start_fill"),
        ('data_dir = "/x"\n[[volumes]]\nname = "a"', "needs a name and a size"),
        ('data_dir = "/x"\n[write_log]\nsize = "1M"', "too small"),
        ('data_dir = "/x"\n[[volumes]]\nname = "a\\n"\nsize = "1G"', "name 'a\\\\n' is not valid"),
    ],
)
def test_bad_toml(tmp_path: Path, body: str, message: str) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load(str(conf))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(str(tmp_path / "nope.toml"))


def _remote_toml(tmp_path: Path, extra: str) -> str:
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[remote]\nurl = "http://127.0.0.1:8480"\n{extra}')
    return str(conf)


@pytest.mark.parametrize(
    ("line", "expected"),
    [("", 4), ("pack_chunks = 1\n", 1), ("pack_chunks = 8\n", 8), ("pack_chunks = 64\n", 64)],
)
def test_remote_pack_chunks(tmp_path: Path, line: str, expected: int) -> None:
    cfg = load(_remote_toml(tmp_path, line), data_dir=str(tmp_path), volumes=["a:1G"])
    assert cfg.remote is not None and cfg.remote.pack_chunks == expected


@pytest.mark.parametrize("value", ["0", "65", "-1", '"4"', "true", "false", "4.0", "[4]"])
def test_bad_remote_pack_chunks_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    conf = _remote_toml(tmp_path, f"pack_chunks = {value}\n")
    with pytest.raises(ConfigError, match=r"^remote\.pack_chunks: .* from 1 to 64$") as info:
        load(conf, data_dir=str(tmp_path), volumes=["a:1G"])
    assert "\n" not in str(info.value)


def test_chunks_in_flight_are_bounded(tmp_path: Path) -> None:
    """concurrency x pack_chunks chunks are held in memory at once: at most 512."""
    ok = load(
        _remote_toml(tmp_path, "concurrency = 8\npack_chunks = 64\n"),
        data_dir=str(tmp_path),
        volumes=["a:1G"],
    )
    assert ok.remote is not None and ok.remote.concurrency * ok.remote.pack_chunks == 512
    conf = _remote_toml(tmp_path, "concurrency = 16\npack_chunks = 64\n")
    with pytest.raises(ConfigError, match=r"concurrency x remote\.pack_chunks = 1024: at most 512"):
        load(conf, data_dir=str(tmp_path), volumes=["a:1G"])


def test_updates_section_defaults_and_values(tmp_path: Path) -> None:
    cfg = load(data_dir=str(tmp_path), volumes=["a:1G"])
    assert cfg.updates.enabled and cfg.updates.check_interval == 900.0
    assert cfg.updates.socket == "/run/sgw/update-agent.sock"
    assert cfg.updates.root == "/opt/sgw"
    f = tmp_path / "gw.toml"
    f.write_text(
        '[updates]\nenabled = false\ncheck_interval = 60\nsocket = "run/a.sock"\nroot = "/x"\n'
    )
    cfg = load(str(f), data_dir=str(tmp_path), volumes=["a:1G"])
    assert not cfg.updates.enabled and cfg.updates.check_interval == 60.0
    assert cfg.updates.socket == str(Path("run/a.sock").resolve()) and cfg.updates.root == "/x"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("check_interval = 0", "updates.check_interval: 0 must be 0.1 to 86400 seconds"),
        ("enabled = 1", "updates.enabled: must be true or false"),
        ("root = 3", 'updates.root: must be a path like "/opt/sgw"'),
        ("interval = 3", r"\[updates\] has unknown key\(s\) \['interval'\]"),
    ],
)
def test_bad_updates_values(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "gw.toml"
    f.write_text(f"[updates]\n{body}\n")
    with pytest.raises(ConfigError, match=message):
        load(str(f), data_dir=str(tmp_path), volumes=["a:1G"])
