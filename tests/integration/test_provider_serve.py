"""`sgw provider serve`: a real HTTP server on loopback, started and stopped like a user would."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.fixtures.daemons import SGW, free_port


def start_provider(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [SGW, "provider", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("provider did not answer /v1/health within 20 s")


def test_serves_health_and_openapi_then_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = start_provider(tmp_path / "prov", port)
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/v1/health").json()
        assert health["status"] == "ok"
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
        assert spec["info"]["title"] == "sgw provider"
        assert "/v1/health" in spec["paths"]
        # Every path but the open ones needs credentials, one that does not exist too.
        missing = httpx.get(f"http://127.0.0.1:{port}/v1/nothing-here")
        assert missing.status_code == 401 and "no credentials" in missing.json()["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        proc.stderr.close()
    assert (tmp_path / "prov").is_dir()


def test_bad_listen_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = subprocess.run(
        [SGW, "provider", "serve", "--data-dir", str(tmp_path), "--listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "HOST:PORT" in lines[0]
