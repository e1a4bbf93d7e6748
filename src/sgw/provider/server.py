"""Runs the provider's HTTP application with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Generator

import uvicorn
import uvloop

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
    server = _Server(
        uvicorn.Config(
            app,
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
