"""Where credentials may travel in plain http (sgw.common.transport) and how each side
applies that one rule: the gateway's [remote] url and [control] urls, the provider's
--insecure-dev (loopback only) and the admin CLI's endpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sgw.cli import config as cli_config
from sgw.cli.client import ApiClient
from sgw.common.errors import ConfigError
from sgw.common.transport import (
    BEYOND_LOOPBACK,
    DOWNGRADE,
    is_loopback,
    transport_refusal,
)
from sgw.gateway import config as gw_config
from sgw.provider import config as provider_config


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("192.0.2.2", False),
        ("0.0.0.0", False),
        ("::", False),
        ("provider.example.net", False),
        ("localhost.example.net", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("url", "insecure", "https_only", "refusal"),
    [
        ("https://p.example:8480", False, False, None),
        ("https://p.example:8480", False, True, None),
        ("http://127.0.0.1:8480", False, False, None),
        ("http://[::1]:8480", False, False, None),
        ("http://localhost:8480/base", False, False, None),
        ("http://p.example:8480", False, False, BEYOND_LOOPBACK),
        ("http://10.0.0.5:8480", False, False, BEYOND_LOOPBACK),
        ("http://10.0.0.5:8480", True, False, None),
        # After https, plain http is refused whatever was allowed, loopback too.
        ("http://10.0.0.5:8480", True, True, DOWNGRADE),
        ("http://127.0.0.1:8480", True, True, DOWNGRADE),
        ("HTTP://127.0.0.1:8480", False, False, None),
        ("ftp://p.example", True, False, "scheme 'ftp' is not http or https"),
        ("p.example:8480", True, False, "scheme 'p.example' is not http or https"),
        ("//p.example:8480", True, False, "scheme '(none)' is not http or https"),
        ("https://", False, False, "no host"),
        ("http://[::1", True, False, "not a URL"),
    ],
)
def test_transport_refusal(url: str, insecure: bool, https_only: bool, refusal: str | None) -> None:
    assert transport_refusal(url, insecure_http=insecure, https_only=https_only) == refusal


def _gateway(tmp_path: Path, toml: str) -> gw_config.GatewayConfig:
    conf = tmp_path / "gateway.toml"
    conf.write_text(toml)
    base: dict[str, Any] = {"data_dir": str(tmp_path), "volumes": ["v:1G"]}
    return gw_config.load(str(conf), **base)


def test_gateway_control_urls_follow_the_remote_rule(tmp_path: Path) -> None:
    ok = _gateway(
        tmp_path,
        '[remote]\nurl = "http://127.0.0.1:8480"\n'
        '[control]\nurls = ["http://127.0.0.1:8481", "https://p2.example:8480/"]\n',
    )
    assert ok.control.urls == ("http://127.0.0.1:8481", "https://p2.example:8480")
    with pytest.raises(ConfigError) as beyond:
        _gateway(
            tmp_path,
            '[remote]\nurl = "http://127.0.0.1:8480"\n[control]\nurls = ["http://10.0.0.6:8480"]\n',
        )
    assert str(beyond.value) == (
        "control.urls: http://10.0.0.6:8480 is plain http to another machine; use https "
        "(with remote.ca) or set remote.insecure_http = true on a development network"
    )
    dev = _gateway(
        tmp_path,
        '[remote]\nurl = "http://10.0.0.5:8480"\ninsecure_http = true\n'
        '[control]\nurls = ["http://10.0.0.6:8480"]\n',
    )
    assert dev.control.urls == ("http://10.0.0.6:8480",)
    # A provider reached over https: its other control servers too, whatever is allowed.
    for allowed in ("false", "true"):
        with pytest.raises(ConfigError) as down:
            _gateway(
                tmp_path,
                f'[remote]\nurl = "https://p.example:8480"\ninsecure_http = {allowed}\n'
                '[control]\nurls = ["https://p2.example:8480", "http://127.0.0.1:8481"]\n',
            )
        assert str(down.value) == (
            f"control.urls: http://127.0.0.1:8481 is {DOWNGRADE}; use https, as remote.url does"
        )
    # Without [remote] the control channel does not run; its URLs are still checked URLs.
    with pytest.raises(ConfigError, match="not an http"):
        _gateway(tmp_path, '[control]\nurls = ["ftp://p2.example"]\n')


def _provider(
    host: str, *, insecure_dev: bool = False, insecure_http: bool = False
) -> provider_config.ProviderConfig:
    """A provider without TLS files listening on ``host``."""
    return provider_config.ProviderConfig(
        "/nonexistent",
        host,
        8480,
        "sqlite://",
        "file:///x",
        insecure_dev=insecure_dev,
        insecure_http=insecure_http,
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_insecure_dev_serves_loopback(host: str) -> None:
    _provider(host, insecure_dev=True).check_transport()
    _provider(host, insecure_dev=True, insecure_http=True).check_transport()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "provider.example.net"])
def test_insecure_dev_refuses_any_other_address(host: str) -> None:
    for insecure_http in (False, True):
        with pytest.raises(ConfigError) as refused:
            _provider(host, insecure_dev=True, insecure_http=insecure_http).check_transport()
        message = str(refused.value)
        assert message.startswith(f"--listen {host}:8480 is not loopback, and --insecure-dev ")
        assert "listen on 127.0.0.1" in message
    # Authenticated, plain http beyond loopback still needs its own flag (unchanged).
    with pytest.raises(ConfigError, match="--insecure-http"):
        _provider(host).check_transport()
    _provider(host, insecure_http=True).check_transport()


def test_cli_sends_its_token_over_plain_http_to_loopback_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cli_config.INSECURE_HTTP_ENV, raising=False)
    for url in ("https://p.example:8480", "http://127.0.0.1:8480", "http://[::1]:1"):
        cli_config.check_endpoint(url, insecure_http=False)
    with pytest.raises(ConfigError) as refused:
        cli_config.check_endpoint("http://192.0.2.2:8480", insecure_http=False)
    assert "--insecure-http" in str(refused.value) and "SGW_INSECURE_HTTP=1" in str(refused.value)
    cli_config.check_endpoint("http://192.0.2.2:8480", insecure_http=True)
    with pytest.raises(ConfigError, match=re.escape("'ftp://p.example': scheme 'ftp'")):
        cli_config.check_endpoint("ftp://p.example", insecure_http=True)
    # The environment variable allows it too; a value that means neither yes nor no is
    # refused rather than guessed.
    assert not cli_config.insecure_http_allowed(False)
    assert cli_config.insecure_http_allowed(True)
    for yes in ("1", "true", "YES"):
        monkeypatch.setenv(cli_config.INSECURE_HTTP_ENV, yes)
        assert cli_config.insecure_http_allowed(False)
    for no in ("0", "false", ""):
        monkeypatch.setenv(cli_config.INSECURE_HTTP_ENV, no)
        assert not cli_config.insecure_http_allowed(False)
    monkeypatch.setenv(cli_config.INSECURE_HTTP_ENV, "maybe")
    with pytest.raises(ConfigError, match="SGW_INSECURE_HTTP='maybe'"):
        cli_config.insecure_http_allowed(False)


def test_cli_refuses_before_it_opens_a_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SGW_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("SGW_TOKEN", "sgw_secret")
    monkeypatch.delenv(cli_config.INSECURE_HTTP_ENV, raising=False)
    with pytest.raises(ConfigError, match="plain http to another machine"):
        cli_config.open_client("http://192.0.2.2:8480")
    with cli_config.open_client("http://192.0.2.2:8480", insecure_http=True) as client:
        assert isinstance(client, ApiClient)
    monkeypatch.setenv(cli_config.INSECURE_HTTP_ENV, "1")
    with cli_config.open_client("http://192.0.2.2:8480") as client:
        assert isinstance(client, ApiClient)
