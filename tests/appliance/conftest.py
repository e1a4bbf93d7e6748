"""The booted appliance: the image from ``make image`` under QEMU (TCG), one boot for
the whole session, activated and given its volumes through the management plane.

A provider runs on the host as a user would run one: ``sgw provider init`` (its CA's
certificate names 10.0.2.100, the address the guest reaches it by) and ``sgw provider
serve`` over HTTPS on 127.0.0.1. The guest is on QEMU user networking with
``restrict=on``: the host reaches it only through forwards bound to 127.0.0.1 (ssh,
iSCSI, the activation page) and the guest reaches only the provider (``guestfwd``
10.0.2.100:8480). A seed disk (ext4 labelled sgw-seed, made without mounting) brings the
admin's ssh key, the gateway's configuration (no volumes; the provider; LIO on) and the
provider's CA. The session then activates the appliance with the key its activation
page hands out (``sgw activate``); volumes are made with ``sgw volumes create --gateway``
through the control channel.

The image is found through ``dist/manifest.json``; without it the tests are skipped,
unless ``SGW_APPLIANCE_REQUIRED=1`` (``make test`` sets it) makes that a failure.
Tests marked ``appliance_full`` run in ``make test-appliance`` only; ``make test`` runs
the others (``-m "not appliance_full"``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.fixtures.appliance import Appliance, image_path, start_provider


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "appliance_full: in make test-appliance only (make test runs the others)"
    )


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """The appliance, booted and activated once; powered off (or killed) at the end."""
    image = image_path()
    if image is None:
        message = "no appliance image in dist/: run `make image`"
        if os.environ.get("SGW_APPLIANCE_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    for tool in ("qemu-system-x86_64", "qemu-img", "mke2fs", "socat", "ssh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run `make setup` (scripts/install-host-deps)")
    workdir = tmp_path_factory.mktemp("appliance")
    provider = start_provider(workdir / "provider")
    box = Appliance(workdir, image, provider)
    try:
        box.prepare()
        box.boot()
        box.activate()
        yield box
    finally:
        running = box.proc is not None and box.proc.poll() is None
        if running and box.poweroff(60.0) == float("inf"):
            box.kill()
        for client in provider.clients:
            client.close()
        provider.kill()


@pytest.fixture(scope="session")
def vol0(appliance: Appliance) -> str:
    """A 256 MiB volume made through the control channel; INITIATOR logs in with CHAP
    (set with `sgw volumes chap-set`), nobody else."""
    if "vol0" not in appliance.volumes:
        appliance.create_volume("vol0")
        appliance.chap_set("vol0")
    return "vol0"


@pytest.fixture(scope="session")
def vol1(appliance: Appliance) -> str:
    """A second one, CHAP as vol0 (iscsi-test-cu writes it; the delete test removes it)."""
    if "vol1" not in appliance.volumes:
        appliance.create_volume("vol1")
        appliance.chap_set("vol1")
    return "vol1"
