"""Routes of the block API (docs/block-api.md): volumes, chunks, maps, commits, snapshots.

The routes only translate HTTP to ``BlockService`` calls and back. Chunk and block bodies
are read here, as raw bytes with a size limit (the chunk size, or its zstd bound for a
``Content-Encoding: zstd`` body) enforced while reading, so an oversized upload is refused
with 413 after at most that many bytes and never buffered whole. Decompressing and
everything after it runs in a worker thread, off the event loop.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sgw.common.chunk_packs import MAX_PACK_CHUNKS
from sgw.common.chunk_packs import MEDIA_TYPE as PACK_MEDIA_TYPE
from sgw.common.chunks import MAX_CHUNK_SIZE
from sgw.common.errors import (
    ChecksumMismatchError,
    PayloadTooLargeError,
    UnsupportedEncodingError,
)
from sgw.provider.api.auth import (
    BODY_SHA256,
    CurrentAccount,
    CurrentPrincipal,
    check_snapshot,
    record_snapshot,
    volume_gateway,
)
from sgw.provider.blockstore.maps import SnapshotInfo, VolumeInfo, VolumeMode
from sgw.provider.blockstore.service import (
    DEFAULT_PAGE,
    MAX_PACK_DATA,
    MAX_PAGE,
    BlockPage,
    BlockService,
    body_too_large,
    check_chunk_id,
    inflate_body,
    zstd_bound,
)

_OCTETS = "application/octet-stream"
# A chunk pack's body: its data compressed at worst, and the header and entries.
MAX_PACK_BODY = zstd_bound(MAX_PACK_DATA) + 8 + 37 * MAX_PACK_CHUNKS
# Upper bound of sizes, versions and indexes: what the database's 64-bit integers hold.
_INT64_MAX = (1 << 63) - 1
_BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        "description": "the plaintext data; `Content-Encoding: zstd` allowed",
    }
}
_BINARY_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        "description": "the plaintext data; `x-sgw-sha256` carries its SHA-256",
    }
}


class ErrorOut(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_found")
    message: str = Field(description="what is wrong and how to fix it")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorOut} for status in (401, *statuses)}


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique within the account, 1 to 255 characters")
    size: int = Field(le=_INT64_MAX, description="bytes")
    mode: Literal["cached", "stored"]
    chunk_size: int | None = Field(
        None, description="bytes, a power of two; default 1 MiB, or the snapshot's"
    )
    from_snapshot_id: str | None = Field(None, description="start from a completed snapshot")
    gateway_id: str | None = None
    id: str | None = Field(
        None, description="a UUID chosen by the caller: asking again returns the same volume"
    )


class VolumeOut(BaseModel):
    id: str
    name: str
    size: int
    chunk_size: int
    mode: Literal["cached", "stored"]
    map_version: int
    created: datetime
    gateway_id: str | None = Field(None, description="the gateway it is on, if any")

    @classmethod
    def of(cls, v: VolumeInfo) -> VolumeOut:
        return cls(
            id=v.id,
            name=v.name,
            size=v.size,
            chunk_size=v.chunk_size,
            mode=v.mode.value,
            map_version=v.map_version,
            created=v.created,
            gateway_id=v.gateway_id,
        )


class ChunkStored(BaseModel):
    chunk_id: str


class ChunkMap(BaseModel):
    version: int
    chunks: dict[str, str] = Field(description="chunk index -> chunk id; zero chunks absent")


class CommitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_version: int = Field(
        ge=0, le=_INT64_MAX, description="the map version the changes are based on"
    )
    idempotency_key: str = Field(description="the same key and changes on a retry")
    changes: dict[str, str | None] = Field(
        description="chunk index -> chunk id, or null for an all-zero chunk"
    )


class CommitOut(BaseModel):
    version: int


class VolumeSnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    snapshot_id: str | None = Field(
        None,
        description="a UUID chosen by the caller: asking again returns the same snapshot",
    )
    map_version: int | None = Field(
        None, ge=0, description="refuse (409) unless the volume's map is at this version"
    )


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volume_size: int = Field(le=_INT64_MAX, description="bytes")
    chunk_size: int | None = Field(None, description="block size; default 1 MiB or the parent's")
    parent_snapshot_id: str | None = Field(None, description="start from its blocks")
    description: str | None = None


class SnapshotOut(BaseModel):
    id: str
    volume_id: str | None
    parent_snapshot_id: str | None
    status: Literal["pending", "completed", "error"]
    volume_size: int
    chunk_size: int
    description: str | None
    created: datetime
    completed: datetime | None
    scheduled_for: datetime | None = Field(
        default=None,
        description="the snapshot schedule's slot it was taken for; null: taken otherwise",
    )

    @classmethod
    def of(cls, s: SnapshotInfo) -> SnapshotOut:
        return cls(
            id=s.id,
            volume_id=s.volume_id,
            parent_snapshot_id=s.parent_snapshot_id,
            status=s.status.value,
            volume_size=s.volume_size,
            chunk_size=s.chunk_size,
            description=s.description,
            created=s.created,
            completed=s.completed,
            scheduled_for=s.scheduled_for,
        )


class Block(BaseModel):
    index: int
    chunk_id: str | None = Field(description="null: the block is (now) all zero")


class BlockList(BaseModel):
    blocks: list[Block]
    next: int | None = Field(description="the start of the next page; null after the last")

    @classmethod
    def of(cls, page: BlockPage) -> BlockList:
        return cls(blocks=[Block(index=i, chunk_id=c) for i, c in page.blocks], next=page.next)


def _service(request: Request) -> BlockService:
    service: BlockService = request.app.state.blocks
    return service


Service = Annotated[BlockService, Depends(_service)]
Sha256Header = Annotated[
    str, Header(alias="x-sgw-sha256", description="lowercase hex SHA-256 of the plaintext")
]
Start = Annotated[int, Query(ge=0, le=_INT64_MAX, description="first block index")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="most blocks per page")]

router = APIRouter(prefix="/v1")


# Volumes


@router.post("/volumes", status_code=201, tags=["volumes"], responses=_errors(400, 404, 409, 422))
def create_volume(
    body: VolumeCreate,
    account: CurrentAccount,
    principal: CurrentPrincipal,
    service: Service,
    request: Request,
) -> VolumeOut:
    """Creates a volume, all zero or with the blocks of a completed snapshot."""
    gateway_id = volume_gateway(request, principal, body.gateway_id, body.from_snapshot_id)
    volume = service.create_volume(
        account,
        body.name,
        body.size,
        mode=VolumeMode(body.mode),
        chunk_size=body.chunk_size,
        from_snapshot_id=body.from_snapshot_id,
        gateway_id=gateway_id,
        volume_id=body.id,
    )
    return VolumeOut.of(volume)


@router.get("/volumes/{volume_id}", tags=["volumes"], responses=_errors(404))
def get_volume(volume_id: str, account: CurrentAccount, service: Service) -> VolumeOut:
    return VolumeOut.of(service.get_volume(account, volume_id))


@router.delete("/volumes/{volume_id}", status_code=204, tags=["volumes"], responses=_errors(404))
def delete_volume(volume_id: str, account: CurrentAccount, service: Service) -> Response:
    """Deletes the volume and its map; its snapshots stay."""
    service.delete_volume(account, volume_id)
    return Response(status_code=204)


@router.put(
    "/volumes/{volume_id}/chunks/{chunk_id}",
    status_code=201,
    tags=["volumes"],
    openapi_extra=_BINARY_BODY,
    responses={
        200: {"model": ChunkStored, "description": "the chunk was already stored"},
        201: {"model": ChunkStored, "description": "the chunk was stored"},
        **_errors(400, 404, 413, 415, 422),
    },
)
async def put_chunk(
    *,
    volume_id: str,
    chunk_id: str,
    request: Request,
    response: Response,
    sha256: Sha256Header,
    account: CurrentAccount,
    service: Service,
) -> ChunkStored:
    """Stores a chunk (plaintext, at most the chunk size, not all zero) for a commit."""
    check_chunk_id(chunk_id, "chunk id in the path")
    check_chunk_id(sha256, "x-sgw-sha256")
    if sha256 != chunk_id:
        raise ChecksumMismatchError(
            f"x-sgw-sha256 {sha256} differs from the chunk id {chunk_id} in the path; "
            "both are the SHA-256 of the chunk's plaintext"
        )
    what = f"chunk {chunk_id}"
    encoding = _content_encoding(request, what)
    # The volume's own limit is checked with its lookup, in the same worker-thread trip.
    body = await _read_wire_body(request, MAX_CHUNK_SIZE, encoding, what)
    # A signed request's body was hashed for its signature: for a plaintext body that is
    # the chunk's SHA-256 already.
    digest = request.scope.get("state", {}).get(BODY_SHA256) if encoding == "identity" else None
    created = await run_in_threadpool(
        partial(service.put_chunk, zstd=encoding == "zstd", body_sha256=digest),
        account,
        volume_id,
        chunk_id,
        body,
    )
    response.status_code = 201 if created else 200
    return ChunkStored(chunk_id=chunk_id)


class PackStoredOut(BaseModel):
    stored: list[str] = Field(description="chunk ids this request stored")
    present: list[str] = Field(description="chunk ids the volume's store held already")


@router.post(
    "/volumes/{volume_id}/chunk-packs",
    tags=["volumes"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {PACK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": "a chunk pack: several chunks in one body (docs/block-api.md)",
        }
    },
    responses=_errors(400, 404, 413, 415, 422),
)
async def put_chunk_pack(
    *, volume_id: str, request: Request, account: CurrentAccount, service: Service
) -> PackStoredOut:
    """Stores several chunks for a commit in one request (each checked as a chunk PUT)."""
    what = "chunk pack"
    if _content_encoding(request, what) != "identity":
        raise UnsupportedEncodingError(
            "chunk pack: the body itself takes no Content-Encoding; compress each chunk "
            "(encoding 1 in its entry) instead"
        )
    too_large = PayloadTooLargeError(
        f"chunk pack is larger than {MAX_PACK_BODY} bytes, the most this call accepts; send "
        "fewer chunks per pack"
    )
    body = await _read_limited(request, MAX_PACK_BODY, too_large)
    done = await run_in_threadpool(service.put_chunk_pack, account, volume_id, body)
    return PackStoredOut(stored=done.stored, present=done.present)


@router.get(
    "/volumes/{volume_id}/chunks/{chunk_id}",
    tags=["volumes"],
    response_class=Response,
    responses={**_BINARY_ANSWER, **_errors(400, 404)},
)
def get_chunk(volume_id: str, chunk_id: str, account: CurrentAccount, service: Service) -> Response:
    """The plaintext of a chunk stored for the volume."""
    data = service.get_chunk(account, volume_id, chunk_id)
    return Response(data, media_type=_OCTETS, headers={"x-sgw-sha256": chunk_id})


@router.get("/volumes/{volume_id}/map", tags=["volumes"], responses=_errors(404))
def get_map(volume_id: str, account: CurrentAccount, service: Service) -> ChunkMap:
    """The volume's whole chunk map and its version."""
    version, chunks = service.read_map(account, volume_id)
    return ChunkMap(version=version, chunks={str(i): c for i, c in sorted(chunks.items())})


@router.post(
    "/volumes/{volume_id}/commits", tags=["volumes"], responses=_errors(400, 404, 409, 422)
)
def commit(volume_id: str, body: CommitIn, account: CurrentAccount, service: Service) -> CommitOut:
    """Applies changes to the map atomically; 409 if ``base_version`` is stale."""
    version = service.commit(
        account, volume_id, body.base_version, body.idempotency_key, body.changes
    )
    return CommitOut(version=version)


@router.post(
    "/volumes/{volume_id}/snapshots",
    status_code=201,
    tags=["snapshots"],
    responses=_errors(400, 404, 409, 422),
)
def snapshot_volume(
    *,
    volume_id: str,
    account: CurrentAccount,
    principal: CurrentPrincipal,
    service: Service,
    request: Request,
    body: VolumeSnapshotCreate | None = None,
) -> SnapshotOut:
    """A completed snapshot of the volume's current map (or of the given version)."""
    body = body or VolumeSnapshotCreate(snapshot_id=None, map_version=None)
    snapshot = service.snapshot_volume(
        account,
        volume_id,
        body.description,
        snapshot_id=body.snapshot_id,
        map_version=body.map_version,
    )
    record_snapshot(request, principal, snapshot.id)
    return SnapshotOut.of(snapshot)


# Snapshots (block API)


@router.post("/snapshots", status_code=201, tags=["snapshots"], responses=_errors(400, 404, 409))
def start_snapshot(
    body: SnapshotCreate,
    account: CurrentAccount,
    principal: CurrentPrincipal,
    service: Service,
    request: Request,
) -> SnapshotOut:
    """A pending snapshot to put blocks into (from its parent's blocks if given)."""
    if body.parent_snapshot_id is not None:
        check_snapshot(request, principal, body.parent_snapshot_id)
    snapshot = service.start_snapshot(
        account,
        body.volume_size,
        chunk_size=body.chunk_size,
        parent_snapshot_id=body.parent_snapshot_id,
        description=body.description,
    )
    record_snapshot(request, principal, snapshot.id)
    return SnapshotOut.of(snapshot)


@router.get("/snapshots/{snapshot_id}", tags=["snapshots"], responses=_errors(404))
def get_snapshot(snapshot_id: str, account: CurrentAccount, service: Service) -> SnapshotOut:
    return SnapshotOut.of(service.get_snapshot(account, snapshot_id))


@router.put(
    "/snapshots/{snapshot_id}/blocks/{index}",
    status_code=201,
    tags=["snapshots"],
    openapi_extra=_BINARY_BODY,
    responses=_errors(400, 404, 409, 413, 415, 422),
)
async def put_block(
    *,
    snapshot_id: str,
    index: int,
    request: Request,
    sha256: Sha256Header,
    account: CurrentAccount,
    service: Service,
) -> Block:
    """Sets a block of a pending snapshot (exactly the block's length; zeroes allowed)."""
    snapshot = await run_in_threadpool(service.get_snapshot, account, snapshot_id)
    length = service.upload_length(snapshot, index)
    check_chunk_id(sha256, "x-sgw-sha256")
    data = await _read_body(request, length, f"block {index}")
    chunk = await run_in_threadpool(service.put_block, account, snapshot.id, index, data, sha256)
    return Block(index=index, chunk_id=chunk)


@router.get(
    "/snapshots/{snapshot_id}/blocks/{index}",
    tags=["snapshots"],
    response_class=Response,
    responses={**_BINARY_ANSWER, **_errors(400, 404)},
)
def get_block(snapshot_id: str, index: int, account: CurrentAccount, service: Service) -> Response:
    """A block's data; 404 if the block is not in the snapshot (it reads as zeroes)."""
    chunk, data = service.get_block(account, snapshot_id, index)
    return Response(data, media_type=_OCTETS, headers={"x-sgw-sha256": chunk})


@router.get("/snapshots/{snapshot_id}/blocks", tags=["snapshots"], responses=_errors(404, 422))
def list_blocks(
    snapshot_id: str,
    account: CurrentAccount,
    service: Service,
    start: Start = 0,
    limit: Limit = DEFAULT_PAGE,
) -> BlockList:
    """The snapshot's non-zero blocks, a page at a time, by index."""
    return BlockList.of(service.list_blocks(account, snapshot_id, start, limit))


@router.get(
    "/snapshots/{snapshot_id}/changed-blocks",
    tags=["snapshots"],
    responses=_errors(400, 404, 409, 422),
)
def changed_blocks(
    *,
    snapshot_id: str,
    account: CurrentAccount,
    service: Service,
    first_snapshot_id: Annotated[
        str | None, Query(description="compare with it; omitted: with nothing")
    ] = None,
    start: Start = 0,
    limit: Limit = DEFAULT_PAGE,
) -> BlockList:
    """Blocks that differ from ``first_snapshot_id`` (both completed), a page at a time."""
    page = service.changed_blocks(account, snapshot_id, first_snapshot_id, start, limit)
    return BlockList.of(page)


@router.post("/snapshots/{snapshot_id}/complete", tags=["snapshots"], responses=_errors(404, 409))
def complete_snapshot(snapshot_id: str, account: CurrentAccount, service: Service) -> SnapshotOut:
    """Makes the snapshot immutable; completing it again is harmless."""
    return SnapshotOut.of(service.complete_snapshot(account, snapshot_id))


@router.delete(
    "/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"], responses=_errors(404)
)
def delete_snapshot(snapshot_id: str, account: CurrentAccount, service: Service) -> Response:
    service.delete_snapshot(account, snapshot_id)
    return Response(status_code=204)


# Bodies


def _content_encoding(request: Request, what: str) -> str:
    """The body's Content-Encoding: "identity" or "zstd" (else 415)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in {"identity", "zstd"}:
        raise UnsupportedEncodingError(
            f"{what}: Content-Encoding {encoding!r} is not supported; send the data as is "
            "or compressed with zstd (Content-Encoding: zstd)"
        )
    return encoding


async def _read_wire_body(request: Request, limit: int, encoding: str, what: str) -> bytes:
    """The body as sent, refused (413) past what ``limit`` bytes of data can take on the
    wire in ``encoding``."""
    wire_limit = limit if encoding == "identity" else zstd_bound(limit)
    return await _read_limited(request, wire_limit, body_too_large(what, limit))


async def _read_limited(request: Request, wire_limit: int, too_large: Exception) -> bytes:
    """The body as sent, refused with ``too_large`` past ``wire_limit`` bytes (by its
    Content-Length up front, and by counting while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > wire_limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > wire_limit:
            raise too_large
        parts.append(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's plaintext body, at most ``limit`` bytes, decoding zstd if sent so."""
    encoding = _content_encoding(request, what)
    body = await _read_wire_body(request, limit, encoding, what)
    if encoding == "identity":
        return body
    return inflate_body(body, limit, what)
