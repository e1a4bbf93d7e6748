"""The lock files (requirements/*.lock, `make lock`) hold what pyproject.toml asks for:
every dependency pinned to one version that its specifier admits, with hashes, and the
runtime pins the same in the development lock (the setup installs from dev.lock, release
slots from runtime.lock: tests run against the versions the appliance ships)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^ \\]+)")


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """A lock file's pins: name -> (version, number of hashes)."""
    out: dict[str, tuple[Version, int]] = {}
    current = None
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            out[current] = (Version(m.group(2)), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = out[current]
            out[current] = (version, hashes + 1)
    return out


def project() -> dict[str, list[str]]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"runtime": doc["dependencies"], "dev": doc["optional-dependencies"]["dev"]}


def check(requirements: list[str], locked: dict[str, tuple[Version, int]]) -> list[str]:
    problems = []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in locked:
            problems.append(f"{req.name} is not in the lock: run `make lock`")
            continue
        version, hashes = locked[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: locked {version} is outside {req.specifier}")
        if hashes == 0:
            problems.append(f"{req.name}: no hash in the lock")
    return problems


def test_runtime_lock_holds_every_dependency() -> None:
    assert check(project()["runtime"], pins("runtime.lock")) == []


def test_dev_lock_holds_everything_and_the_same_runtime_pins() -> None:
    deps = project()
    dev = pins("dev.lock")
    assert check(deps["runtime"] + deps["dev"], dev) == []
    runtime = pins("runtime.lock")
    differ = {n: (v, dev[n][0]) for n, (v, _) in runtime.items() if n in dev and dev[n][0] != v}
    assert differ == {}, f"runtime and dev locks disagree (run `make lock`): {differ}"
    assert set(runtime) <= set(dev), set(runtime) - set(dev)
    assert all(hashes > 0 for _, hashes in dev.values())


def test_the_check_finds_a_missing_or_unmatched_pin() -> None:
    locked = {"tuf": (Version("7.0.1"), 2)}
    assert check(["tuf>=5", "rich>=13", "tuf>=8"], locked) == [
        "rich is not in the lock: run `make lock`",
        "tuf: locked 7.0.1 is outside >=8",
    ]
