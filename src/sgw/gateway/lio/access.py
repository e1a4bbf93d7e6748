"""Who may log in to each volume's target: initiator ACLs with CHAP and mutual CHAP.

The credentials come from ``DATA_DIR/chap.json`` (mode 0600), which the control channel
writes when an admin sets them at the provider (:mod:`sgw.gateway.lio.chap`)::

    {"volumes": {"vol0": [{"initiator": "iqn.1993-08.org.debian:01:host1",
                           "secret": "12-to-16-chars", "target_secret": "another-one"}]}}

A volume with credentials accepts only the listed initiators, each proving itself with
CHAP (user name: the initiator's name; secret: ``secret``); with ``target_secret`` the
target proves itself too (mutual CHAP; user name: the target's IQN). A volume without
credentials accepts any initiator without CHAP, as a new volume does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sgw.common.errors import ConfigError
from sgw.gateway.lio.chap import ChapStore

# RFC 3720 recommends CHAP secrets of at least 96 bits; LIO takes up to 255 characters.
MIN_SECRET = 12
MAX_SECRET = 255
_PRINTABLE = re.compile(r"^[!-~]+$")
INITIATOR = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[!-~]+)?|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32})$"
)


@dataclass(frozen=True)
class InitiatorAccess:
    """One initiator allowed on a target, with its CHAP secret and, for mutual CHAP, the
    secret the target answers with."""

    initiator: str
    secret: str = field(repr=False)
    target_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Access:
    """A target's login rules: these initiators with CHAP, or (none) any initiator."""

    initiators: tuple[InitiatorAccess, ...] = ()

    @property
    def open(self) -> bool:
        return not self.initiators


def load_access(data_dir: str) -> dict[str, Access]:
    """Each volume's rules from ``chap.json``; volumes not in it are open."""
    try:
        raw = ChapStore(data_dir).load()
    except (TypeError, AttributeError) as exc:
        raise ConfigError(f"{ChapStore(data_dir).path} is malformed ({exc}); sync again") from exc
    return {volume: access_of(volume, creds) for volume, creds in raw.items()}


def access_of(volume: str, credentials: object) -> Access:
    """Checks one volume's credentials (objects with ``initiator``, ``secret``,
    ``target_secret``) and returns its rules, sorted by initiator."""
    seen: dict[str, InitiatorAccess] = {}
    for cred in credentials if isinstance(credentials, list) else []:
        what = f"chap.json: volume {volume}"
        name = str(getattr(cred, "initiator", "")).strip().lower()
        if not INITIATOR.match(name):
            raise ConfigError(
                f"{what}: {name!r} is not an iSCSI initiator name "
                "(iqn.YYYY-MM.domain[:...], eui.<16 hex> or naa.<hex>)"
            )
        secret = _secret(getattr(cred, "secret", None), f"{what}, {name}: secret")
        target = getattr(cred, "target_secret", None)
        if target is not None:
            target = _secret(target, f"{what}, {name}: target_secret")
            if target == secret:
                raise ConfigError(
                    f"{what}, {name}: the target secret must differ from the initiator's (RFC 3720)"
                )
        seen[name] = InitiatorAccess(name, secret, target)
    return Access(tuple(seen[n] for n in sorted(seen)))


def rules_for(rules: Mapping[str, Access], volume: str) -> Access:
    return rules.get(volume, Access())


def _secret(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not _PRINTABLE.match(value)
        or not MIN_SECRET <= len(value) <= MAX_SECRET
    ):
        raise ConfigError(f"{what}: {MIN_SECRET}-{MAX_SECRET} printable characters, no spaces")
    return value
