"""Who may log in to each volume's target: closed by default, initiator ACLs with or
without CHAP, or open.

The rules come from ``DATA_DIR/chap.json`` (sgw.gateway.lio.chap), which the control
channel writes when an admin sets them at the provider. A volume accepts:

- nobody, while it has no rules (closed: the target has no ACL, so LIO refuses every
  login before authentication);
- the listed initiators, each proving itself with CHAP (user name: the initiator's name;
  secret: ``secret``; with ``target_secret`` the target proves itself too, mutual CHAP,
  user name: the target's IQN), or logging in without CHAP where the admin allowed that
  initiator by name alone (an ACL, for hosts on a trusted network);
- any initiator without authentication while the ``open`` flag is set (labs only; the
  rules are kept but not applied), or while the volume is "legacy open": exported open by
  a gateway from before closed-by-default access, with no rules when this gateway was
  updated, until the admin first sets its access (sgw.gateway.lio.exporter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sgw.common.errors import ConfigError
from sgw.common.iscsi import INITIATOR_NAME_HELP, access_label, initiator_name
from sgw.gateway.lio.chap import ChapStore, VolumeRules

# RFC 3720 recommends CHAP secrets of at least 96 bits; LIO takes up to 255 characters.
MIN_SECRET = 12
MAX_SECRET = 255
_PRINTABLE = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class InitiatorAccess:
    """One initiator allowed on a target: with its CHAP secret and, for mutual CHAP, the
    secret the target answers with; without a secret it logs in without CHAP."""

    initiator: str
    secret: str | None = field(default=None, repr=False)
    target_secret: str | None = field(default=None, repr=False)

    @property
    def chap(self) -> bool:
        return self.secret is not None


@dataclass(frozen=True)
class Access:
    """A target's login rules: the listed initiators, or any initiator (``open``), or
    (neither) nobody."""

    initiators: tuple[InitiatorAccess, ...] = ()
    open: bool = False

    @property
    def closed(self) -> bool:
        return not self.open and not self.initiators

    @property
    def without_chap(self) -> bool:
        """True if an initiator may log in without authentication."""
        return self.open or any(not a.chap for a in self.initiators)

    @property
    def mixed(self) -> bool:
        """True if some initiators need CHAP and others do not (LIO must then decide per
        ACL, which needs Linux 6.0 or newer)."""
        return any(a.chap for a in self.initiators) and any(not a.chap for a in self.initiators)

    def label(self, legacy_open: bool = False) -> str:
        """``closed``, ``chap N``, ``acl N``, ``OPEN`` or ``OPEN (legacy)``."""
        chap = sum(1 for a in self.initiators if a.chap)
        return access_label(chap, len(self.initiators) - chap, self.open, legacy_open)


def load_access(data_dir: str) -> dict[str, Access]:
    """Each volume's rules from ``chap.json`` (ConfigError if it is unreadable or a rule
    is invalid); volumes not in it have none."""
    return {
        volume: access_of(volume, rules) for volume, rules in ChapStore(data_dir).load().items()
    }


def access_of(volume: str, rules: VolumeRules) -> Access:
    """Checks one volume's rules and returns them, sorted by initiator. An initiator both
    with CHAP and without is held to CHAP."""
    what = f"chap.json: volume {volume}"
    seen: dict[str, InitiatorAccess] = {}
    for name in rules.initiators:
        checked = _initiator(name, what)
        seen[checked] = InitiatorAccess(checked)
    for cred in rules.chap:
        name = _initiator(cred.initiator, what)
        secret = _secret(cred.secret, f"{what}, {name}: secret")
        target = cred.target_secret
        if target is not None:
            target = _secret(target, f"{what}, {name}: target_secret")
            if target == secret:
                raise ConfigError(
                    f"{what}, {name}: the target secret must differ from the initiator's (RFC 3720)"
                )
        seen[name] = InitiatorAccess(name, secret, target)
    return Access(tuple(seen[n] for n in sorted(seen)), rules.open)


def effective_access(stored: Access | None, legacy_open: bool) -> Access:
    """What LIO holds for a volume: its rules (the open flag wins), else open if it is
    legacy open, else closed."""
    if stored is not None and stored.open:
        return Access(open=True)
    if stored is not None and stored.initiators:
        return Access(stored.initiators)
    return Access(open=True) if legacy_open else Access()


def _initiator(value: object, what: str) -> str:
    name = initiator_name(value) if isinstance(value, str) else None
    if name is None:
        raise ConfigError(f"{what}: {str(value)[:80]!r} is not {INITIATOR_NAME_HELP}")
    return name


def _secret(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not _PRINTABLE.fullmatch(value)
        or not MIN_SECRET <= len(value) <= MAX_SECRET
    ):
        raise ConfigError(f"{what}: {MIN_SECRET}-{MAX_SECRET} printable characters, no spaces")
    return value
