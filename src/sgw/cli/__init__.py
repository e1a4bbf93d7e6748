"""The ``sgw`` command: one module per command group (see ``main``)."""

from sgw.cli.main import main

__all__ = ["main"]
