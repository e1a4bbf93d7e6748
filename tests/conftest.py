"""Shared fixtures: a real gateway daemon started as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.management"]

SGW = str(Path(sys.executable).with_name("sgw"))
# The smallest log the gateway accepts (128 MiB of data area plus the superblocks).
SMALL_LOG = "129M"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """What the daemons started by the tests share: their stderr log and a clean stop."""

    proc: subprocess.Popen[bytes] | None
    stderr_path: Path | None

    def log_text(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc


@dataclass
class GatewayProcess(DaemonProcess):
    """A running ``sgw gateway serve``; restartable on the same data directory."""

    data_dir: Path
    volumes: list[str]
    log_size: str = SMALL_LOG
    tcp_port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None

    @property
    def sock(self) -> str:
        return str(self.data_dir / "nbd.sock")

    def uri(self, export: str = "vol0") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def tcp_uri(self, export: str = "vol0") -> str:
        assert self.tcp_port is not None
        return f"nbd://127.0.0.1:{self.tcp_port}/{export}"

    def args(self) -> list[str]:
        args = [SGW, "gateway", "serve", "--data-dir", str(self.data_dir)]
        for v in self.volumes:
            args += ["--volume", v]
        args += ["--nbd", f"unix:{self.sock}", "--log-size", self.log_size]
        if self.tcp_port is not None:
            args += ["--nbd", f"tcp:127.0.0.1:{self.tcp_port}"]
        return args + self.extra_args

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.stderr_path = self.data_dir.with_suffix(".stderr")
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log_text()}")
            if os.path.exists(self.sock):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.sock)
                        s.recv(8)
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"gateway did not start: {self.log_text()}")

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def remote_id(gw: GatewayProcess, volume: str = "vol0") -> str | None:
    """The provider's id of the gateway's volume, once the provider made it (from the
    gateway's registry; None before)."""
    try:
        doc = json.loads((gw.data_dir / "volumes.json").read_text())
    except (OSError, ValueError):
        return None
    entry = doc.get(volume, {})
    value = entry.get("remote_id")
    if value is None or entry.get("remote_created") is False:  # chosen, not made yet
        return None
    return str(value)


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[type[GatewayProcess]]:
    started: list[GatewayProcess] = []

    class Factory(GatewayProcess):
        def start(self, timeout: float = 20.0) -> GatewayProcess:
            started.append(self)
            return super().start(timeout)

    yield Factory
    for g in started:
        if g.proc is not None and g.proc.poll() is None:
            g.proc.kill()
            g.proc.wait(10)


@pytest.fixture
def gateway(tmp_path: Path, gateway_factory: type[GatewayProcess]) -> GatewayProcess:
    """One gateway with a 1 GiB volume ``vol0`` on a unix socket and loopback TCP."""
    g = gateway_factory(tmp_path / "gw", ["vol0:1G"], tcp_port=free_port())
    return g.start()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; run `make setup` (scripts/install-host-deps)")
    return path


@dataclass
class ProviderProcess(DaemonProcess):
    """A running ``sgw provider serve`` on loopback; restartable on the same data directory.

    ``env`` is added to this process's environment only (e.g. S3 credentials).
    """

    data_dir: Path
    insecure_dev: bool = True
    db_url: str | None = None
    store_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [SGW, "provider", "serve", "--data-dir", str(self.data_dir)]
        args += ["--listen", f"127.0.0.1:{self.port}"]
        if self.db_url is not None:
            args += ["--db", self.db_url]
        if self.store_url is not None:
            args += ["--store", self.store_url]
        if self.insecure_dev:
            args.append("--insecure-dev")
        return args

    def start(self, timeout: float = 20.0) -> ProviderProcess:
        """Starts it and waits until /v1/health answers."""
        import httpx

        self.stderr_path = self.data_dir.with_suffix(".stderr")
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.args(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"provider exited {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.proc.kill()
        self.proc.wait(10)
        raise RuntimeError(f"provider did not answer /v1/health: {self.log_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def provider_factory() -> Iterator[type[ProviderProcess]]:
    """``ProviderProcess`` whose instances are killed at the end of the test if running."""
    started: list[ProviderProcess] = []

    class Factory(ProviderProcess):
        def start(self, timeout: float = 20.0) -> ProviderProcess:
            started.append(self)
            return super().start(timeout)

    yield Factory
    for p in started:
        p.kill()


@pytest.fixture
def provider(tmp_path: Path, provider_factory: type[ProviderProcess]) -> ProviderProcess:
    """One provider in ``--insecure-dev`` mode: SQLite and a directory store in tmp_path."""
    return provider_factory(tmp_path / "provider").start()
