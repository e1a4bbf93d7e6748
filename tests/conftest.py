"""Fixtures every kind of test may use: the daemons (``tests.fixtures.daemons``) started
and cleaned up per test, and the fixture modules of ``tests.fixtures`` as plugins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.daemons import GatewayProcess, ProviderProcess, free_port

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.postgres",
    "tests.fixtures.management",
    "tests.fixtures.block_service",
]


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
