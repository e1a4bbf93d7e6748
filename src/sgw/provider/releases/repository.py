"""The provider's TUF repository of appliance releases (docs/updates.md, "Releases and
signatures").

Metadata and bundles live in the provider's object store (``updates/metadata/...``,
``updates/targets/...``) with consistent snapshots (versioned ``N.targets.json`` and
``N.snapshot.json``, bundles under their SHA-256), so a gateway reading while a publish
writes sees one whole state: the new objects are written first, ``timestamp.json`` last.
The ``releases`` rows are the list of what is published; every signing rebuilds the
targets from them (revoked rows left out, and named in the targets' ``x-sgw-revoked`` so a
gateway can tell "revoked" from "never published").

Every provider process may publish and re-sign: a lock file under the data directory
(``lock``) serializes those of one machine, a PostgreSQL advisory lock those of several,
and each re-reads the current state from the store under them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from sgw.common.errors import (
    BadRequestError,
    ConfigError,
    NameTakenError,
    NotFoundError,
    ObjectNotFoundError,
    ObjectStoreError,
)
from sgw.common.releases import (
    MANIFEST_NAME,
    RELEASES_DIR,
    Manifest,
    ManifestError,
    TreeDigest,
    target_path,
)
from sgw.provider.blockstore.objects import ObjectStore, check_key
from sgw.provider.db.models import Release
from sgw.provider.db.periodic import Periodic
from sgw.provider.releases.keys import OnlineKeys

LOG = logging.getLogger(__name__)

METADATA_PREFIX = "updates/metadata/"
TARGETS_PREFIX = "updates/targets/"
# Lifetimes of the online roles' metadata. A gateway refuses metadata past its expiry
# (freeze protection): the timestamp is re-signed by every provider's refresh task, so a
# provider that stops (or is cut off) stops gateways from updating within a day.
TARGETS_EXPIRY = timedelta(days=30)
SNAPSHOT_EXPIRY = timedelta(days=7)
TIMESTAMP_EXPIRY = timedelta(days=1)
# A role is re-signed once less than this share of its lifetime remains.
RESIGN_SHARE = 0.5
# The largest bundle accepted (bytes): a slot is some 60-120 MiB compressed.
MAX_BUNDLE = 512 << 20
# What the targets carry besides TUF's fields: the versions revoked (signed, so a
# gateway can say why it refuses one).
REVOKED_FIELD = "x-sgw-revoked"
CHANNELS = ("canary", "stable")
SEVERITIES = ("normal", "emergency")
_HASH_CHUNK = 1 << 20
# PostgreSQL advisory lock key of the release signing (any constant no other lock uses).
_PG_LOCK_KEY = 0x5367_5245_4C53  # "SgRELS"


@dataclass(frozen=True)
class ReleaseInfo:
    """A release as the API lists it."""

    version: str
    channel: str
    severity: str
    target: str
    length: int
    sha256: str
    manifest: Manifest
    published: datetime
    revoked: datetime | None

    @classmethod
    def of(cls, row: Release) -> ReleaseInfo:
        return cls(
            version=row.version,
            channel=row.channel,
            severity=row.severity,
            target=row.target,
            length=row.length,
            sha256=row.sha256,
            manifest=Manifest.from_json(json.loads(row.manifest)),
            published=row.published,
            revoked=row.revoked,
        )


def read_bundle_manifest(bundle: BinaryIO) -> Manifest:
    """The manifest inside a bundle, after checking that every member lies in its own
    slot (``opt/sgw/releases/<version>/``) and that the slot's files match the manifest's
    ``tree_sha256`` (a bundle damaged or edited after its build is refused here, before
    any gateway downloads it); BadRequestError naming what is wrong."""
    found: bytes | None = None
    prefix: str | None = None
    tree = TreeDigest()
    files: dict[str, str] = {}  # member name -> SHA-256 of its contents (for hard links)
    try:
        with (
            zstandard.ZstdDecompressor().stream_reader(bundle, closefd=False) as raw,
            tarfile.open(fileobj=raw, mode="r|") as tar,
        ):
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                parts = name.split("/")
                if len(parts) < 4 or "/".join(parts[:3]) != RELEASES_DIR or ".." in parts:
                    if RELEASES_DIR.startswith(name):
                        continue  # the directories above the slot
                    raise BadRequestError(
                        f"bundle member {member.name!r} is outside {RELEASES_DIR}/VERSION/; "
                        "build bundles with `sgw releases build`"
                    )
                slot = "/".join(parts[:4])
                if prefix is None:
                    prefix = slot
                elif slot != prefix:
                    raise BadRequestError(
                        f"bundle holds two slots ({prefix} and {slot}); one release per bundle"
                    )
                if name == slot:
                    continue  # the slot's own directory
                rel = name[len(slot) + 1 :]
                mode = member.mode & 0o7777
                if member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    data = extracted.read()
                    if rel == MANIFEST_NAME:
                        found = data
                    files[name] = hashlib.sha256(data).hexdigest()
                    tree.add(rel, "f", mode, files[name])
                elif member.islnk():
                    target = member.linkname.removeprefix("./")
                    if target not in files:
                        raise BadRequestError(
                            f"bundle member {member.name!r} links to {member.linkname!r}, "
                            "not a file before it in the bundle"
                        )
                    files[name] = files[target]
                    tree.add(rel, "f", mode, files[name])
                elif member.isdir():
                    tree.add(rel, "d", mode, "")
                elif member.issym():
                    tree.add(rel, "l", 0o777, member.linkname)
                else:
                    raise BadRequestError(
                        f"bundle member {member.name!r} is neither a file, a directory nor a link"
                    )
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        raise BadRequestError(f"the bundle is not a zstd tar: {e}") from e
    if found is None or prefix is None:
        raise BadRequestError(
            f"the bundle has no {RELEASES_DIR}/VERSION/{MANIFEST_NAME}; build it with "
            "`sgw releases build`"
        )
    try:
        manifest = Manifest.from_json(json.loads(found))
    except (ValueError, ManifestError) as e:
        raise BadRequestError(f"the bundle's {MANIFEST_NAME} is invalid: {e}") from e
    if prefix != f"{RELEASES_DIR}/{manifest.version}":
        raise BadRequestError(
            f"the bundle's slot {prefix} does not match its manifest's version {manifest.version}"
        )
    if tree.hexdigest() != manifest.tree_sha256:
        raise BadRequestError(
            "the bundle's files do not match its manifest's tree_sha256 (the slot was "
            "changed after `sgw releases build`, or the bundle is damaged): rebuild it"
        )
    return manifest


def _digest(f: BinaryIO) -> tuple[int, str]:
    h = hashlib.sha256()
    length = 0
    while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
        length += len(chunk)
    return length, h.hexdigest()


class ReleaseRepository:
    """Publishes, lists and revokes releases; keeps the signed metadata fresh."""

    def __init__(
        self,
        store: ObjectStore,
        sessions: sessionmaker[Session],
        keys: OnlineKeys,
        lock_path: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.keys = keys
        self.lock_path = lock_path
        self.clock = clock

    # Serving

    def metadata(self, name: str) -> bytes:
        """A metadata file (``timestamp.json``, ``N.snapshot.json``...), or NotFoundError."""
        return self._get(METADATA_PREFIX + name, f"update metadata {name}")

    def target(self, path: str) -> bytes:
        """A target file by its hash-prefixed path, or NotFoundError."""
        return self._get(TARGETS_PREFIX + path, f"update target {path}")

    def _get(self, key: str, what: str) -> bytes:
        try:
            check_key(key)
        except ObjectStoreError as e:  # a name no store holds ("..", a dot-name)
            raise NotFoundError(f"{what} not found") from e
        try:
            return self.store.get(key)
        except ObjectNotFoundError as e:
            raise NotFoundError(f"{what} not found") from e

    # Operator's calls

    def ensure_initialized(self) -> None:
        """Writes the root (and a root newer than the store's, after a rotation) and the
        first targets, snapshot and timestamp, unless they are there."""
        with self._locked():
            root = self.keys.root
            version = root.signed.version
            name = f"{version}.{Root.type}.json"
            if not self.store.exists(METADATA_PREFIX + name):
                self.store.put(METADATA_PREFIX + name, self.keys.root_bytes)
                LOG.info("release root stored", extra={"root_version": version})
            if not self.store.exists(METADATA_PREFIX + f"{Timestamp.type}.json"):
                self._sign(self._rows(), "targets")

    def publish(self, bundle: BinaryIO, channel: str, severity: str) -> ReleaseInfo:
        """Signs the bundle (a seekable file) as a new release in ``channel``."""
        if channel not in CHANNELS:
            raise BadRequestError(f"channel {channel!r}: choose one of {', '.join(CHANNELS)}")
        if severity not in SEVERITIES:
            raise BadRequestError(f"severity {severity!r}: choose one of {', '.join(SEVERITIES)}")
        bundle.seek(0)
        length, sha256 = _digest(bundle)
        if length == 0:
            raise BadRequestError("the bundle is empty; send the .tar.zst as the body")
        bundle.seek(0)
        manifest = read_bundle_manifest(bundle)
        path = target_path(manifest.version)
        with self._locked():
            with self.sessions() as s:
                if s.get(Release, manifest.version) is not None:
                    raise NameTakenError(
                        f"release {manifest.version} is already published; a new build "
                        "takes a new version (`sgw releases build --version V`)"
                    )
            bundle.seek(0)
            dirname, _, basename = path.rpartition("/")
            self.store.put(f"{TARGETS_PREFIX}{dirname}/{sha256}.{basename}", bundle.read())
            row = Release(
                version=manifest.version,
                channel=channel,
                severity=severity,
                target=path,
                length=length,
                sha256=sha256,
                manifest=json.dumps(manifest.to_json(), sort_keys=True),
                published=self.clock(),
            )
            try:
                with self.sessions.begin() as s:
                    s.add(row)
            except IntegrityError as e:
                raise NameTakenError(f"release {manifest.version} is already published") from e
            self._sign(self._rows(), "targets")
            with self.sessions() as s:
                info = ReleaseInfo.of(s.get_one(Release, manifest.version))
        LOG.info(
            "release published",
            extra={"version": info.version, "channel": channel, "severity": severity},
        )
        return info

    def list_releases(self) -> list[ReleaseInfo]:
        with self.sessions() as s:
            rows = s.scalars(select(Release).order_by(Release.published, Release.version))
            return [ReleaseInfo.of(r) for r in rows]

    def get(self, version: str) -> ReleaseInfo:
        with self.sessions() as s:
            row = s.get(Release, version)
            if row is None:
                raise NotFoundError(f"release {version} not found; see `sgw releases list`")
            return ReleaseInfo.of(row)

    def revoke(self, version: str) -> ReleaseInfo:
        """Removes the release from the signed targets (gateways refuse it from their
        next refresh on); its row stays, marked revoked."""
        with self._locked():
            with self.sessions.begin() as s:
                row = s.get(Release, version)
                if row is None:
                    raise NotFoundError(f"release {version} not found; see `sgw releases list`")
                if row.revoked is None:
                    row.revoked = self.clock()
            self._sign(self._rows(), "targets")
        LOG.info("release revoked", extra={"version": version})
        return self.get(version)

    def refresh(self) -> list[str]:
        """Re-signs the roles whose metadata nears its expiry (and the ones above them);
        returns the roles signed. Every provider process calls this periodically."""
        with self._locked():
            now = self.clock()
            state = self._state()
            if state is None:
                return []
            timestamp, snapshot, targets = state
            if _due(targets.signed, TARGETS_EXPIRY, now):
                return self._sign(self._rows(), "targets")
            if _due(snapshot.signed, SNAPSHOT_EXPIRY, now):
                return self._sign(self._rows(), "snapshot")
            if _due(timestamp.signed, TIMESTAMP_EXPIRY, now):
                return self._sign(self._rows(), "timestamp")
            return []

    def resign(self, top: str) -> list[str]:
        """Signs new metadata from ``top`` ("targets", "snapshot" or "timestamp") down,
        whether due or not; the roles signed."""
        with self._locked():
            return self._sign(self._rows(), top)

    # Signing

    def _rows(self) -> list[Release]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Release).order_by(Release.version)))
            s.expunge_all()
            return rows

    def _state(self) -> tuple[Metadata[Timestamp], Metadata[Snapshot], Metadata[Targets]] | None:
        try:
            timestamp = Metadata[Timestamp].from_bytes(self.metadata(f"{Timestamp.type}.json"))
        except NotFoundError:
            return None
        snap_version = timestamp.signed.snapshot_meta.version
        snapshot = Metadata[Snapshot].from_bytes(
            self.metadata(f"{snap_version}.{Snapshot.type}.json")
        )
        targets_version = snapshot.signed.meta[f"{Targets.type}.json"].version
        targets = Metadata[Targets].from_bytes(
            self.metadata(f"{targets_version}.{Targets.type}.json")
        )
        return timestamp, snapshot, targets

    def _sign(self, rows: list[Release], top: str) -> list[str]:
        """Signs new metadata from ``top`` ("targets", "snapshot" or "timestamp") down to
        the timestamp, each one version past the store's; the timestamp is written last."""
        now = self.clock().replace(microsecond=0)
        state = self._state()
        signed: list[str] = []
        if state is None:
            versions = (0, 0, 0)
            targets_meta = snapshot_meta = None
        else:
            timestamp, snapshot, targets = state
            versions = (
                targets.signed.version,
                snapshot.signed.version,
                timestamp.signed.version,
            )
            targets_meta = snapshot.signed.meta[f"{Targets.type}.json"]
            snapshot_meta = timestamp.signed.snapshot_meta
        if top == "targets" or targets_meta is None:
            live = {
                r.target: TargetFile(
                    length=r.length,
                    hashes={"sha256": r.sha256},
                    path=r.target,
                    unrecognized_fields={"custom": {"sgw": _custom(r)}},
                )
                for r in rows
                if r.revoked is None
            }
            new_targets = Targets(
                version=versions[0] + 1,
                expires=now + TARGETS_EXPIRY,
                targets=live,
                unrecognized_fields={
                    REVOKED_FIELD: sorted(r.version for r in rows if r.revoked is not None)
                },
            )
            data = self._signed_bytes(new_targets)
            self.store.put(METADATA_PREFIX + f"{new_targets.version}.{Targets.type}.json", data)
            targets_meta = _meta(new_targets.version, data)
            signed.append(Targets.type)
        if top in ("targets", "snapshot") or snapshot_meta is None:
            new_snapshot = Snapshot(
                version=versions[1] + 1,
                expires=now + SNAPSHOT_EXPIRY,
                meta={f"{Targets.type}.json": targets_meta},
            )
            data = self._signed_bytes(new_snapshot)
            self.store.put(METADATA_PREFIX + f"{new_snapshot.version}.{Snapshot.type}.json", data)
            snapshot_meta = _meta(new_snapshot.version, data)
            signed.append(Snapshot.type)
        new_timestamp = Timestamp(
            version=versions[2] + 1, expires=now + TIMESTAMP_EXPIRY, snapshot_meta=snapshot_meta
        )
        self.store.put(
            METADATA_PREFIX + f"{Timestamp.type}.json", self._signed_bytes(new_timestamp)
        )
        signed.append(Timestamp.type)
        LOG.info("release metadata signed", extra={"roles": signed})
        return signed

    def _signed_bytes(self, signed: Targets | Snapshot | Timestamp) -> bytes:
        metadata: Metadata[Any] = Metadata(signed)
        metadata.sign(self.keys.signers[signed.type])
        return metadata.to_bytes(JSONSerializer())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Held while signing: the lock file (this machine's processes and threads) and,
        on PostgreSQL, an advisory lock (processes on other machines)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.sessions() as s:
                if s.get_bind().dialect.name != "postgresql":
                    yield
                    return
                # Session-level: held by this session's connection until unlocked.
                s.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                try:
                    yield
                finally:
                    s.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        finally:
            os.close(fd)


def _custom(row: Release) -> dict[str, Any]:
    return {
        "version": row.version,
        "severity": row.severity,
        "channel": row.channel,
        "manifest": json.loads(row.manifest),
    }


def _meta(version: int, data: bytes) -> MetaFile:
    return MetaFile(
        version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
    )


def _due(signed: Signed, lifetime: timedelta, now: datetime) -> bool:
    return signed.expires - now < lifetime * RESIGN_SHARE


def open_repository(
    store: ObjectStore, sessions: sessionmaker[Session], data_dir: str, keys: OnlineKeys
) -> ReleaseRepository:
    """The repository of a provider whose online keys are installed (ensured initialized)."""
    lock = Path(data_dir, "releases", "lock")
    if not lock.parent.is_dir():
        raise ConfigError(f"{lock.parent} is missing; run `sgw provider releases-init`")
    repository = ReleaseRepository(store, sessions, keys, str(lock))
    repository.ensure_initialized()
    return repository


# How often every provider process looks for metadata to re-sign (seconds): well inside
# the half of the timestamp's day that remains when it is due.
REFRESH_EVERY_S = 600.0


def refresh_task(
    repository: ReleaseRepository, every_s: float = REFRESH_EVERY_S
) -> Periodic[list[str]]:
    """Re-signs expiring metadata every ``every_s`` in this process (``refresh`` takes the
    repository's lock and re-reads the store, so processes doing the same never sign twice
    for one expiry)."""
    return Periodic("release-refresh", repository.refresh, [], tick_s=every_s)
