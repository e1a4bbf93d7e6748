"""Object stores: where the provider keeps chunk data.

One small interface (``ObjectStore``) with three implementations: a local directory (the
embedded default), any S3-compatible service through boto3 (AWS S3, MinIO, Ceph RGW) and
memory (for unit tests of the logic above). ``open_store`` turns a configured URL into
one of them.

Keys are "/"-separated paths such as ``chunks/ab/abcdef...``. All stores accept the same
keys (``check_key``), so data can move between them: segments are non-empty, do not
start with "." (that also rules out "." and "..", and leaves dot-names free for the
directory store's temporary files), hold no control characters or backslashes; a key
has at most 1024 UTF-8 bytes (S3's limit) and a segment at most 255 (a file name's).
A directory cannot hold both ``a`` and ``a/b``; S3 can, but our keys never need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
import urllib.parse
from base64 import b64encode
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import boto3
import botocore.config
import botocore.exceptions
from crc32c import crc32c

from sgw.common.errors import ConfigError, ObjectNotFoundError, ObjectStoreError

LOG = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024  # S3's limit on an object key
MAX_SEGMENT_BYTES = 255  # NAME_MAX on Linux file systems
_TEMP_SUFFIX = ".tmp"
# Files fsynced at once by ``DirectoryStore.sync``: concurrent fsyncs share the file
# system's journal commits and keep the disk's queue full.
_SYNC_WORKERS = 16

# What puts take: any contiguous byte buffer (an encoded chunk is a bytearray).
Data = bytes | bytearray | memoryview
# Tells whether an object's bytes are intact (``sync``); it must not keep the buffer.
ObjectCheck = Callable[[bytes], bool]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing or ``stat`` tells about one object.

    ``modified``: when the object was last written, in POSIX seconds of the *store's*
    clock (a file's mtime, S3's LastModified, which has whole-second resolution), so
    comparing it with this machine's clock is only as exact as the two clocks agree.
    """

    key: str
    size: int
    modified: float


class ObjectStore(Protocol):
    """A flat namespace of immutable-by-convention objects under string keys."""

    def put(self, key: str, data: Data, *, durable: bool = True) -> None:
        """Stores ``data`` under ``key`` atomically: readers see all of it or none.

        Putting a key again replaces the object; putting the same data again is harmless.
        With ``durable=False`` the store may answer before the object would survive a
        power loss (``sync`` makes it durable later), and it keeps an object already
        stored under ``key`` instead of replacing it: a put that is not durable never
        replaces one that is. Stores whose every put is durable ignore the flag.
        """
        ...

    def sync(self, keys: Sequence[str], check: ObjectCheck | None = None) -> list[str]:
        """Makes the objects under ``keys`` durable; returns the keys it could not, those
        missing or (with ``check``) whose bytes ``check`` calls damaged: a put that was not
        durable when the machine lost power may have left a truncated or zeroed file.

        Stores whose every put is durable have nothing to do and return [] unchecked.
        """
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (fewer only where the object
        ends sooner); ObjectNotFoundError if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """True if an object is stored under ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Removes the object; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """The keys that start with ``prefix``, in sorted (UTF-8 byte) order."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and last write time of the object; None if there is none."""
        ...

    def list_with_times(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """``list`` with each object's size and last write time (one listing, no extra
        request per object). An object deleted while the listing runs may be left out."""
        ...


def check_key(key: str) -> None:
    """Raises ObjectStoreError if ``key`` is not a key every store accepts."""
    if not key:
        raise ObjectStoreError("object key is empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ObjectStoreError(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:64]!r}...")
    for segment in key.split("/"):
        if not segment:
            raise ObjectStoreError(
                f"object key {key!r} has an empty segment (leading, trailing or double '/')"
            )
        if segment.startswith("."):
            raise ObjectStoreError(
                f"object key {key!r} has a segment starting with '.' ({segment!r})"
            )
        if "\\" in segment or any(ord(c) < 0x20 or c == "\x7f" for c in segment):
            raise ObjectStoreError(
                f"object key {key!r} contains a backslash or a control character"
            )
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise ObjectStoreError(
                f"object key {key!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes"
            )


def check_prefix(prefix: str) -> None:
    """Raises ObjectStoreError unless ``prefix`` is empty or the start of a valid key."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)


class MemoryStore:
    """Objects in a dict: for unit tests of the logic that uses a store."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._times: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._objects)} objects)"

    def put(self, key: str, data: Data, *, durable: bool = True) -> None:
        check_key(key)
        with self._lock:
            self._objects[key] = bytes(data)
            self._times[key] = time.time()

    def sync(self, keys: Sequence[str], check: ObjectCheck | None = None) -> list[str]:
        for key in keys:
            check_key(key)
        return []

    def get(self, key: str) -> bytes:
        check_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFoundError(f"no object {key!r} in memory store") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        return self.get(key)[offset : offset + length]

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._objects

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)
            self._times.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        return iter(keys)

    def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        with self._lock:
            if key not in self._objects:
                return None
            return ObjectInfo(key, len(self._objects[key]), self._times[key])

    def list_with_times(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        with self._lock:
            infos = [
                ObjectInfo(k, len(v), self._times[k])
                for k, v in self._objects.items()
                if k.startswith(prefix)
            ]
        infos.sort(key=lambda info: info.key)
        return iter(infos)


class DirectoryStore:
    """Objects as files under a root directory: the embedded default.

    A put writes a uniquely named temporary file (``.<name>.<random>.tmp``) next to the
    target and then gives it the target's name, so concurrent writers of one key never
    mix their bytes and a crash leaves the old object, the new one or nothing, plus at
    worst a temporary file that ``remove_temp_files`` cleans up. A durable put fsyncs the
    file, renames it over the target and fsyncs the directory. A put with
    ``durable=False`` links the file to the target name only if that is free (so it never
    replaces an object, durable or not) and fsyncs nothing: ``sync`` does that later, for
    many objects at once, and checks that each one survived; the directories such a put
    makes are synced then too. Files are created mode 0600, directories 0700. Empty
    directories are left behind by delete: removing them would race with a concurrent put
    into the same directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ObjectStoreError(f"cannot create object store directory {self.root}: {e}") from e

    def __repr__(self) -> str:
        return f"DirectoryStore({self.root!r})"

    def path(self, key: str) -> str:
        """The file that holds ``key`` (after checking the key)."""
        check_key(key)
        return os.path.join(self.root, *key.split("/"))

    def put(self, key: str, data: Data, *, durable: bool = True) -> None:
        path = self.path(key)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self._make_dirs(directory, durable=durable)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                if durable:
                    os.fsync(fd)
                    # Written once, seldom read soon: as in ``sync``, the freed pages are
                    # the cheapest to write the next objects into.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                else:
                    # Starts writing the pages back now (dirty pages are not dropped), so
                    # that the sync that makes the object durable has less to wait for.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            if durable:
                os.replace(tmp, path)
                _fsync_dir(directory)
                return
            try:
                os.link(tmp, path)
            except FileExistsError:
                if not os.path.isfile(path):  # a directory: the key cannot be an object
                    raise
            finally:
                _unlink_quietly(tmp)
        except OSError as e:
            _unlink_quietly(tmp)
            raise ObjectStoreError(f"cannot store object {key!r} in {self.root}: {e}") from e

    def sync(self, keys: Sequence[str], check: ObjectCheck | None = None) -> list[str]:
        paths = [self.path(key) for key in keys]
        synced = self._each(lambda path: _sync_file(path, check), paths)
        # The names too: each file's directory and the directories above it up to the root
        # (a put that is not durable does not sync the directories it makes either).
        directories: set[str] = set()
        for path, ok in zip(paths, synced, strict=True):
            directory = os.path.dirname(path)
            while ok and directory not in directories:
                directories.add(directory)
                if directory == self.root:
                    break
                directory = os.path.dirname(directory)
        self._each(_sync_directory, sorted(directories))
        return [key for key, ok in zip(keys, synced, strict=True) if not ok]

    def _each(self, func: Callable[[str], bool], paths: list[str]) -> list[bool]:
        """``func`` of every path, in parallel when there are several."""
        if len(paths) <= 1:
            return [func(path) for path in paths]
        return list(self._sync_pool().map(func, paths))

    def _sync_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_SYNC_WORKERS, thread_name_prefix="sgw-sync")
            return self._pool

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise ObjectStoreError(f"cannot read object {key!r} in {self.root}: {e}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise ObjectStoreError(f"cannot read object {key!r} in {self.root}: {e}") from e
        try:
            parts: list[bytes] = []
            done = 0
            while done < length:
                part = os.pread(fd, length - done, offset + done)
                if not part:
                    break
                parts.append(part)
                done += len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            raise ObjectStoreError(f"cannot read object {key!r} in {self.root}: {e}") from e
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise ObjectStoreError(f"cannot delete object {key!r} in {self.root}: {e}") from e
        _fsync_dir(os.path.dirname(path))

    def list(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _ in self._list(prefix))

    def stat(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise ObjectStoreError(f"cannot look up object {key!r} in {self.root}: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list_with_times(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._with_times(self._list(prefix))

    def _with_times(self, entries: Iterator[tuple[str, os.DirEntry[str]]]) -> Iterator[ObjectInfo]:
        for key, entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted since the directory was read
                continue
            except OSError as e:
                raise ObjectStoreError(f"cannot look up object {key!r} in {self.root}: {e}") from e
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def _list(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        check_prefix(prefix)
        # Walk only the directory the prefix names; its last partial segment filters names.
        head, _, tail = prefix.rpartition("/")
        start = os.path.join(self.root, *head.split("/")) if head else self.root
        return self._walk(start, f"{head}/" if head else "", tail)

    def remove_temp_files(self, older_than: float = 3600.0) -> int:
        """Deletes temporary files left by puts that crashed; returns how many.

        Only files older than ``older_than`` seconds are touched, so running puts are safe.
        """
        limit = time.time() - older_than
        removed = 0
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                    continue
                path = os.path.join(directory, name)
                try:
                    if os.lstat(path).st_mtime < limit:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            LOG.info("removed %d stale temporary files under %s", removed, self.root)
        return removed

    def _walk(
        self, directory: str, key_prefix: str, name_prefix: str
    ) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Keys (and their entries) below ``directory`` in sorted order, first level
        filtered by name prefix.

        A directory sorts as its name plus "/", so that ``a/b`` comes after ``a-b`` and
        before ``a0`` exactly as the keys compare.
        """
        try:
            with os.scandir(directory) as it:
                entries = [
                    (e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                    for e in it
                    if e.name.startswith(name_prefix) and not e.name.startswith(".")
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise ObjectStoreError(f"cannot list {directory} in {self.root}: {e}") from e
        entries.sort(key=lambda pair: pair[0])
        for sort_name, entry in entries:
            if sort_name.endswith("/"):
                yield from self._walk(entry.path, key_prefix + sort_name, "")
            elif entry.is_file(follow_symlinks=False):
                yield key_prefix + entry.name, entry

    def _make_dirs(self, directory: str, *, durable: bool) -> None:
        """Creates ``directory`` and its missing parents below the root; ``durable``: each
        one at once (else ``sync`` makes them durable with the objects in them)."""
        missing: list[str] = []
        while directory != self.root and not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
                continue
            if durable:
                _fsync_dir(os.path.dirname(path))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file(path: str, check: ObjectCheck | None) -> bool:
    """Fsyncs one object's file after ``check`` passed its bytes; False if it is missing
    or damaged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    except OSError as e:
        raise ObjectStoreError(f"cannot sync {path}: {e}") from e
    try:
        if check is not None and not check(_read_all(fd)):
            return False
        try:
            os.fsync(fd)
        except OSError:
            # What reached the disk is unknown now, and a later fsync may well report
            # success: the file can never be trusted again. Without it, the next upload
            # of the object writes a new one.
            LOG.error("fsync failed; removing the object file", extra={"path": path})
            _unlink_quietly(path)
            raise
        # Objects are written once and seldom read: keeping them cached would only push
        # out other pages, and freed pages are the cheapest to write the next ones into.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise ObjectStoreError(f"cannot sync {path}: {e}") from e
    finally:
        os.close(fd)
    return True


def _sync_directory(path: str) -> bool:
    try:
        _fsync_dir(path)
    except OSError as e:
        raise ObjectStoreError(f"cannot sync directory {path}: {e}") from e
    return True


def _read_all(fd: int) -> bytes:
    """The file behind ``fd``, from its start (short only if it shrank meanwhile)."""
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# Seconds. Connect fails fast so retries can find a healthy endpoint; a read may wait for
# a large object on a slow link. Standard-mode retries back off exponentially with jitter
# and cover throttling (503 SlowDown), 5xx and connection errors.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 30.0
S3_MAX_ATTEMPTS = 5
# Uploads run in parallel (the destager's thread pool); each thread needs a connection.
S3_MAX_POOL_CONNECTIONS = 32
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Store:
    """Objects in an S3 bucket (AWS S3, MinIO, Ceph RGW), optionally under a key prefix.

    Credentials not given here come from boto3's usual sources (environment, shared
    config, instance metadata). A custom ``endpoint_url`` uses path-style addressing,
    which every S3-compatible service supports. The client is thread-safe; share a store
    between threads. A HEAD response has no body, so ``exists`` cannot tell a missing
    bucket from a missing key and answers False for both; the other calls name the bucket.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
    ) -> None:
        if not bucket:
            raise ConfigError("S3 bucket name is empty")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if self.prefix:
            check_prefix(self.prefix)
        # PUT with If-None-Match (AWS S3 since 2024, MinIO, Ceph RGW): one request per new
        # chunk instead of a HEAD and a PUT; turned off if the store refuses it.
        self.conditional_puts = True
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=S3_CONNECT_TIMEOUT,
            read_timeout=S3_READ_TIMEOUT,
            max_pool_connections=S3_MAX_POOL_CONNECTIONS,
            s3={
                "addressing_style": "path" if endpoint_url else "auto",
                # Puts carry a CRC32C of their body (``_checksum``), which the store
                # checks; signing the body too (SHA-256, botocore's default over plain
                # HTTP) cost a quarter of the client's CPU per put and adds nothing.
                "payload_signing_enabled": False,
            },
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    def put(self, key: str, data: Data, *, durable: bool = True) -> None:
        check_key(key)
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=_body(data), **_checksum(data)
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("store", key, e) from e

    def put_new(self, key: str, data: Data) -> bool | None:
        """Stores ``data`` unless an object is under ``key``, in one request (a conditional
        PUT, ``If-None-Match: *``): True if stored, False if one was there already. None if
        the store cannot tell (it refuses the condition, or another put of the key was in
        progress): then nothing was stored and the caller looks and puts as usual. A store
        that ignores the header replaces the object and answers True, which is harmless for
        content-addressed objects.
        """
        check_key(key)
        if not self.conditional_puts:
            return None
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=_body(data),
                IfNoneMatch="*",
                **_checksum(data),
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            code = _error_code(e)
            if code in ("PreconditionFailed", "412"):
                return False
            if code in ("ConditionalRequestConflict", "409"):
                return None
            if code in ("NotImplemented", "501", "InvalidArgument", "400"):
                LOG.warning(
                    "the S3 store refuses conditional puts; looking before each put instead",
                    extra={"bucket": self.bucket, "error": str(e)},
                )
                self.conditional_puts = False
                return None
            raise self._error("store", key, e) from e
        return True

    def sync(self, keys: Sequence[str], check: ObjectCheck | None = None) -> list[str]:
        """Nothing to do: S3 has an object durably when its PUT is answered."""
        for key in keys:
            check_key(key)
        return []

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            data: bytes = response["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(
                    f"no object {self.prefix + key!r} in S3 bucket {self.bucket!r}"
                ) from None
            raise self._error("read", key, e) from e
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_key(key)
        _check_range(offset, length)
        if length == 0:
            return b""
        try:
            response = self._client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            data: bytes = response["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            code = _error_code(e)
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(
                    f"no object {self.prefix + key!r} in S3 bucket {self.bucket!r}"
                ) from None
            if code in ("InvalidRange", "416"):  # the range starts past the end
                return b""
            raise self._error("read", key, e) from e
        return data

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                return False
            raise self._error("look up", key, e) from e
        return True

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                return
            raise self._error("delete", key, e) from e

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return (info.key for info in self._list(prefix))

    def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if _error_code(e) in _NOT_FOUND_CODES:
                return None
            raise self._error("look up", key, e) from e
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def list_with_times(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix)

    def ensure_bucket(self) -> None:
        """Creates the bucket if it does not exist (for development and tests)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as e:
            if _error_code(e) not in {"404", "NoSuchBucket", "NotFound"}:
                raise self._error("look up", None, e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._error("look up", None, e) from e
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except botocore.exceptions.ClientError as e:
            if _error_code(e) != "BucketAlreadyOwnedByYou":  # else another account has it
                raise self._error("create", None, e) from e
        except botocore.exceptions.BotoCoreError as e:
            raise self._error("create", None, e) from e
        LOG.info("created S3 bucket %s", self.bucket)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        str(item["Key"])[strip:],
                        int(item["Size"]),
                        item["LastModified"].timestamp(),
                    )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._error("list", prefix + "*", e) from e

    def _error(self, action: str, key: str | None, e: Exception) -> ObjectStoreError:
        what = f"object {self.prefix + key!r} in " if key is not None else ""
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return ObjectStoreError(f"cannot {action} {what}S3 bucket {self.bucket!r}{where}: {e}")


def _body(data: Data) -> bytes | bytearray:
    """A put's body as botocore takes it: bytes and bytearrays as they are (an encoded
    chunk or pack is a bytearray: a copy of megabytes, made holding the GIL, saved)."""
    return data if isinstance(data, bytes | bytearray) else bytes(data)


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ObjectStoreError(f"byte range at {offset}, {length} bytes: both must be >= 0")


def _checksum(data: Data) -> dict[str, str]:
    """The put's checksum argument: a CRC32C of the body (hardware-accelerated), which the
    store verifies before it keeps the object (AWS S3, MinIO and Ceph RGW do; a mismatch is
    refused). Given, it spares botocore computing its default CRC32 in Python's zlib."""
    return {"ChecksumCRC32C": b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")}


def _error_code(e: Exception) -> str:
    """The S3 error code of a ClientError ("NoSuchKey", "404", ...), else ""."""
    if isinstance(e, botocore.exceptions.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


_S3_OPTIONS = {"endpoint", "region"}


def open_store(url: str) -> ObjectStore:
    """The store a configuration URL names.

    ``file:///srv/sgw/objects`` or a plain path: a DirectoryStore there.
    ``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1``: an S3Store;
    both options are optional, credentials come from boto3's usual sources.
    """
    if not url:
        raise ConfigError("object store URL is empty: give a directory or an s3:// URL")
    parsed = urllib.parse.urlsplit(url)
    if not parsed.scheme:
        return DirectoryStore(url)
    if parsed.scheme == "file":
        if parsed.netloc not in {"", "localhost"}:
            raise ConfigError(
                f"object store URL {url!r} names host {parsed.netloc!r}: a file URL must be "
                "local, as in file:///srv/sgw/objects"
            )
        if parsed.query or parsed.fragment:
            raise ConfigError(f"object store URL {url!r}: a file URL takes no options")
        path = urllib.parse.unquote(parsed.path)
        if not path:
            raise ConfigError(f"object store URL {url!r} names no directory")
        return DirectoryStore(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"object store URL {url!r} names no bucket: use s3://bucket/prefix")
        options: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
            if name not in _S3_OPTIONS:
                raise ConfigError(
                    f"object store URL {url!r} has unknown option {name!r}; "
                    f"known: {', '.join(sorted(_S3_OPTIONS))}"
                )
            options[name] = value
        endpoint = options.get("endpoint") or None
        if endpoint is not None and urllib.parse.urlsplit(endpoint).scheme not in {
            "http",
            "https",
        }:
            raise ConfigError(
                f"object store URL {url!r}: endpoint {endpoint!r} must be an http(s) URL"
            )
        prefix = urllib.parse.unquote(parsed.path).strip("/")
        try:
            return S3Store(
                parsed.netloc,
                endpoint_url=endpoint,
                region=options.get("region") or None,
                prefix=prefix,
            )
        except ObjectStoreError as e:
            raise ConfigError(f"object store URL {url!r}: bad prefix: {e}") from e
    raise ConfigError(
        f"object store URL {url!r} has unsupported scheme {parsed.scheme!r}: "
        "use a directory path, file:///path or s3://bucket/prefix"
    )
