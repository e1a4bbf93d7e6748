"""What an NBD connection and a listener are, described for the blue-green swap (the
successor serves the same sockets from these descriptions)."""

from __future__ import annotations

from dataclasses import dataclass, field

HANDSHAKE = "handshake"
TRANSMISSION = "transmission"


@dataclass(frozen=True)
class ConnectionState:
    """One NBD connection, its socket at ``fd`` in the message's descriptors.

    ``pending``: bytes blue received and did not process (part of a request, or of a
    write's payload). In the handshake, ``handshake_in`` is every byte the client sent
    so far (green replays it through a fresh negotiation and sends nothing of what it
    answers: blue did)."""

    fd: int
    phase: str
    peer: str
    export: str | None = None
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    pending: bytes = b""
    handshake_in: bytes = b""
    # The kernel NBD device this connection serves (one end of its socket pair), if any.
    device: str | None = None


@dataclass(frozen=True)
class ListenerState:
    """A listening socket at ``fd``: ``role`` is ``nbd``, ``activation`` or ``admin``;
    ``address`` as configured (``unix:PATH``, ``tcp:HOST:PORT``, ``HOST:PORT``)."""

    fd: int
    role: str
    address: str
