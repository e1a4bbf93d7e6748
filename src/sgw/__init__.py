"""sgw: a storage gateway appliance (iSCSI volumes on a durable log, data in an object store)."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """The installed package's version: pyproject.toml's [project] version is the one
    source (image/build names the release slot from the same field). Read on first use:
    importing importlib.metadata costs about a second in the appliance under TCG, time a
    restarted daemon must not spend before it reattaches its devices."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sgw")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'sgw' has no attribute {name!r}")
