"""The gateway's identity: its Ed25519 key and the credentials activation gave it.

``DATA_DIR/identity.key``: the raw 32-byte private key, made at first start, mode 0600;
it never leaves the gateway (the provider knows only the public key). ``DATA_DIR/
credentials.json``: what the provider answered once an admin activated the gateway (its
gateway id, which names the key its requests are signed with), mode 0600. Both are
refused when other users could read them.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from sgw.common.errors import IdentityError
from sgw.common.files import create_exclusively, write_atomically

LOG = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
CREDENTIALS_FILE = "credentials.json"
# The activation confirmation code (sgw.common.activation_key.new_code): shown on the
# appliance's console, never served over the network; keys commit to it.
CODE_FILE = "activation-code"
_KEY_SIZE = 32


@dataclass(frozen=True)
class Credentials:
    """What the provider gave the gateway at activation."""

    gateway_id: str
    account_id: str
    name: str
    key_id: str
    provider_url: str
    timezone: str | None = None


def load_or_create_key(data_dir: str) -> Ed25519PrivateKey:
    """The gateway's identity key, made (0600) if there is none yet."""
    path = os.path.join(data_dir, IDENTITY_FILE)
    try:
        return Ed25519PrivateKey.from_private_bytes(_read_private(path, _KEY_SIZE + 1))
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    try:
        created = create_exclusively(path, raw)
    except OSError as e:
        raise IdentityError(f"cannot create the identity key {path}: {e.strerror or e}") from e
    if not created:  # another process made it first: use that one
        return load_or_create_key(data_dir)
    LOG.info("gateway identity key created", extra={"path": path})
    return key


def load_or_create_code(data_dir: str) -> str:
    """The gateway's activation confirmation code, made (0600) if there is none yet."""
    from sgw.common.activation_key import new_code, normalize_code

    path = os.path.join(data_dir, CODE_FILE)
    try:
        code = normalize_code(_read_private(path, 64).decode("ascii", "replace").strip())
    except FileNotFoundError:
        code = None
    else:
        if code is None:
            raise IdentityError(f"{path} is damaged: delete it (a new code is made)")
        return code
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    code = new_code()
    try:
        created = create_exclusively(path, code.encode() + b"\n")
    except OSError as e:
        raise IdentityError(f"cannot create the activation code {path}: {e.strerror or e}") from e
    if not created:  # another process made it first: use that one
        return load_or_create_code(data_dir)
    LOG.info("gateway activation code created", extra={"path": path})
    return code


def read_credentials(data_dir: str) -> Credentials | None:
    """The stored credentials; None before activation."""
    path = os.path.join(data_dir, CREDENTIALS_FILE)
    try:
        data = _read_private(path, 64 * 1024)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
        return Credentials(**doc)
    except (ValueError, TypeError) as e:
        raise IdentityError(
            f"credentials file {path} is damaged ({e}); delete it and identity.key, then "
            "activate the gateway again"
        ) from e


def write_credentials(data_dir: str, credentials: Credentials) -> None:
    """Stores the credentials atomically, mode 0600."""
    path = os.path.join(data_dir, CREDENTIALS_FILE)
    write_atomically(path, json.dumps(asdict(credentials), indent=2).encode() + b"\n", 0o600)


def _read_private(path: str, limit: int) -> bytes:
    """A secret file's bytes after checking it is a regular file only its owner reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise IdentityError(f"cannot open {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path} has mode {mode:04o}, so other users may read it; restrict it to its "
                f"owner: chmod 600 {path}"
            )
        data = os.read(fd, limit)
    finally:
        os.close(fd)
    if path.endswith(IDENTITY_FILE) and len(data) != _KEY_SIZE:
        raise IdentityError(
            f"identity key {path} holds {len(data)} bytes, not {_KEY_SIZE}: it is damaged; "
            "delete it (the gateway then needs activating again)"
        )
    return data
