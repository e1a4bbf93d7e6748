"""Who may log in to a volume's iSCSI target: the names and words both sides share.

A volume's access is closed (no initiator may log in) until the admin adds a rule: an
initiator with CHAP credentials, an initiator allowed without CHAP (an ACL alone, for
hosts on a trusted network), or the ``open`` flag (any initiator, no authentication: labs
only). A volume that an older gateway exported open and that had no rules when its
gateway was updated stays open ("legacy open") until the admin first sets its access.
The provider stores the rules; the gateway applies them (sgw.gateway.lio) and reports
each volume's ``iscsi_access`` label in its ``describe`` answer.
"""

from __future__ import annotations

import re

# An initiator's iSCSI name as the gateway writes it into LIO (lower case): iqn.YYYY-MM.
# reversed-domain[:anything printable], eui.<16 hex> or naa.<16 or 32 hex> (RFC 3720 3.2.6).
INITIATOR_NAME = re.compile(
    r"iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[!-~]+)?|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32}"
)
INITIATOR_NAME_MAX = 223
INITIATOR_NAME_HELP = (
    "an iSCSI initiator name: iqn.YYYY-MM.reversed.domain[:name], eui.<16 hex digits> or "
    "naa.<16 or 32 hex digits>, e.g. iqn.1994-05.com.redhat:host1"
)

# The ``iscsi_access`` labels (``sgw volumes list``, the gateway's ``describe``).
CLOSED = "closed"
OPEN = "OPEN"
LEGACY_OPEN = "OPEN (legacy)"
NOT_EXPORTED = "not exported"  # the gateway exports nothing over iSCSI ([lio] off)


def initiator_name(text: str) -> str | None:
    """The initiator name in the form LIO holds it (lower case), None if ``text`` is not
    one (iSCSI names are case-insensitive, RFC 3722)."""
    name = text.strip().lower()
    if len(name) > INITIATOR_NAME_MAX or not INITIATOR_NAME.fullmatch(name):
        return None
    return name


def access_label(chap: int, acl: int, open_: bool, legacy_open: bool) -> str:
    """One volume's access in a word or two: ``OPEN`` (the open flag: the rules are kept
    but not applied), ``chap N`` and/or ``acl N`` (initiators with CHAP, without), ``OPEN
    (legacy)`` (no rules, open since before the update), else ``closed``."""
    if open_:
        return OPEN
    parts = ([f"chap {chap}"] if chap else []) + ([f"acl {acl}"] if acl else [])
    if parts:
        return ", ".join(parts)
    return LEGACY_OPEN if legacy_open else CLOSED
