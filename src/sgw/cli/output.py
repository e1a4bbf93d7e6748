"""What the admin groups print: tables (rich) by default, JSON with ``--output json`` for
scripts. Messages for people go to standard error, so JSON output stays parseable."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def emit(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    """Prints ``data`` (a dict or a list of dicts) as a table or as JSON."""
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if isinstance(data, dict):
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column(overflow="fold")  # whole values (a fingerprint), wrapped
        for key, value in data.items():
            table.add_row(key, _cell(value))
    else:
        cols = list(columns or (data[0].keys() if data else []))
        table = Table()
        for col in cols:
            table.add_column(col, overflow="fold")
        for row in data:
            table.add_row(*(_cell(row.get(c)) for c in cols))
        if not data:
            console.print("(none)")
            return
    console.print(table)


def done(args: argparse.Namespace, message: str) -> None:
    """Reports a command that has nothing to show but its success."""
    if args.output == "json":
        print(json.dumps({"ok": True, "message": message}))
    else:
        print(message)


def warn_token_shown_once(args: argparse.Namespace) -> None:
    if args.output != "json":
        print("The token is shown only now: store it safely.", file=sys.stderr)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)
