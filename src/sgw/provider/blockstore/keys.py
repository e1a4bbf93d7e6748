"""The provider's chunk keys: one master key on disk, one derived key per key scope.

Chunks are encrypted at rest (AES-256-GCM, ``sgw.common.chunks``) with a key derived from
the master key and the chunk's *key scope*, the lineage's name (a volume made from a
snapshot, and every snapshot of a volume, share the scope of where they came from, so no
chunk is ever re-encrypted). The provider names every new lineage itself (``new_scope``:
the account's id and 128 random bits), never after an id a caller chose, so no caller can
put a volume into another tenant's scope; the account is in the key's derivation and in
the objects' names through it. Lineages started before that keep the id of the volume or
snapshot that started them. Deriving instead of storing per-scope keys leaves exactly one
secret to protect and back up.

Each scope has a second derived key, its *name key* (another HKDF label): objects are named
in the store by ``HMAC-SHA256(name key, chunk id)`` (``object_name``), not by the chunk id,
so a bucket listing does not tell whoever reads it which known content is stored
(docs/adr/0009-object-names-and-customer-keys.md).

The master key is ``DATA_DIR/master.key``: 32 random bytes, mode 0600, made at first
start. Losing it makes every stored chunk unreadable; the provider refuses to make a new
one when the store already holds chunks (see ``open_keyring``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgw.common.chunks import KEY_SIZE
from sgw.common.errors import MasterKeyError
from sgw.common.files import create_exclusively

LOG = logging.getLogger(__name__)

MASTER_KEY_FILE = "master.key"
MASTER_KEY_SIZE = 32
# HKDF "info" prefix; the scope follows. Changing it changes every key: never do that.
_INFO_PREFIX = b"sgw chunk key "
# The name key's prefix: a different label, so it is independent of the chunk key.
_NAME_INFO_PREFIX = b"sgw object name key "


def new_scope(account_id: str) -> str:
    """A new lineage's key scope: ``<account id>.<32 random hex digits>``."""
    return f"{account_id}.{secrets.token_hex(16)}"


class KeyRing:
    """Derives (and caches) the chunk key of each key scope from the master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_SIZE:
            raise MasterKeyError(
                f"master key must be {MASTER_KEY_SIZE} bytes, got {len(master_key)}"
            )
        self._master = bytes(master_key)
        self._keys: dict[str, bytes] = {}
        self._name_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyRing({len(self._keys)} scopes cached)"

    def key(self, scope: str) -> bytes:
        """The 32-byte chunk key of ``scope``: HKDF-SHA256(master, info=prefix + scope)."""
        if not scope:
            raise ValueError("key scope is empty")
        with self._lock:
            key = self._keys.get(scope)
            if key is None:
                key = derive_key(self._master, scope)
                self._keys[scope] = key
            return key

    def name_key(self, scope: str) -> bytes:
        """The 32-byte name key of ``scope``: HKDF-SHA256(master, info=name prefix + scope)."""
        if not scope:
            raise ValueError("key scope is empty")
        with self._lock:
            key = self._name_keys.get(scope)
            if key is None:
                key = derive_name_key(self._master, scope)
                self._name_keys[scope] = key
            return key

    def object_name(self, scope: str, chunk_id: str) -> str:
        """The name of a chunk's object in the store (64 hex digits): the HMAC-SHA256 of
        the chunk id under the scope's name key. Without the master key nobody can tell
        which chunk id, hence which content, it stands for."""
        return object_name(self.name_key(scope), chunk_id)


def object_name(name_key: bytes, chunk_id: str) -> str:
    """``HMAC-SHA256(name_key, raw chunk id)`` in hex (see ``KeyRing.object_name``)."""
    return hmac.digest(name_key, bytes.fromhex(chunk_id), hashlib.sha256).hex()


def derive_key(master_key: bytes, scope: str) -> bytes:
    """The chunk key of ``scope`` under ``master_key`` (also what tests use to check)."""
    return _derive(master_key, _INFO_PREFIX, scope)


def derive_name_key(master_key: bytes, scope: str) -> bytes:
    """The name key of ``scope`` under ``master_key`` (see ``KeyRing.name_key``)."""
    return _derive(master_key, _NAME_INFO_PREFIX, scope)


def _derive(master_key: bytes, prefix: bytes, scope: str) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=prefix + scope.encode("utf-8"),
    )
    return hkdf.derive(master_key)


def open_keyring(data_dir: str, *, may_create: bool = True) -> KeyRing:
    """The key ring of the master key in ``data_dir``, made there if there is none.

    ``may_create=False`` (the store already holds chunks) turns a missing key file into
    an error instead of a new key that could not read them. A key file readable by group
    or others, not a regular file, or of the wrong size is refused (MasterKeyError).
    """
    path = os.path.join(data_dir, MASTER_KEY_FILE)
    try:
        return KeyRing(read_master_key(path))
    except FileNotFoundError:
        if not may_create:
            raise MasterKeyError(
                f"master key {path} is missing but the object store already holds chunks "
                "encrypted with it; restore the file from backup (a new key cannot read them)"
            ) from None
    _create_master_key(path)
    return KeyRing(read_master_key(path))


def read_master_key(path: str) -> bytes:
    """The key in ``path`` after checking the file; FileNotFoundError if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise MasterKeyError(
            f"cannot open master key {path}: {e.strerror or e}; it must be a regular file "
            "(not a symbolic link) readable by the provider's user"
        ) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"master key {path} is not a regular file; restore it")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise MasterKeyError(
                f"master key {path} has mode {mode:04o}, so other users may read it; "
                f"restrict it to its owner: chmod 600 {path}"
            )
        data = os.read(fd, MASTER_KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != MASTER_KEY_SIZE:
        raise MasterKeyError(
            f"master key {path} holds {len(data)}{'+' if len(data) > MASTER_KEY_SIZE else ''} "
            f"bytes, not {MASTER_KEY_SIZE}: it is damaged or not a master key; restore it "
            "from backup"
        )
    return data


def _create_master_key(path: str) -> None:
    """Writes a new random key to ``path`` atomically, unless another process did first.

    The key goes to a private temporary file that is fsynced and then hard-linked to
    ``path``: a link never replaces an existing file, so two providers starting at once
    agree on one key, and a crash leaves no half-written key behind.
    """
    try:
        created = create_exclusively(path, secrets.token_bytes(MASTER_KEY_SIZE))
    except OSError as e:
        raise MasterKeyError(f"cannot create master key {path}: {e.strerror or e}") from e
    if not created:
        LOG.info("master key was created by another process", extra={"path": path})
        return
    LOG.warning(
        "new master key created; back it up: chunks cannot be read without it",
        extra={"path": path},
    )
