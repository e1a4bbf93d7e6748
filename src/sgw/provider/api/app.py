"""The HTTP application: routes, and the mapping of our errors to HTTP statuses.

Every error a client can cause is a 4xx with a JSON body ``{"error": CODE, "message": ...}``
that names the thing and the fix; anything else is a 500 that is logged.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sgw import __version__
from sgw.common.errors import (
    ChunkError,
    NotFoundError,
    SgwError,
    VersionConflictError,
)
from sgw.provider.config import ProviderConfig

LOG = logging.getLogger(__name__)

# Our exceptions -> (HTTP status, error code); the first match in order wins.
_STATUS: list[tuple[type[SgwError], int, str]] = [
    (NotFoundError, 404, "not_found"),
    (VersionConflictError, 409, "version_conflict"),
    (ChunkError, 400, "bad_chunk"),
]


def create_app(config: ProviderConfig) -> FastAPI:
    """The provider's application for ``config``."""
    app = FastAPI(
        title="sgw provider",
        version=__version__,
        description="Block service, management and control plane of the storage gateway.",
    )
    app.state.config = config

    @app.exception_handler(SgwError)
    async def _sgw_error(request: Request, exc: SgwError) -> JSONResponse:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                return JSONResponse({"error": code, "message": str(exc)}, status_code=status)
        LOG.error("request failed", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(
            {"error": "internal", "message": "internal error; see the provider's log"},
            status_code=500,
        )

    @app.get("/v1/health", tags=["status"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    return app
