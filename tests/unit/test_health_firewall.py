"""The appliance's nft rules for /metrics, from [metrics] (tested without nft)."""

from __future__ import annotations

from sgw.gateway.config import MetricsConfig
from sgw.gateway.health.firewall import main, nft_script

FLUSH = [
    "flush set inet filter metrics_port",
    "flush set inet filter metrics_v4",
    "flush set inet filter metrics_v6",
]


def test_off_opens_nothing():
    assert nft_script(MetricsConfig()).splitlines() == FLUSH
    on_without_networks = MetricsConfig("0.0.0.0", 9750, "/etc/sgw/t", ())
    assert nft_script(on_without_networks).splitlines() == FLUSH


def test_the_port_to_the_allowed_networks_of_each_family():
    m = MetricsConfig(
        "0.0.0.0", 9750, "/etc/sgw/t", ("192.0.2.0/24", "10.1.0.0/16", "2001:db8::/32")
    )
    assert nft_script(m).splitlines() == [
        *FLUSH,
        "add element inet filter metrics_port { 9750 }",
        "add element inet filter metrics_v4 { 192.0.2.0/24, 10.1.0.0/16 }",
        "add element inet filter metrics_v6 { 2001:db8::/32 }",
    ]


def test_main_reads_the_gateway_config(tmp_path, capsys):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\n[[volumes]]\nname = "vol0"\nsize = "1G"\n'
        '[metrics]\nlisten = "0.0.0.0:9750"\ntoken_file = "/etc/sgw/metrics.token"\n'
        'allow = ["192.0.2.7/24"]\n'
    )
    assert main(["--config", str(cfg), "--print"]) == 0
    out = capsys.readouterr().out
    assert "add element inet filter metrics_v4 { 192.0.2.0/24 }" in out
    assert "metrics_port { 9750 }" in out


def test_a_bad_network_is_refused_by_name(tmp_path, capsys):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\n[[volumes]]\nname = "vol0"\nsize = "1G"\n'
        '[metrics]\nlisten = "0.0.0.0:9750"\ntoken_file = "/t"\nallow = ["everyone"]\n'
    )
    assert main(["--config", str(cfg), "--print"]) == 2
    assert "metrics.allow: 'everyone' is not a network" in capsys.readouterr().err
