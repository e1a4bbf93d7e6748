"""Runs the provider's HTTP application with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Generator
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sgw.provider.api.app import create_app
from sgw.provider.config import ProviderConfig

LOG = logging.getLogger(__name__)

# CPython's cyclic garbage collector: a full collection walks every tracked object, and a
# provider holding 10,000 gateways' long-polls has hundreds of megabytes of them (each
# held request's frames, scope and futures): up to a second per collection (measured),
# during which the event loop stands still. Collections are made rarer (objects are
# freed by reference counting anyway; the collector is only for cycles), and what exists
# once the application is built is exempt from them for good.
GC_THRESHOLDS = (50_000, 50, 100)
# How long a thread may hold the GIL while another waits for it (seconds; Python's
# default is 5 ms). The event loop holds it most of the time; the database threads
# (group writes, whose SQLite calls give it up and take it back for every statement)
# would otherwise wait up to 5 ms for each, a delay every command pays several times.
SWITCH_INTERVAL_S = 0.0005


# A garbage collection that stops the event loop longer than this is logged (seconds).
GC_PAUSE_LOG_S = 0.1


class _GcWatch:
    """Logs collections that stood the event loop still for long (a warning each)."""

    def __init__(self) -> None:
        self._started = (0.0, 0.0)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
            return
        took = time.perf_counter() - self._started[0]
        if took >= GC_PAUSE_LOG_S:
            LOG.warning(
                "garbage collection paused the server for %.2f s",
                took,
                extra={
                    "generation": info.get("generation"),
                    "collected": info.get("collected"),
                    # Less than the pause: the machine ran other work meanwhile.
                    "cpu_s": round(time.thread_time() - self._started[1], 3),
                },
            )


class _Coalescing:
    """A transport whose writes of one event-loop turn go out in one system call: uvicorn
    writes a response's head and body separately, two loopback or TLS sends (and two
    wake-ups of the client) per answer; the control channel answers a few thousand a
    second. Everything but ``write`` and ``close`` is the transport's own."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(bytes(data))

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with writes coalesced (``_Coalescing``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal after its graceful shutdown (the exit status would be
    -15); the daemon handles SIGTERM and SIGINT itself and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _run(server: uvicorn.Server) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await server.serve()


def serve(config: ProviderConfig) -> int:
    """Serves until a signal; returns the exit status."""
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    config.check_transport()
    app = create_app(config)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.callbacks.append(_GcWatch())
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = _Server(
        uvicorn.Config(
            app.state.asgi,  # sgw.provider.api.lean in front of the framework
            http=_Protocol,
            host=config.host,
            port=config.port,
            log_config=None,  # our JSON logging is already set up
            access_log=False,
            timeout_graceful_shutdown=10,
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
        )
    )
    LOG.info(
        "provider starting",
        extra={"listen": f"{config.host}:{config.port}", "scheme": config.scheme},
    )
    uvloop.run(_run(server))
    LOG.info("provider stopped")
    return 0
