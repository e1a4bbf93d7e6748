"""A control server that is told to stop (SIGTERM) answers the long-polls it holds at
once, empty, instead of keeping them until uvicorn's graceful timeout (10 s) cancels them
with 500s: its gateways go to another server straight away, and it exits without waiting
for that timeout."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.fixtures.management import SecureProvider, activate


def test_stopping_server_answers_its_held_polls_at_once(secure_provider: SecureProvider) -> None:
    p = secure_provider
    gw = activate(p, p.token, "gw-drain")
    client = p.client(auth=gw.auth())
    answers: list[httpx.Response] = []

    def poll() -> None:
        answers.append(client.get("/v1/gateway/messages", params={"wait": 30}, timeout=60))

    first = client.get("/v1/gateway/messages", params={"wait": 0})  # registers the gateway
    assert first.status_code == 200, first.text
    held = threading.Thread(target=poll)
    held.start()
    deadline = time.monotonic() + 10
    while p.admin().get("/v1/control/server").json()["held"] < 1:
        assert time.monotonic() < deadline, "the poll was never held"
        time.sleep(0.05)
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    held.join(20)
    assert not held.is_alive()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["messages"] == []
    # A gateway goes to another server now; so do this test's clients (an idle TLS
    # connection would keep the server waiting for its close_notify until the timeout).
    for c in p.clients:
        c.close()
    assert p.proc.wait(20) == 0
    # It stopped because nothing was left to wait for, not on uvicorn's graceful timeout
    # (10 s), which cancels what still runs and says so: the shutdown ran to its end
    # without that message.
    lines = p.log_messages()
    shutdown = lines[lines.index("Shutting down") :]
    assert shutdown[-2:] == [f"Finished server process [{p.proc.pid}]", "provider stopped"]
    assert "control server stopped" in shutdown and "Application shutdown complete." in shutdown
    assert not [m for m in shutdown if "timeout graceful shutdown exceeded" in m], shutdown
