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
from sgw.provider.control.hub import ControlHub

LOG = logging.getLogger(__name__)

# CPython's cyclic garbage collector, paced by the server instead of by allocation
# counts. A provider holding 10,000 gateways' long-polls has about 550,000 tracked objects
# that live for a poll's 16-20 s (each held request's coroutines, futures, contexts). The
# automatic trigger counts allocations minus deallocations: polls replacing polls keep
# that count flat while the young generation grows (measured: 556,000 objects after 30
# idle seconds), until a burst of commands trips it and one "young" collection walks
# them all, 0.4 s in which the event loop stands still. So: no automatic collections;
# the young generation every GC_YOUNG_S (a quarter second of survivors: milliseconds);
# every GC_FREEZE_S what survived is frozen (exempt from collections, still freed by
# reference counting), so no collection walks the held polls again; every GC_FULL_S
# everything is thawed and collected in full (cycles that died after their first
# collection: measured about 75 objects a second), one pause of about half a second.
GC_YOUNG_S = 0.25
GC_FREEZE_S = 10.0
GC_FULL_S = 600.0
# How long a thread may hold the GIL while another waits for it (seconds; Python's
# default is 5 ms). The event loop holds it most of the time; the database threads
# (group writes, whose SQLite calls give it up and take it back for every statement)
# would otherwise wait up to 5 ms for each, a delay every command pays several times.
SWITCH_INTERVAL_S = 0.0005


# A garbage collection that stops the event loop longer than this is logged (seconds).
GC_PAUSE_LOG_S = 0.1


class _GcPacer:
    """Runs the collections of the garbage collector on the event loop's schedule."""

    def __init__(self) -> None:
        self.full_collections = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        frozen_at = full_at = loop.time()
        while True:
            await asyncio.sleep(GC_YOUNG_S)
            now = loop.time()
            if now - full_at >= GC_FULL_S:
                started = time.perf_counter()
                gc.unfreeze()
                collected = gc.collect()
                gc.freeze()
                frozen_at = full_at = loop.time()
                self.full_collections += 1
                LOG.info(
                    "full garbage collection",
                    extra={
                        "seconds": round(time.perf_counter() - started, 3),
                        "collected": collected,
                        "frozen": gc.get_freeze_count(),
                    },
                )
            else:
                gc.collect(0)
                if now - frozen_at >= GC_FREEZE_S:
                    gc.freeze()
                    frozen_at = now


class _GcWatch:
    """Logs collections that stood the event loop still for long (a warning each)."""

    def __init__(self) -> None:
        self._started = (0.0, 0.0)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
            return
        took = time.perf_counter() - self._started[0]
        if took >= GC_PAUSE_LOG_S and info.get("generation", 0) < 2:  # full: _GcPacer logs
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


async def _run(server: uvicorn.Server, hub: ControlHub) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True
        hub.drain()  # uvicorn waits for open requests: held long-polls end now

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    pacer = loop.create_task(_GcPacer().run(), name="gc-pacer")
    try:
        await server.serve()
    finally:
        pacer.cancel()


def serve(config: ProviderConfig) -> int:
    """Serves until a signal; returns the exit status."""
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    config.check_transport()
    app = create_app(config)
    gc.collect()
    gc.freeze()
    gc.disable()  # collections from now on: _GcPacer
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
    uvloop.run(_run(server, app.state.control))
    LOG.info("provider stopped")
    return 0
