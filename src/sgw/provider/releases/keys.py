"""The TUF keys of a provider's releases (docs/updates.md, "Keys").

``init_keys`` makes, in a directory the operator keeps apart (offline), the root key and
the three online keys (targets, snapshot, timestamp; Ed25519) and signs the first root
(``root.json``). ``install_online_keys`` copies from there into the provider's data
directory only what the provider signs with: the online keys and root.json. The root's
private key never goes to the provider: a provider that is broken into can sign new
releases until the operator rotates the online keys with a new root, not a new root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from sgw.common.errors import ConfigError
from sgw.common.files import create_exclusively, write_atomically
from sgw.common.releases import root_fingerprint

LOG = logging.getLogger(__name__)

ROOT_FILE = "root.json"
ROOT_KEY_FILE = "root.key.pem"
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
# The first root's lifetime: the root is signed offline, so it is re-signed (with the
# root key) at most this often; a gateway refuses a root past its expiry.
ROOT_EXPIRY = timedelta(days=365)
# Where the provider keeps its online keys and root.json, under its data directory.
PROVIDER_KEYS_DIR = "releases"


def key_file(role: str) -> str:
    return f"{role}.key.pem"


def _signer(path: Path) -> CryptoSigner:
    try:
        private = load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError as e:
        raise ConfigError(f"release key {path} is missing; see docs/updates.md, Keys") from e
    except ValueError as e:
        raise ConfigError(f"release key {path} is not a PEM private key: {e}") from e
    return CryptoSigner(private)


def init_keys(out_dir: str, *, now: datetime | None = None) -> Metadata[Root]:
    """Writes a new root key, the online keys and the first signed root to ``out_dir``
    (private keys 0600, made exclusively: an existing key is never overwritten)."""
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in (ROOT_FILE, ROOT_KEY_FILE, *(key_file(r) for r in ONLINE_ROLES)):
        if (out / name).exists():
            raise ConfigError(
                f"{out / name} exists: release keys are made once; keep the directory, or "
                "choose an empty one"
            )
    now = now or datetime.now(UTC)
    root = Root(expires=(now + ROOT_EXPIRY).replace(microsecond=0), consistent_snapshot=True)
    signers: dict[str, CryptoSigner] = {Root.type: CryptoSigner.generate_ed25519()}
    for role in ONLINE_ROLES:
        signers[role] = CryptoSigner.generate_ed25519()
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    metadata = Metadata(root)
    metadata.sign(signers[Root.type])
    for role, signer in signers.items():
        name = ROOT_KEY_FILE if role == Root.type else key_file(role)
        if not create_exclusively(str(out / name), signer.private_bytes, 0o600):
            raise ConfigError(f"{out / name} appeared while the keys were made; start again")
    write_atomically(str(out / ROOT_FILE), metadata.to_bytes(JSONSerializer()), 0o644)
    LOG.info("release keys made", extra={"dir": str(out), "fingerprint": fingerprint(metadata)})
    return metadata


def fingerprint(root: Metadata[Root]) -> str:
    """The root's fingerprint (sgw.common.releases.root_fingerprint)."""
    return root_fingerprint(root.to_bytes(JSONSerializer()))


@dataclass(frozen=True)
class OnlineKeys:
    """What the provider signs with: the trusted root and the online roles' signers."""

    root: Metadata[Root]
    signers: dict[str, Signer]

    @property
    def root_bytes(self) -> bytes:
        return self.root.to_bytes(JSONSerializer())


def install_online_keys(keys_dir: str, data_dir: str) -> str:
    """Copies root.json and the online keys from ``keys_dir`` into the provider's data
    directory (never the root key); returns the root's fingerprint."""
    src = Path(keys_dir)
    dest = Path(data_dir, PROVIDER_KEYS_DIR)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = _read_root(src / ROOT_FILE)
    for role in ONLINE_ROLES:
        _check_key(root, role, _signer(src / key_file(role)))
    for role in ONLINE_ROLES:
        write_atomically(str(dest / key_file(role)), (src / key_file(role)).read_bytes(), 0o600)
    write_atomically(str(dest / ROOT_FILE), (src / ROOT_FILE).read_bytes(), 0o644)
    return fingerprint(root)


def load_online_keys(data_dir: str) -> OnlineKeys | None:
    """The provider's online keys, or None if `sgw provider releases-init` never ran."""
    path = Path(data_dir, PROVIDER_KEYS_DIR)
    if not (path / ROOT_FILE).exists():
        return None
    root = _read_root(path / ROOT_FILE)
    signers: dict[str, Signer] = {}
    for role in ONLINE_ROLES:
        signer = _signer(path / key_file(role))
        _check_key(root, role, signer)
        signers[role] = signer
    return OnlineKeys(root, signers)


def _read_root(path: Path) -> Metadata[Root]:
    try:
        root = Metadata[Root].from_bytes(path.read_bytes())
    except FileNotFoundError as e:
        raise ConfigError(
            f"{path} is missing: make the release keys with `sgw releases keys init DIR`"
        ) from e
    except Exception as e:  # tuf's DeserializationError, JSON errors
        raise ConfigError(f"{path} is not TUF root metadata: {e}") from e
    if root.signed.type != Root.type:
        raise ConfigError(f"{path} is {root.signed.type} metadata, not a root")
    return root


def _check_key(root: Metadata[Root], role: str, signer: Signer) -> None:
    key = signer.public_key
    if not isinstance(key, SSlibKey) or key.keyid not in root.signed.roles[role].keyids:
        raise ConfigError(
            f"the {role} key is not the one root.json names for {role}; copy root.json and "
            "the keys from the same `sgw releases keys init` directory"
        )
