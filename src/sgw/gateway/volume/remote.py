"""A typed client for the provider's block API (docs/block-api.md), as the gateway uses it.

The client is asynchronous (``httpx.AsyncClient``) and runs in the destager's own task on
the gateway's event loop: requests are network waits, and an async client waits for many
of them at once without a thread per request, so neither the NBD path nor the uploads pay
a thread hop per request. The CPU work of a chunk (SHA-256, zstd) is done by
``prepare_chunk``, which the caller runs in a worker thread.

Every call is retried with jittered exponential backoff when no usable answer came (a
refused or broken connection, a timeout, a 5xx), never on a 4xx: those are the caller's
fault and raise at once. A commit retried after a lost reply carries the same idempotency
key, so the provider applies it once and answers the retry with the first answer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import zstandard
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from sgw.common.chunk_packs import MEDIA_TYPE as PACK_MEDIA_TYPE
from sgw.common.chunk_packs import PackedChunk, encode_pack
from sgw.common.chunks import chunk_id as sha256_hex
from sgw.common.errors import (
    RemoteConflictError,
    RemoteError,
    RemoteNotFoundError,
    RemoteRejectedError,
    RemoteUnavailableError,
)
from sgw.common.signing import BODY_DIGEST_EXTENSION

LOG = logging.getLogger(__name__)

# zstd level 1: on block data nearly as small as the default level at about twice the speed.
# The provider stores this frame as sent (after checking it), so the level also sets the
# stored size (about 1.5% larger on text than level 3).
WIRE_ZSTD_LEVEL = 1
# Seconds: connecting must be quick (a dead provider is found fast and retried); a 1 MiB
# body on a slow uplink under a bandwidth limit may take a while.
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How one call is retried when the provider is unreachable or failing.

    ``attempts`` bounds the tries of one call (the destager retries the whole batch after
    that, with its own backoff); waits are random in ``[0, min(max_wait, initial * 2**n)]``
    seconds (full jitter), so many gateways do not retry in step.
    """

    attempts: int = 5
    initial: float = 0.25
    max_wait: float = 8.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


@dataclass(frozen=True)
class RemoteVolume:
    """A volume as the provider describes it."""

    id: str
    name: str
    size: int
    chunk_size: int
    mode: str
    map_version: int


@dataclass(frozen=True)
class RemoteMap:
    """A volume's chunk map at ``version``: index -> chunk id (absent: all zero)."""

    version: int
    chunks: dict[int, str]


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk ready to send: its id, the body, and the body's Content-Encoding."""

    id: str
    body: bytes | bytearray
    encoding: str | None  # "zstd" or None (plaintext)
    size: int  # plaintext bytes


def prepare_chunk(data: bytes | bytearray) -> PreparedChunk:
    """Hashes a chunk and compresses it for the wire when that shrinks it (CPU-bound:
    run it in a worker thread)."""
    cid = sha256_hex(data)
    packed = zstandard.ZstdCompressor(level=WIRE_ZSTD_LEVEL).compress(data)
    if len(packed) < len(data):
        return PreparedChunk(cid, packed, "zstd", len(data))
    return PreparedChunk(cid, data, None, len(data))


def is_retryable(exc: BaseException) -> bool:
    """True for failures where the same request may succeed later (never a 4xx)."""
    return isinstance(exc, RemoteUnavailableError)


class BlockApiClient:
    """The block API over HTTP; one instance per gateway, shared by every volume."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 16,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``auth`` signs the requests (``GatewayAuth``); ``verify`` checks the provider's
        certificate (an SSL context with its pinned CA)."""
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        # Called with the size of every chunk downloaded (a bandwidth limit's acquire).
        self.read_throttle: Callable[[int], Awaitable[None]] | None = None
        # Chunks downloaded (get_chunk): how many, their bytes and the seconds they took,
        # for the health metrics.
        self.downloads = 0
        self.downloaded_bytes = 0
        self.download_seconds = 0.0
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            auth=auth,
            verify=verify,
        )

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    # -- calls -------------------------------------------------------------------------

    async def create_volume(
        self,
        name: str,
        size: int,
        *,
        mode: str = "stored",
        chunk_size: int | None = None,
        from_snapshot_id: str | None = None,
        volume_id: str | None = None,
    ) -> RemoteVolume:
        """Creates a volume, all zero or with a snapshot's map; with ``volume_id`` (a UUID
        chosen by the caller) asking again returns the same volume."""
        body: dict[str, Any] = {"name": name, "size": size, "mode": mode}
        if volume_id is not None:
            body["id"] = volume_id
        if chunk_size is not None:
            body["chunk_size"] = chunk_size
        if from_snapshot_id is not None:
            body["from_snapshot_id"] = from_snapshot_id
        doc = await self._json("POST", "/v1/volumes", f"create volume {name}", json=body)
        return _volume(doc)

    async def get_volume(self, volume_id: str) -> RemoteVolume:
        """The volume's description (size, chunk size, map version)."""
        doc = await self._json("GET", f"/v1/volumes/{volume_id}", f"volume {volume_id}")
        return _volume(doc)

    async def get_map(self, volume_id: str) -> RemoteMap:
        """The volume's current chunk map."""
        doc = await self._json("GET", f"/v1/volumes/{volume_id}/map", f"map of {volume_id}")
        try:
            chunks = {int(k): str(v) for k, v in doc["chunks"].items() if v is not None}
            return RemoteMap(int(doc["version"]), chunks)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RemoteError(f"the provider sent a malformed map of {volume_id}") from exc

    async def put_chunk(self, volume_id: str, chunk: PreparedChunk) -> bool:
        """Uploads a chunk; True if the provider stored it now, False if it had it."""
        headers = {"x-sgw-sha256": chunk.id, "content-type": "application/octet-stream"}
        extensions = {}
        if chunk.encoding:
            headers["content-encoding"] = chunk.encoding
        else:  # the body is the plaintext, whose SHA-256 is the chunk id
            extensions[BODY_DIGEST_EXTENSION] = chunk.id
        resp = await self._call(
            "PUT",
            f"/v1/volumes/{volume_id}/chunks/{chunk.id}",
            f"chunk {chunk.id[:12]} of {volume_id}",
            content=bytes(chunk.body),  # httpx takes a bytearray as an iterable of ints
            headers=headers,
            extensions=extensions,
        )
        return resp.status_code == 201

    async def put_chunk_pack(self, volume_id: str, chunks: Sequence[PreparedChunk]) -> int:
        """Uploads several chunks in one request (a chunk pack); how many the provider
        stored now (the others it had)."""
        body = encode_pack([PackedChunk(c.id, c.body, c.encoding == "zstd") for c in chunks])
        what = f"pack of {len(chunks)} chunks ({chunks[0].id[:12]}...) of {volume_id}"
        doc = await self._json(
            "POST",
            f"/v1/volumes/{volume_id}/chunk-packs",
            what,
            content=body,
            headers={"content-type": PACK_MEDIA_TYPE},
        )
        try:
            return len(doc["stored"])
        except (KeyError, TypeError) as exc:
            raise RemoteError(f"the provider's answer to {what} has no stored list") from exc

    async def get_chunk(self, volume_id: str, chunk_id: str) -> bytes:
        """A chunk's plaintext."""
        started = time.monotonic()
        resp = await self._call(
            "GET", f"/v1/volumes/{volume_id}/chunks/{chunk_id}", f"chunk {chunk_id[:12]}"
        )
        self.downloads += 1
        self.downloaded_bytes += len(resp.content)
        self.download_seconds += time.monotonic() - started
        if self.read_throttle is not None:
            await self.read_throttle(len(resp.content))
        return resp.content

    async def commit(
        self,
        volume_id: str,
        base_version: int,
        changes: Mapping[int, str | None],
        idempotency_key: str,
    ) -> int:
        """Points the map's indexes at new chunks (None: all zero); returns the new version.

        Raises RemoteConflictError if ``base_version`` is not the current one.
        """
        body = {
            "base_version": base_version,
            "idempotency_key": idempotency_key,
            "changes": {str(i): c for i, c in changes.items()},
        }
        what = f"commit to {volume_id} (base version {base_version})"
        doc = await self._json("POST", f"/v1/volumes/{volume_id}/commits", what, json=body)
        try:
            return int(doc["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the provider's answer to {what} has no version") from exc

    async def snapshot_volume(
        self, volume_id: str, snapshot_id: str, map_version: int, description: str | None
    ) -> None:
        """Makes the completed snapshot ``snapshot_id`` of the volume's map at
        ``map_version`` (idempotent: asking again for the same snapshot is harmless)."""
        body: dict[str, Any] = {"snapshot_id": snapshot_id, "map_version": map_version}
        if description:
            body["description"] = description
        what = f"snapshot {snapshot_id} of {volume_id} at map version {map_version}"
        await self._json("POST", f"/v1/volumes/{volume_id}/snapshots", what, json=body)

    # -- machinery ---------------------------------------------------------------------

    async def _json(self, method: str, path: str, what: str, **kw: Any) -> Any:
        resp = await self._call(method, path, what, **kw)
        try:
            return resp.json()
        except ValueError as exc:
            raise RemoteError(f"the provider's answer to {what} is not JSON") from exc

    async def _call(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        """One request, retried while the provider is unreachable or failing."""
        policy = self.retry
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_random_exponential(multiplier=policy.initial, max=policy.max_wait),
            stop=stop_after_attempt(policy.attempts),
            sleep=policy.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, path, what, **kw)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def _once(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise RemoteUnavailableError(
                f"{what}: the provider at {self.base_url} did not answer in time"
            ) from exc
        except httpx.TransportError as exc:
            raise RemoteUnavailableError(
                f"{what}: cannot reach the provider at {self.base_url}: {exc}"
            ) from exc
        if resp.status_code < 400:
            return resp
        raise _error(resp, what)


def _error(resp: httpx.Response, what: str) -> RemoteError:
    status = resp.status_code
    code: str | None = None
    message = resp.text[:200]
    try:
        doc = resp.json()
        if isinstance(doc, dict):
            code = str(doc.get("error")) if doc.get("error") is not None else None
            message = str(doc.get("message") or doc.get("detail") or message)
    except ValueError:
        pass
    text = f"{what}: the provider answered {status}: {message}"
    if status == 401:
        text += " (start the provider with --insecure-dev until tokens exist)"
    if status >= 500 or status == 429:  # 429: the account's rate quota refills; retry
        return RemoteUnavailableError(text, status=status, code=code)
    if status == 409:
        return RemoteConflictError(text, status=status, code=code)
    if status == 404:
        return RemoteNotFoundError(text, status=status, code=code)
    return RemoteRejectedError(text, status=status, code=code)


def _volume(doc: Any) -> RemoteVolume:
    try:
        return RemoteVolume(
            id=str(doc["id"]),
            name=str(doc["name"]),
            size=int(doc["size"]),
            chunk_size=int(doc["chunk_size"]),
            mode=str(doc["mode"]),
            map_version=int(doc["map_version"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError(f"the provider sent a malformed volume: {exc}") from exc


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    LOG.warning(
        "provider request failed; retrying",
        extra={"attempt": state.attempt_number, "wait_s": round(wait, 2), "error": str(exc)},
    )
