"""Downloads a release and verifies it with TUF before anything installs it
(docs/updates.md, "Releases and signatures").

``ReleaseTrust.fetch`` refreshes the provider's metadata with python-tuf's ngclient
(root, timestamp, snapshot, targets: signatures, versions, expiries, hashes), downloads the
release's bundle and checks its length and SHA-256 against the signed targets. The trusted
metadata is kept in ``metadata_dir`` on persistent storage, so a provider (or anyone in
between) serving older metadata is refused across restarts too (rollback and freeze
protection). Every refusal is an ``UpdateRefused`` whose ``reason`` says which check
failed and whose message names it; nothing is returned then, and no bundle left in the
cache is ever handed out unverified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from sgw.common.errors import SgwError
from sgw.common.releases import Manifest, ManifestError, bundle_name, target_path

LOG = logging.getLogger(__name__)

METADATA_PATH = "/v1/updates/metadata/"
TARGETS_PATH = "/v1/updates/targets/"
# What the provider's targets carry besides TUF's fields (sgw.provider.releases).
REVOKED_FIELD = "x-sgw-revoked"
REASONS = frozenset(
    {
        "tampered",
        "rollback",
        "expired",
        "untrusted",
        "revoked",
        "not-found",
        "incompatible",
        "unreachable",
    }
)
# Reading a response: how long one read may wait (seconds). A bundle is read in chunks.
_READ_TIMEOUT_S = 60.0
_CHUNK = 1 << 16


class UpdateRefused(SgwError):  # noqa: N818 (the name the update agent programs against)
    """A release was not accepted; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedRelease:
    """A bundle whose length and SHA-256 matched the signed targets."""

    version: str
    severity: str
    bundle: Path
    manifest: Manifest


class _HttpxFetcher(FetcherInterface):
    """ngclient's network access over the gateway's httpx client (its requests are signed
    with the gateway's identity by the client's auth)."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def _fetch(self, url: str) -> Iterator[bytes]:
        request = self.http.build_request("GET", url)
        response = self.http.send(request, stream=True)
        if response.status_code != 200:
            response.read()
            response.close()
            raise tuf_errors.DownloadHTTPError(
                f"GET {url}: {response.status_code} {response.text[:200]}",
                response.status_code,
            )
        return self._chunks(response)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(_CHUNK)
        finally:
            response.close()


class ReleaseTrust:
    """The gateway's TUF client of the provider's release repository."""

    def __init__(
        self, metadata_dir: Path, cache_dir: Path, base_url: str, http: httpx.Client
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.cache_dir = Path(cache_dir)
        self.base_url = base_url.rstrip("/")
        self.http = http

    def fetch(self, version: str, *, running: str | None = None) -> VerifiedRelease:
        """The verified bundle of ``version``, or UpdateRefused. With ``running`` (the
        version this gateway runs), a release that cannot be swapped to from it is
        refused ("incompatible"). A refused version's bundle is removed from the cache
        (one verified before and revoked since included)."""
        try:
            return self._fetch(version, running)
        except UpdateRefused as e:
            (self.cache_dir / bundle_name(version)).unlink(missing_ok=True)
            LOG.warning("release refused", extra={"version": version, "reason": e.reason})
            raise

    def _fetch(self, version: str, running: str | None) -> VerifiedRelease:
        root = self.metadata_dir / "root.json"
        if not root.exists():
            raise UpdateRefused(
                "untrusted",
                f"no trusted release root at {root}: the gateway gets it when it is activated "
                "(or from the image, /usr/share/sgw/tuf-root.json); activate it again",
            )
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=self.base_url + METADATA_PATH,
                target_dir=str(self.cache_dir),
                target_base_url=self.base_url + TARGETS_PATH,
                fetcher=_HttpxFetcher(self.http),
                config=UpdaterConfig(),
                bootstrap=None,
            )
            updater.refresh()
            info = updater.get_targetinfo(target_path(version))
            if info is None:
                raise self._missing(version)
            severity, manifest = _custom(info.custom, version)
            if running is not None and not manifest.swappable(running):
                raise UpdateRefused(
                    "incompatible",
                    f"release {version} cannot be swapped to from {running} (it reads "
                    f"handover records {list(manifest.handover_versions)}, from versions "
                    f"{manifest.swappable_from}); update to an intermediate release first",
                )
            destination = self.cache_dir / bundle_name(version)
            partial = destination.with_name(destination.name + ".partial")
            with _RemovedOnError(partial):
                updater.download_target(info, str(partial))
                os.replace(partial, destination)
        except tuf_errors.ExpiredMetadataError as e:
            raise self._refused(
                "expired", version, f"the provider's signed metadata expired ({e})"
            ) from e
        except tuf_errors.UnsignedMetadataError as e:
            raise self._refused(
                "untrusted",
                version,
                f"metadata not signed by the keys this gateway trusts ({e}); the provider "
                "may be another one, or its keys were replaced without a signed root rotation",
            ) from e
        except tuf_errors.BadVersionNumberError as e:
            raise self._refused(
                "rollback", version, f"the provider served older metadata than trusted ({e})"
            ) from e
        except (tuf_errors.LengthOrHashMismatchError, tuf_errors.DownloadLengthMismatchError) as e:
            raise self._refused(
                "tampered", version, f"a file does not match its signed length or hash ({e})"
            ) from e
        except tuf_errors.RepositoryError as e:
            raise self._refused(
                "untrusted", version, f"the provider's metadata is invalid ({e})"
            ) from e
        except tuf_errors.DownloadError as e:
            raise self._refused(
                "unreachable", version, f"cannot download from {self.base_url} ({e})"
            ) from e
        except httpx.HTTPError as e:
            raise self._refused(
                "unreachable", version, f"cannot reach {self.base_url} ({e})"
            ) from e
        return VerifiedRelease(
            version=version, severity=severity, bundle=destination, manifest=manifest
        )

    @staticmethod
    def _refused(reason: str, version: str, message: str) -> UpdateRefused:
        return UpdateRefused(reason, f"release {version} refused: {message}")

    def _missing(self, version: str) -> UpdateRefused:
        """Revoked (named in the signed targets as revoked) or never published."""
        targets = _trusted_targets(self.metadata_dir)
        revoked = targets.signed.unrecognized_fields.get(REVOKED_FIELD, []) if targets else []
        if version in revoked:
            return UpdateRefused(
                "revoked", f"release {version} was revoked at the provider; it is not installed"
            )
        return UpdateRefused(
            "not-found",
            f"release {version} is not published at {self.base_url} (see `sgw releases list`)",
        )


def _trusted_targets(metadata_dir: Path) -> Metadata[Targets] | None:
    """The targets ngclient verified and kept (it writes only what it verified)."""
    try:
        return Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
    except (OSError, ValueError, tuf_errors.RepositoryError):
        return None


def _custom(custom: dict[str, Any], version: str) -> tuple[str, Manifest]:
    """The severity and manifest a target's signed ``custom`` names (the signed fields:
    tampered if they are not what the provider writes)."""
    sgw = custom.get("sgw")
    try:
        if not isinstance(sgw, dict) or sgw.get("version") != version:
            raise ManifestError("the target's custom.sgw does not name this version")
        severity = sgw.get("severity")
        if severity not in ("normal", "emergency"):
            raise ManifestError(f"severity {severity!r}")
        manifest = Manifest.from_json(sgw["manifest"])
        if manifest.version != version:
            raise ManifestError(f"its manifest is for {manifest.version}")
    except (ManifestError, KeyError, TypeError) as e:
        raise UpdateRefused(
            "tampered", f"release {version} refused: its signed description is invalid ({e})"
        ) from e
    return str(severity), manifest


class _RemovedOnError:
    """Removes ``path`` if the block raises (a partial or unverified download)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.path.unlink(missing_ok=True)
