"""Commands that a gateway carries out (``sgw volumes create --gateway``, ``volumes
delete`` and ``snapshots create`` of a gateway's volume, ``gateways local-state|bandwidth|
diagnostics``, handing over CHAP credentials) go through the control channel
(``sgw.gateway.link.channel``): the admin groups send them with ``run_on_gateway``, which
returns once the gateway confirmed, with a progress indicator meanwhile."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from sgw.cli.client import ApiClient, Command
from sgw.cli.errors import EXIT_GATEWAY, EXIT_REFUSED, CommandError

# How long a command to a gateway is waited for by default (seconds); --timeout changes it.
COMMAND_TIMEOUT_S = 120.0
# The longest wait asked of the provider in one call (seconds), under the client's timeout.
_POLL_S = 20.0

_OPEN = ("queued", "delivered", "acknowledged")
_STAGES = {
    "queued": "waiting for the gateway to take it",
    "delivered": "delivered, waiting for the gateway's acknowledgement",
    "acknowledged": "running on the gateway",
}


def run_on_gateway(
    client: ApiClient,
    gateway_id: str,
    type_: str,
    args: dict[str, Any],
    *,
    timeout: float = COMMAND_TIMEOUT_S,
    label: str = "",
    wait_offline: bool = False,
) -> Command:
    """Sends a command to the gateway and waits for its outcome, showing progress on
    a terminal. Returns the finished command; CommandError if the gateway refused it
    (exit 1) or did not answer in time (exit 6). ``wait_offline``: a command the
    provider keeps for an offline gateway is returned unfinished after ``timeout``."""
    deadline = time.monotonic() + timeout
    with _Progress(label or f"{type_} on gateway {gateway_id}") as show:
        cmd = client.send_command(
            gateway_id,
            type_,
            args,
            idempotency_key=str(uuid.uuid4()),
            # A command not taken by then never runs.
            ttl=None if wait_offline else max(1.0, timeout),
            wait=round(min(_POLL_S, timeout), 1),
        )
        while cmd["status"] in _OPEN:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            show(_STAGES.get(cmd["status"], cmd["status"]))
            cmd = client.get_command(gateway_id, cmd["id"], wait=round(min(_POLL_S, remaining), 1))
    cancelled = False
    if cmd["status"] in _OPEN and not wait_offline:
        cmd = client.cancel_command(gateway_id, cmd["id"])  # cancelled unless the gateway took it
        cancelled = cmd["status"] == "expired"
    if cmd["status"] == "succeeded" or (wait_offline and cmd["status"] in _OPEN):
        return cmd
    if cmd["status"] == "failed":
        raise CommandError(f"the gateway refused: {cmd.get('error')}", EXIT_REFUSED)
    if cancelled:
        raise CommandError(
            f"no answer from gateway {gateway_id} within {timeout:.0f} s (offline or "
            "unreachable); the command was cancelled, nothing was done",
            EXIT_GATEWAY,
        )
    if cmd["status"] == "expired":
        raise CommandError(
            f"gateway {gateway_id} did not take the command before its deadline (it is "
            "offline or cannot reach the provider); nothing was done",
            EXIT_GATEWAY,
        )
    if cmd["status"] == "delivered":
        raise CommandError(
            f"no answer from gateway {gateway_id} within {timeout:.0f} s: it did not "
            "confirm that it took the command, and refuses to start it from now on",
            EXIT_GATEWAY,
        )
    raise CommandError(
        f"gateway {gateway_id} took the command but did not finish it within "
        f"{timeout:.0f} s; it goes on there (see `sgw gateways commands {gateway_id}`)",
        EXIT_GATEWAY,
    )


def result_of(cmd: Command) -> dict[str, Any]:
    """What a succeeded command answered (the gateway answers every command it carried out
    with a JSON object)."""
    return cast(dict[str, Any], cmd["result"])


class _Progress:
    """A spinner with a status line on standard error while a command runs (only on a
    terminal; nothing is printed otherwise)."""

    def __init__(self, label: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.label = label
        self._status: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.console.is_terminal:
            self._status = self.console.status(f"{self.label}: waiting for the gateway")
            self._status.__enter__()
        return self.update

    def update(self, stage: str) -> None:
        if self._status is not None:
            self._status.update(f"{self.label}: {stage}")

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)
