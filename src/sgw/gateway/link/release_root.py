"""The trusted root of release metadata on the gateway (docs/updates.md, "Root pinning").

At activation the provider delivers its TUF root with the gateway's credentials (over the
CA-pinned channel); ``pin_root`` makes it the trusted root in the persistent metadata
directory, unless the image carries a root of its own (``BAKED_ROOT``), which wins. From
then on ngclient keeps that directory: later roots are accepted only signed by the
trusted one. Imported by the activation code of the daemon: python-tuf is imported only
when a root is pinned (its import costs the daemon's restart time under TCG).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sgw.common.files import fsync_directory

LOG = logging.getLogger(__name__)

# A root baked into the image (`make image SGW_TUF_ROOT=path`): it wins over the one a
# provider delivers at activation.
BAKED_ROOT = Path("/usr/share/sgw/tuf-root.json")


def metadata_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where a gateway keeps its trusted release metadata (persistent: rollback and
    freeze protection hold across restarts)."""
    return Path(data_dir, "updates", "metadata")


def pin_root(directory: Path, delivered: bytes | None, baked: Path = BAKED_ROOT) -> str | None:
    """Pins the release root at activation; its fingerprint (None: no root to pin).

    A root already trusted stays (later roots arrive signed by it, through ngclient). A
    root baked into the image is pinned before a delivered one; a delivered root that
    differs from the baked one is refused and logged (the provider is not the one the
    image was built for, or its keys changed without a signed rotation).
    """
    from sgw.common.releases import root_fingerprint

    current = directory / "root.json"
    if current.exists():
        return root_fingerprint(current.read_bytes())
    if baked.exists():
        image_root = baked.read_bytes()
        pinned = root_fingerprint(image_root)
        if delivered is not None and root_fingerprint(delivered) != pinned:
            LOG.error(
                "release root from the provider refused: it differs from the image's "
                "(%s); updates are verified against the image's root, rebuild the image "
                "with this provider's root (make image SGW_TUF_ROOT=...) to change it",
                baked,
                extra={"image_root": pinned, "delivered_root": root_fingerprint(delivered)},
            )
        install_root(directory, image_root)
        return pinned
    if delivered is None:
        LOG.warning("no release root: the provider publishes no releases; updates are refused")
        return None
    install_root(directory, delivered)
    return root_fingerprint(delivered)


def install_root(metadata_dir: Path, root_json: bytes) -> None:
    """Makes ``root_json`` the trusted root in an empty metadata directory (activation).
    Does not replace a root already trusted: later roots arrive signed by it, through
    ngclient."""
    from tuf.api.metadata import Metadata, Root

    Metadata[Root].from_bytes(root_json)  # raises on anything that is not a root
    metadata_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = metadata_dir / "root.json.tmp"
    with open(tmp, "wb") as f:
        f.write(root_json)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, metadata_dir / "root.json")
    fsync_directory(str(metadata_dir / "root.json"))
