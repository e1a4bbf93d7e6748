"""The rooted exception hierarchy: callers catch by meaning, messages name the thing and the fix."""

from __future__ import annotations


class SgwError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(SgwError):
    """A flag, config file or config value is wrong; the message names it and the fix."""


class StorageError(SgwError):
    """A local disk (write log, volume disk) cannot be used as required."""


class LogCorruptError(StorageError):
    """The write log's superblock is unreadable or does not belong to this gateway."""


class LogFullError(StorageError):
    """A record is larger than the whole write log can ever hold."""


class VolumeStateError(StorageError):
    """Persistent volume state disagrees with the configuration."""


class ProtocolError(SgwError):
    """A peer broke the NBD protocol; the connection is closed."""


class ChunkError(SgwError):
    """A stored chunk cannot be turned back into its data."""


class ChunkCorruptError(ChunkError):
    """A chunk's bytes are damaged or not a chunk (bad magic, bad length, bad checksum)."""


class ChunkKeyError(ChunkError):
    """A chunk is encrypted and the key is missing or wrong (authentication failed)."""


class ObjectStoreError(SgwError):
    """The object store (a directory or an S3 bucket) failed or refused a request."""


class ObjectNotFoundError(ObjectStoreError):
    """No object under the requested key."""


class DatabaseError(SgwError):
    """The provider's database refused or failed an operation."""


class VersionConflictError(DatabaseError):
    """A chunk-map commit was based on a version that is no longer current."""


class NotFoundError(DatabaseError):
    """A volume, snapshot or other record does not exist (or is not the caller's)."""


class NameTakenError(DatabaseError):
    """The account already has a volume with this name."""


class SnapshotStateError(DatabaseError):
    """The snapshot's status does not allow the operation (e.g. putting into a completed one)."""


class IdempotencyKeyError(DatabaseError):
    """An idempotency key was reused for a different set of changes."""


class RemoteError(SgwError):
    """The provider's block API failed or refused a request.

    ``status`` is the HTTP status (None when no answer came), ``code`` the provider's
    error code from the body when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class RemoteUnavailableError(RemoteError):
    """No usable answer (connection refused or broken, timeout, 5xx): worth retrying."""


class RemoteRejectedError(RemoteError):
    """The provider refused the request (4xx): retrying the same request cannot help."""


class RemoteNotFoundError(RemoteRejectedError):
    """The volume (or chunk) does not exist at the provider (404)."""


class RemoteConflictError(RemoteRejectedError):
    """A commit was based on a map version that is no longer current (409)."""


class MasterKeyError(ConfigError):
    """The provider's master key file is missing, unreadable or not safe to use."""


class StoredChunkError(ObjectStoreError):
    """A chunk a map names is missing from the store, damaged or cannot be decrypted."""


class RequestError(SgwError):
    """A client's request cannot be served as asked; nothing was changed (a 4xx)."""


class UnauthenticatedError(RequestError):
    """The request carries no credentials the provider accepts."""


class BadRequestError(RequestError):
    """The request is malformed or asks for something impossible (a 400)."""


class ChecksumMismatchError(BadRequestError):
    """Uploaded data does not have the SHA-256 the request claims."""


class MissingChunksError(BadRequestError):
    """A commit names chunks that the store does not hold; upload them first."""

    def __init__(self, message: str, chunk_ids: list[str]) -> None:
        super().__init__(message)
        self.chunk_ids = chunk_ids


class PayloadTooLargeError(BadRequestError):
    """A request body is larger than the call accepts (a 413)."""


class UnsupportedEncodingError(BadRequestError):
    """A request body has a Content-Encoding the provider does not decode (a 415)."""


class ForbiddenError(RequestError):
    """The caller is authenticated but may not make this call (a 403), e.g. a gateway
    calling an admin endpoint."""


class QuotaExceededError(ForbiddenError):
    """The account's quota (volumes, provisioned bytes) does not allow the call (a 403);
    the message names the quota, its value and how the operator raises it."""


class RateLimitedError(RequestError):
    """The account sent more requests per second than its rate quota allows (a 429);
    ``retry_after`` is when a request will be accepted again (seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ActivationKeyError(RequestError):
    """An activation key is malformed, forged, expired or already used."""


class AlreadyActivatedError(RequestError):
    """The gateway behind an activation key is activated already (a 409)."""


class IdentityError(ConfigError):
    """The gateway's identity key or credentials file is missing, damaged or not safe."""


class GatewayOfflineError(RequestError):
    """A command needs its gateway online, and no control server holds its long-poll."""


class ControlChannelError(SgwError):
    """The gateway's control channel to the provider failed (a poll or a reply refused)."""


class CommandError(SgwError):
    """A command from the provider cannot be carried out as asked; the reply says why."""


class IscsiExportError(SgwError):
    """A volume cannot be exported over iSCSI: LIO (configfs, rtslib-fb) or its /dev/nbdN
    attachment (NBD netlink) failed or is missing."""


class HandoverError(SgwError):
    """The blue-green swap of the gateway daemon failed; the running daemon keeps serving
    (or, past the point of no return, the service restarts and reattaches)."""


class HandoverRefusedError(HandoverError):
    """The new daemon cannot take over from this one (a handover record version it does
    not read, another swap in progress, the write log too full); nothing was paused."""
