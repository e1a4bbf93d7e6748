"""[health] and [metrics] in the gateway's configuration."""

from __future__ import annotations

import pytest

from sgw.common.errors import ConfigError
from sgw.gateway.config import HealthConfig, MetricsConfig, load


def _load(tmp_path, text: str):
    path = tmp_path / "gateway.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n[[volumes]]\nname = "v"\nsize = "1G"\n' + text)
    return load(str(path))


def test_defaults_report_every_minute_and_serve_no_metrics(tmp_path):
    cfg = _load(tmp_path, "")
    assert cfg.health == HealthConfig(60.0)
    assert cfg.metrics == MetricsConfig()


def test_metrics_enabled(tmp_path):
    cfg = _load(
        tmp_path,
        '[health]\ninterval = 30\n[metrics]\nlisten = "[::]:9750"\ntoken_file = "t"\n'
        'allow = ["192.0.2.1/24", "2001:db8::/32"]\n',
    )
    assert cfg.health.interval == 30.0
    assert cfg.metrics.host == "::" and cfg.metrics.port == 9750
    assert cfg.metrics.token_file.endswith("/t")
    assert cfg.metrics.allow == ("192.0.2.0/24", "2001:db8::/32")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[health]\ninterval = 0\n", "health.interval"),
        ('[metrics]\nlisten = "9750"\ntoken_file = "t"\n', "expected ADDR:PORT"),
        ('[metrics]\nlisten = "0.0.0.0:9750"\n', "metrics.token_file"),
        ("[metrics]\nallow = []\n", "needs listen"),
        ('[metrics]\nlisten = "0.0.0.0:1"\ntoken_file = "t"\nallow = ["x"]\n', "not a network"),
    ],
)
def test_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)
