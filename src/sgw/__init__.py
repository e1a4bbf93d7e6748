"""sgw: a storage gateway appliance (iSCSI volumes on a durable log, data in an object store)."""

from importlib.metadata import PackageNotFoundError, version

# One version source: pyproject.toml's [project] version, read from the installed package's
# metadata (image/build names the release slot from the same field).
try:
    __version__ = version("sgw")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
