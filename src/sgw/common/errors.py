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
