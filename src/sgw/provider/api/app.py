"""The HTTP application: what it is built from, its routes, and how errors become statuses.

Every error a client can cause is a 4xx with a JSON body ``{"error": CODE, "message": ...}``
that names the thing and the fix; anything else is a 5xx that is logged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from sgw import __version__
from sgw.common.chunks import MAX_CHUNK_SIZE
from sgw.common.errors import (
    ActivationKeyError,
    AlreadyActivatedError,
    BadRequestError,
    ChecksumMismatchError,
    ChunkError,
    ForbiddenError,
    GatewayOfflineError,
    MissingChunksError,
    NotFoundError,
    ObjectStoreError,
    PayloadTooLargeError,
    QuotaExceededError,
    RateLimitedError,
    SgwError,
    StoredChunkError,
    UnauthenticatedError,
    UnsupportedEncodingError,
    VersionConflictError,
)
from sgw.provider.api import (
    accounts,
    blocks,
    control,
    gateways,
    releases,
    updates,
    volume_settings,
)
from sgw.provider.api import health as health_api
from sgw.provider.api.auth import (
    DEV_ACCOUNT_ID,
    DEV_ACCOUNT_NAME,
    Authenticator,
    AuthMiddleware,
    ensure_account,
)
from sgw.provider.api.gate import Gate
from sgw.provider.api.lean import LeanControl
from sgw.provider.auth.nonces import NonceLedger
from sgw.provider.auth.tls import tls_files
from sgw.provider.blockstore.keys import MASTER_KEY_FILE, open_keyring, read_master_key
from sgw.provider.blockstore.maps import (
    ChunkMaps,
    IdempotencyKeyError,
    NameTakenError,
    SnapshotStateError,
)
from sgw.provider.blockstore.objects import ObjectStore, open_store
from sgw.provider.blockstore.packs import PACKS_PREFIX
from sgw.provider.blockstore.service import BlockService, zstd_bound
from sgw.provider.config import ProviderConfig
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.peers import load_or_create_secret
from sgw.provider.control.planner import CommandPlanner
from sgw.provider.control.schedules import SnapshotScheduler
from sgw.provider.control.store import ControlStore, MessageInfo
from sgw.provider.db import schema
from sgw.provider.db.periodic import Periodic
from sgw.provider.health import metrics as health_metrics
from sgw.provider.health.store import TICK_S as HEALTH_TICK_S
from sgw.provider.health.store import HealthStore, MaintainResult, Retention
from sgw.provider.management.accounts import Accounts
from sgw.provider.management.gateways import Gateways
from sgw.provider.management.volume_settings import SecretBox, VolumeSettings
from sgw.provider.releases.keys import load_online_keys
from sgw.provider.releases.repository import open_repository, refresh_task
from sgw.provider.updates.policy import Policies
from sgw.provider.updates.rollouts import RolloutEvaluator, Rollouts
from sgw.provider.updates.service import Updates

LOG = logging.getLogger(__name__)

# Our exceptions -> (HTTP status, error code); the first match in order wins.
_STATUS: list[tuple[type[SgwError], int, str]] = [
    (UnauthenticatedError, 401, "unauthenticated"),
    (QuotaExceededError, 403, "quota_exceeded"),
    (RateLimitedError, 429, "rate_limited"),
    (ForbiddenError, 403, "forbidden"),
    (ActivationKeyError, 400, "activation_key_invalid"),
    (AlreadyActivatedError, 409, "already_activated"),
    (GatewayOfflineError, 409, "gateway_offline"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (UnsupportedEncodingError, 415, "unsupported_encoding"),
    (MissingChunksError, 400, "missing_chunks"),
    (ChecksumMismatchError, 400, "checksum_mismatch"),
    (BadRequestError, 400, "bad_request"),
    (NotFoundError, 404, "not_found"),
    (VersionConflictError, 409, "version_conflict"),
    (NameTakenError, 409, "name_taken"),
    (SnapshotStateError, 409, "snapshot_state"),
    (IdempotencyKeyError, 409, "idempotency_key_reused"),
    (ChunkError, 400, "bad_chunk"),
    (StoredChunkError, 500, "chunk_unreadable"),
    (ObjectStoreError, 503, "store_unavailable"),
]
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Largest request body of any call (bytes): a chunk pack's. Each route's own cap, smaller
# for most, is the gate's (sgw.provider.api.gate.body_cap); this bounds what
# AuthMiddleware reads should a body get past it.
MAX_REQUEST_BODY = max(zstd_bound(MAX_CHUNK_SIZE), blocks.MAX_PACK_BODY)


def create_app(config: ProviderConfig) -> FastAPI:
    """The provider's application for ``config``, with everything it serves from.

    Upgrades the database schema, opens the object store and the master key (made at
    first start), and creates the development account in ``--insecure-dev`` mode, so a
    misconfiguration fails here, before the server listens.
    """
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    schema.upgrade(config.db_url)
    engine = schema.make_engine(config.db_url)
    sessions = schema.session_factory(engine)
    store = open_store(config.store_url)
    keys = open_keyring(config.data_dir, may_create=not _holds_chunks(store))
    if config.insecure_dev:
        ensure_account(sessions, DEV_ACCOUNT_ID, DEV_ACCOUNT_NAME)
        LOG.warning("insecure development mode: every request acts for account %s", DEV_ACCOUNT_ID)
    service = BlockService(ChunkMaps(sessions), store, keys)
    nonces = NonceLedger(config.db_url)
    account_repo = Accounts(sessions)
    gateway_repo = Gateways(sessions)
    master = read_master_key(os.path.join(config.data_dir, MASTER_KEY_FILE))
    settings = VolumeSettings(sessions, SecretBox(master))
    planner = CommandPlanner(service, gateway_repo, settings)
    control_store = ControlStore(config.db_url)

    async def follow_up(info: MessageInfo) -> None:
        await planner.follow_up(info)
        await scheduler.follow_up(info)

    hub = ControlHub(
        control_store,
        server_id=str(uuid.uuid4()),
        url=config.control_url,
        secret=load_or_create_secret(config.data_dir),
        verify=_peer_verify(config),
        on_finished=follow_up,
    )
    scheduler = SnapshotScheduler(sessions, service.maps, hub)
    rollouts = Rollouts(sessions)
    evaluator = RolloutEvaluator(rollouts)
    health_store = HealthStore(
        sessions,
        Retention(
            config.health_raw_days,
            config.health_hourly_days,
            config.health_events_days,
            config.health_daily_days,
        ),
    )
    retention: Periodic[MaintainResult | None] = Periodic(
        "health-retention", health_store.maintain, None, tick_s=HEALTH_TICK_S
    )

    authenticator = Authenticator(
        account_repo,
        gateway_repo,
        nonces,
        accept_legacy=config.accept_legacy_signatures,
    )
    # Releases: served once the operator installed the online keys (releases-init).
    release_keys = load_online_keys(config.data_dir)
    release_repo = (
        open_repository(store, sessions, config.data_dir, release_keys)
        if release_keys is not None
        else None
    )
    refresh = refresh_task(release_repo) if release_repo is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        await authenticator.start()
        scheduler.start()
        if refresh is not None:
            refresh.start()
        evaluator.start()
        retention.start()
        yield
        await retention.stop()
        await evaluator.stop()
        if refresh is not None:
            await refresh.stop()
        await scheduler.stop()
        await hub.stop()
        await authenticator.stop()
        control_store.close()
        service.close()
        nonces.close()
        engine.dispose()

    app = FastAPI(
        title="sgw provider",
        version=__version__,
        description="Block service, management and control plane of the storage gateway.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.blocks = service
    app.state.accounts = account_repo
    app.state.rates = authenticator.rates
    app.state.gateways = gateway_repo
    app.state.volume_settings = settings
    app.state.control = hub
    app.state.commands = planner
    app.state.releases = release_repo
    app.state.update_policies = Policies(sessions)
    app.state.rollouts = rollouts
    app.state.updates = Updates(sessions, rollouts)
    app.state.health = health_store
    app.state.health_metrics = health_metrics.registry(health_store)
    app.include_router(blocks.router)
    app.include_router(control.router)
    app.include_router(accounts.router)
    app.include_router(gateways.router)
    app.include_router(volume_settings.router)
    app.include_router(releases.router)
    app.include_router(updates.router)
    app.include_router(health_api.router)
    app.include_router(health_api.metrics_router)
    # In front of the routes: authentication (the gate, before it, caps the bodies).
    app.add_middleware(AuthMiddleware, authenticator=authenticator, limit=MAX_REQUEST_BODY)

    @app.exception_handler(SgwError)
    async def _sgw_error(request: Request, exc: SgwError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, "invalid_request", f"{problems} (the API is described at /openapi.json)")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # The client went away while sending its body (a timeout, a cut connection): it
        # will retry or not; nothing was stored and no one reads this answer.
        LOG.info("client disconnected before its body ended", extra={"path": request.url.path})
        return _error(400, "client_disconnected", "the request body ended early")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), exc.headers)

    @app.get("/v1/health", tags=["status"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    # What the server runs: the gate, which refuses from a request's head what must not
    # be read (sgw.provider.api.gate); then the control channel's hot calls served without
    # the framework, everything else by it (sgw.provider.api.lean).
    lean = LeanControl(app, hub=hub, planner=planner, auth=authenticator, errors=error_response)
    app.state.asgi = Gate(lean, authenticator, insecure_dev=config.insecure_dev)
    return app


def error_response(exc: SgwError, path: str) -> JSONResponse:
    """The answer to a request that raised one of our errors (5xx: logged)."""
    status, code = next(((s, c) for cls, s, c in _STATUS if isinstance(exc, cls)), (500, ""))
    if not code:
        LOG.error("request failed", exc_info=exc, extra={"path": path})
        return _error(500, "internal", "internal error; see the provider's log")
    headers = {"WWW-Authenticate": 'Bearer realm="sgw"'} if status == 401 else None
    if isinstance(exc, RateLimitedError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    message = str(exc)
    if status >= 500:
        LOG.error("request failed", exc_info=exc, extra={"path": path})
        if status == 503:
            message = "the object store failed; retry later (details in the provider's log)"
    extra = {"chunk_ids": exc.chunk_ids} if isinstance(exc, MissingChunksError) else {}
    return _error(status, code, message, headers, **extra)


def _error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


def _peer_verify(config: ProviderConfig) -> ssl.SSLContext | bool:
    """How this server checks its peers' certificates: against the provider's own CA."""
    ca = tls_files(config.data_dir).ca_cert
    if config.scheme == "https" and os.path.exists(ca):
        return ssl.create_default_context(cafile=ca)
    return True


def _holds_chunks(store: ObjectStore) -> bool:
    """True if the store holds any chunk, loose or packed (then a missing master key must
    not be remade)."""
    return any(
        next(iter(store.list(prefix)), None) is not None for prefix in ("chunks/", PACKS_PREFIX)
    )
