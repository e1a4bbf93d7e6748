"""Exit statuses of the ``sgw`` command's admin groups, and the error that carries one.

0 done, 1 refused by the provider (400, 409) or by the gateway, 2 wrong usage or
configuration, 3 not authenticated or not allowed (401, 403), 4 not found (404), 5 provider
unreachable or failing (5xx), 6 the gateway is offline or did not answer in time.
"""

from __future__ import annotations

from sgw.cli.client import ApiError
from sgw.common.errors import SgwError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_GATEWAY = 6


class CommandError(SgwError):
    """The provider answered, yet the command was not done: the gateway refused it or did
    not answer in time, or its result arrived damaged. ``exit_status`` says which."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def exit_status(exc: ApiError) -> int:
    """The command's exit status for a call the provider refused or failed."""
    if exc.error == "gateway_offline":
        return EXIT_GATEWAY
    if exc.status_code is None or exc.status_code >= 500:
        return EXIT_UNAVAILABLE
    return {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND}.get(exc.status_code, EXIT_REFUSED)
