"""The gateway's health on a real ``sgw gateway serve``: the local /metrics endpoint
(bearer token, values that move with real NBD I/O from qemu-io) and the health reports
it uploads to a real provider (``sgw provider serve``), kept on disk while the provider is
away and across a kill -9."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import uuid
from datetime import datetime

import httpx
import pytest

from sgw.common.health import HealthReport
from tests.fixtures.daemons import GatewayProcess, free_port, need, non_loopback_address
from tests.fixtures.management import SecureProvider, activated_gateway
from tests.fixtures.waiting import wait_for

TOKEN = "0123456789abcdef-health-token"


def _config(
    tmp_path,
    *,
    port: int | None = None,
    token_mode: int = 0o600,
    host: str = "127.0.0.1",
    allow: str = "198.51.100.0/24",
) -> str:
    lines = ["[health]", "interval = 0.3"]
    if port is not None:
        token = tmp_path / "metrics.token"
        token.write_text(TOKEN + "\n")
        os.chmod(token, token_mode)
        lines += [
            "[metrics]",
            f'listen = "{host}:{port}"',
            f'token_file = "{token}"',
            f'allow = ["{allow}"]',
        ]
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _qemu_io(uri: str, *cmds: str) -> None:
    args = [need("qemu-io"), "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr


def _scrape(port: int, token: str | None = TOKEN) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)


def _value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m is not None, f"{name}{labels} not in the scrape"
    return float(m.group(1))


@pytest.fixture
def metrics_gateway(tmp_path):
    port = free_port()
    gw = GatewayProcess(
        tmp_path / "gw", ["vol0:64M"], extra_args=["--config", _config(tmp_path, port=port)]
    )
    gw.start()
    wait_for(lambda: "metrics endpoint listening" in gw.log_messages(), what="metrics listener")
    yield gw, port
    if gw.alive():
        gw.stop()


def test_metrics_need_the_token(metrics_gateway):
    _gw, port = metrics_gateway
    assert _scrape(port, None).status_code == 401
    assert _scrape(port, "not-the-token-at-all-0000").status_code == 401
    resp = httpx.get(f"http://127.0.0.1:{port}/other", timeout=10)
    assert resp.status_code == 401  # no token: 401 whatever is asked
    resp = _scrape(port)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")


def test_metrics_move_with_nbd_io(metrics_gateway):
    gw, port = metrics_gateway
    before = _scrape(port).text
    for name in (
        "sgw_build_info",
        "sgw_log_used_percent",
        "sgw_log_used_bytes",
        "sgw_queued_write_bytes",
        "sgw_queued_write_oldest_seconds",
        "sgw_read_bytes_total",
        "sgw_write_bytes_total",
        "sgw_read_latency_seconds",
        "sgw_write_latency_seconds",
        "sgw_recovery_point_age_seconds",
        "sgw_nbd_connections",
        "sgw_nbd_requests_in_flight",
        "sgw_disk_errors_total",
        "sgw_destage_errors_total",
        "sgw_io_wait_seconds_total",
        "sgw_uptime_seconds",
        "sgw_volume_size_bytes",
        "sgw_volume_passthrough",
    ):
        assert re.search(rf"^{name}\b", before, re.MULTILINE), name
    assert _value(before, "sgw_volume_size_bytes", '{volume="vol0"}') == 64 << 20
    written0 = _value(before, "sgw_write_bytes_total")
    read0 = _value(before, "sgw_read_bytes_total")
    writes0 = _value(before, "sgw_writes_total")

    _qemu_io(gw.uri(), "write -P 0xab 0 1M", "flush", "read -P 0xab 0 1M")

    after = _scrape(port).text
    assert _value(after, "sgw_write_bytes_total") - written0 == 1 << 20
    assert _value(after, "sgw_read_bytes_total") - read0 >= 1 << 20
    assert _value(after, "sgw_volume_write_bytes_total", '{volume="vol0"}') >= 1 << 20
    assert _value(after, "sgw_writes_total") > writes0
    assert _value(after, "sgw_write_seconds_total") > 0
    assert _value(after, "sgw_write_latency_seconds") > 0  # writes since the last scrape
    # The write is in the log until the destager (idle 1 s) moves it to the volume disk.
    build = re.search(r"^sgw_build_info\{(.*)\} 1\.0$", after, re.MULTILINE)
    assert build is not None and 'version="' in build.group(1)


def test_token_file_readable_by_others_keeps_the_listener_off(tmp_path):
    port = free_port()
    gw = GatewayProcess(
        tmp_path / "gw",
        ["vol0:64M"],
        extra_args=["--config", _config(tmp_path, port=port, token_mode=0o644)],
    )
    gw.start()
    try:
        wait_for(
            lambda: any("metrics endpoint not started" in m for m in gw.log_messages()),
            what="the refusal",
        )
        assert "chmod 600" in gw.log_text()
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass
        _qemu_io(gw.uri(), "write 0 4k")  # the gateway serves regardless
    finally:
        gw.stop()


def test_sources_outside_allow_get_no_answer(tmp_path):
    """Loopback and the allow networks are let in; another source is closed on at once,
    token or not (as the appliance's firewall would drop it)."""
    addr = non_loopback_address()
    if addr is None:
        pytest.fail("this host has no non-loopback IPv4 address to connect from")
    # A documentation network that is not this host's.
    nets = ["198.51.100.0/24", "203.0.113.0/24"]
    allow = next(n for n in nets if ipaddress.ip_address(addr) not in ipaddress.ip_network(n))
    port = free_port()
    gw = GatewayProcess(
        tmp_path / "gw",
        ["vol0:64M"],
        extra_args=["--config", _config(tmp_path, port=port, host="0.0.0.0", allow=allow)],
    )
    gw.start()
    try:
        wait_for(lambda: "metrics endpoint listening" in gw.log_messages(), what="the listener")
        assert _scrape(port).status_code == 200  # loopback
        with pytest.raises(httpx.TransportError):  # closed on, nothing read or answered
            httpx.get(
                f"http://{addr}:{port}/metrics",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            )
    finally:
        gw.stop()


def _at(value: str) -> int:
    """A report's time in whole seconds (as the provider keeps it)."""
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _stored(p: SecureProvider, gid: str) -> list[int]:
    """When each report the provider holds for the gateway was sampled (its raw points of
    a metric every report carries), oldest first."""
    doc = p.admin().get(
        f"/v1/gateways/{gid}/health/series", params={"metric": "uptime_seconds", "step": "raw"}
    )
    assert doc.status_code == 200, doc.text
    return [_at(point["at"]) for point in doc.json()["points"]]


def _buffered_at(gw: GatewayProcess) -> list[int]:
    path = gw.data_dir / "health" / "reports.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            out.append(_at(json.loads(line)["at"]))
    return out


def test_reports_reach_the_provider_and_survive_its_absence_and_a_kill(
    tmp_path, secure_provider, gateway_factory
):
    """A real provider: reports go up once activated; while the provider is stopped they
    wait on disk, also across the gateway's kill -9; after both restart every one of them
    arrives, none twice, and the restart after the kill is reported."""
    p = secure_provider
    gw, gid = activated_gateway(
        tmp_path, p, gateway_factory, ["vol0:64M"], extra="\n[health]\ninterval = 1.1\n"
    )
    admin = p.admin()
    wait_for(lambda: len(_stored(p, gid)) >= 3, what="three reports at the provider")
    doc = admin.get(f"/v1/gateways/{gid}/health").json()
    assert doc["latest"]["version"] and doc["latest"]["volumes"]["vol0"]["size_bytes"] == 64 << 20
    assert "log_used_percent" in doc["latest"]["gateway"]
    assert "started" in [e["kind"] for e in doc["events"]]

    p.stop()  # the provider is away: reports wait on disk
    wait_for(lambda: len(_buffered_at(gw)) >= 3, what="reports buffered on disk")
    gw.kill()
    waiting = _buffered_at(gw)
    gw.start()
    p.start()
    wait_for(lambda: set(waiting) <= set(_stored(p, gid)), 60, "the buffered reports uploaded")
    wait_for(
        lambda: (
            "restart_after_crash"
            in [e["kind"] for e in p.admin().get(f"/v1/gateways/{gid}/health").json()["events"]]
        ),
        60,
        "the restart after the kill reported",
    )
    wait_for(lambda: not _buffered_at(gw), 60, "the buffer emptied once accepted")
    stored = _stored(p, gid)
    newest = admin.get(f"/v1/gateways/{gid}/health").json()["latest"]["seq"]
    # None twice: no more points than the gateway numbered reports (seq 0 up; a seq taken
    # just before the kill may never have been sampled). Times are whole seconds at the
    # provider, so two reports may share one: counting them is the check, not their times.
    assert len(stored) <= newest + 1, (len(stored), newest)
    gw.stop()
    assert not (gw.data_dir / "running").exists()  # a clean stop leaves no marker


def test_health_report_command_from_the_console(tmp_path, secure_provider, gateway_factory):
    """The console's ``health_report``: the gateway samples a report at once, uploads it
    and replies with it."""
    p = secure_provider
    _, gid = activated_gateway(
        tmp_path, p, gateway_factory, ["vol0:16M"], extra="\n[health]\ninterval = 3600\n"
    )
    admin = p.admin()
    body = {"type": "health_report", "args": {}, "idempotency_key": str(uuid.uuid4())}
    resp = admin.post(f"/v1/gateways/{gid}/commands", json=body, params={"wait": 10})
    assert resp.status_code in (200, 201, 202), resp.text
    cmd = resp.json()

    def finished() -> bool:
        nonlocal cmd
        cmd = admin.get(f"/v1/gateways/{gid}/commands/{cmd['id']}", params={"wait": 5}).json()
        return cmd["status"] in ("succeeded", "failed")

    wait_for(finished, what="the command's outcome")
    assert cmd["status"] == "succeeded", cmd
    result = cmd["result"]
    report = HealthReport.from_json(result["report"])  # what the provider will accept
    assert report.seq == result["seq"] >= 1  # seq 0 was sampled at start
    assert report.gateway["control_channel_connected"] == 1.0
    assert report.volumes["vol0"]["size_bytes"] == 16 << 20
    wait_for(
        lambda: admin.get(f"/v1/gateways/{gid}/health").json()["latest"]["seq"] >= result["seq"],
        what="the report at the provider",
    )
