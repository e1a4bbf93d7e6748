"""The names of a gateway's volumes: one rule for the gateway's configuration, the
provider's records of volumes on a gateway, the commands between them and the CLI.

A gateway's volume name becomes an NBD export name and a disk file's name
(``volumes/NAME.img``), so it is short and plain. It is checked with ``fullmatch``:
``re.match`` with ``$`` also accepts a name that ends in a newline.
"""

from __future__ import annotations

import re

VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VOLUME_NAME_HELP = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_volume_name(name: object) -> bool:
    """True if ``name`` may name a volume on a gateway."""
    return isinstance(name, str) and VOLUME_NAME.fullmatch(name) is not None
