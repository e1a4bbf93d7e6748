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
