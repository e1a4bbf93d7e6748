"""Credentials stay on TLS where they should, with the real processes: a gateway reached
over https ignores a control server the provider advertises in plain http; a gateway
refuses plain-http control servers in its configuration; `sgw provider serve
--insecure-dev` listens on loopback only; the admin CLI sends its token over plain http
to another machine only when told to, and to loopback as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.daemons import (
    SGW,
    GatewayProcess,
    ProviderProcess,
    free_port,
    non_loopback_address,
)
from tests.fixtures.management import SecureProvider, activated_gateway, cli_json, start_servers
from tests.fixtures.waiting import wait_for


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SGW, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_gateway_adopts_no_plain_http_control_server_after_https(
    tmp_path: Path,
    secure_provider_factory: type[SecureProvider],
    provider_factory: type[ProviderProcess],
    gateway_factory: type[GatewayProcess],
) -> None:
    db = f"sqlite:///{tmp_path / 'provider.db'}"
    a, b = start_servers(tmp_path, secure_provider_factory, db, 2)
    # A third control server of the same provider (its database, keys and secret), but
    # without the TLS files: it serves and advertises plain http on loopback.
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir(mode=0o700)
    for name in ("master.key", "control.secret"):
        shutil.copy2(a.data_dir / name, plain_dir / name)
    plain = provider_factory(plain_dir, insecure_dev=False, db_url=db).start()
    assert plain.url.startswith("http://127.0.0.1:")

    gw, gid = activated_gateway(tmp_path, a, gateway_factory, ["local0:16M"])

    def servers() -> list[str]:
        """The control servers the gateway knows, asked through the console (the poll
        answer that brings the command names every live control server)."""
        doc: dict[str, Any] = cli_json(a, "gateways", "local-state", gid)
        return list(doc["gateway"]["control"]["servers"])

    warning = f"control server {plain.url} ignored: plain http where the provider"

    def warned() -> int:
        return sum(m.startswith(warning) for m in gw.log_messages())

    # Each answer names every live server once the provider's heartbeats (2 s) saw them.
    wait_for(lambda: servers() and warned(), what="an answer naming the plain server")
    assert servers() == [a.url, b.url]  # b adopted (https), the plain one not
    assert warned() == 1  # once, however many answers named it


def test_gateway_refuses_plain_http_control_servers_in_its_configuration(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "gateway.toml"
    cases = [
        (
            '[remote]\nurl = "https://p.example:8480"\n'
            '[control]\nurls = ["http://127.0.0.1:8481"]\n',
            "control.urls: http://127.0.0.1:8481 is plain http where the provider is reached "
            "over https (a downgrade); use https, as remote.url does",
        ),
        (
            '[remote]\nurl = "http://127.0.0.1:8480"\n[control]\nurls = ["http://10.9.8.7:8481"]\n',
            "control.urls: http://10.9.8.7:8481 is plain http to another machine; use https "
            "(with remote.ca) or set remote.insecure_http = true on a development network",
        ),
    ]
    for toml, message in cases:
        conf.write_text(toml)
        res = run(
            *("gateway", "serve", "--data-dir", str(tmp_path / "gw"), "--config", str(conf)),
            *("--volume", "vol0:16M", "--nbd", f"unix:{tmp_path / 'nbd.sock'}"),
        )
        assert res.returncode == 2, res.stderr
        assert message in res.stderr
        assert not (tmp_path / "nbd.sock").exists()


def test_insecure_dev_provider_listens_on_loopback_only(
    tmp_path: Path, provider_factory: type[ProviderProcess]
) -> None:
    hosts = ["0.0.0.0", "[::]"]
    own = non_loopback_address()
    if own is not None:
        hosts.append(own)
    for host in hosts:
        for extra in ([], ["--insecure-http"]):
            res = run(
                *("provider", "serve", "--data-dir", str(tmp_path / "p"), "--insecure-dev"),
                *("--listen", f"{host}:{free_port()}", *extra),
            )
            assert res.returncode == 2, (host, extra, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "is not loopback, and --insecure-dev" in lines[0]
            assert "listen on 127.0.0.1" in lines[0]
    # On loopback it serves, without authentication, as before.
    dev = provider_factory(tmp_path / "dev").start()
    assert dev.url.startswith("http://127.0.0.1:")


def test_cli_sends_its_token_in_plain_http_to_another_machine_only_when_told(
    tmp_path: Path, provider_factory: type[ProviderProcess]
) -> None:
    own = non_loopback_address()
    if own is None:
        pytest.skip("this machine has no address beyond loopback to listen on")
    doc = json.loads(
        run(
            "provider", "init", "--data-dir", str(tmp_path / "p"), "--no-tls", "--output", "json"
        ).stdout
    )
    # An authenticated provider in plain http on every address, as on a development network.
    p = provider_factory(
        tmp_path / "p", insecure_dev=False, listen_host="0.0.0.0", extra_args=["--insecure-http"]
    ).start()
    env = {**os.environ, "SGW_TOKEN": doc["token"], "SGW_CONFIG": os.devnull + ".absent"}
    env.pop("SGW_INSECURE_HTTP", None)
    beyond = f"http://{own}:{p.port}"
    show = ("accounts", "show", "--output", "json")

    refused = run(*show, "--endpoint", beyond, env=env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        f"sgw: error: endpoint {beyond} is plain http to another machine, which would send the API "
        "token unencrypted: use https:// (with SGW_CA, the provider's tls/ca.pem), or pass "
        "--insecure-http (or set SGW_INSECURE_HTTP=1) on a development network"
    )
    # Told so, it sends it (the same provider answers, so the refusal above was the CLI's).
    for told in (
        run(*show, "--endpoint", beyond, "--insecure-http", env=env),
        run(*show, "--endpoint", beyond, env={**env, "SGW_INSECURE_HTTP": "1"}),
        # Plain http to loopback needs nothing.
        run(*show, "--endpoint", p.url, env=env),
    ):
        assert told.returncode == 0, told.stderr
        assert json.loads(told.stdout)["id"] == doc["account_id"]
