"""Update policies: which channel a gateway takes releases from, its maintenance window and
whether it swaps to every release on its own or to emergency ones only.

A gateway's own policy wins over its account's default, which wins over the built-in
``DEFAULT_POLICY`` (stable, weekly Sunday 03:00 for 60 minutes in the gateway's time
zone, all releases). Setting a policy names only what changes: the other fields keep the
values in effect before (so ``--channel canary`` keeps the window). The window is
evaluated by the gateway in its own time zone (the ``timezone`` column of ``gateways``,
UTC when it has none): docs/updates.md, "Maintenance windows and policy".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sgw.common.errors import BadRequestError, NotFoundError
from sgw.common.maintenance import Window
from sgw.provider.db.models import AccountUpdatePolicy, Gateway, UpdatePolicy, utcnow

LOG = logging.getLogger(__name__)

Channel = Literal["canary", "stable"]
Automatic = Literal["all", "emergency"]
Source = Literal["gateway", "account", "default"]
CHANNELS: tuple[Channel, ...] = ("canary", "stable")
AUTOMATIC: tuple[Automatic, ...] = ("all", "emergency")


@dataclass(frozen=True, slots=True)
class Policy:
    """What a gateway takes (``channel``), when (``window``) and which on its own
    (``automatic``: ``all`` releases, or ``emergency`` ones only)."""

    channel: Channel
    window: Window
    automatic: Automatic

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "window": self.window.to_json(),
            "automatic": self.automatic,
        }

    def takes(self, severity: str) -> bool:
        """True if a release of ``severity`` is swapped to inside the window unasked."""
        return self.automatic == "all" or severity == "emergency"


DEFAULT_POLICY = Policy("stable", Window("weekly", 6, 3, 0, 60), "all")


def check_channel(channel: str) -> Channel:
    if channel not in CHANNELS:
        raise BadRequestError(f"channel {channel[:40]!r}: give canary or stable")
    return channel


def check_automatic(automatic: str) -> Automatic:
    if automatic not in AUTOMATIC:
        raise BadRequestError(
            f"automatic {automatic[:40]!r}: give all (every release) or emergency (emergency "
            "releases only; others need `sgw updates now`)"
        )
    return automatic


def _policy(row: UpdatePolicy | AccountUpdatePolicy) -> Policy:
    window = Window(
        row.window_kind,  # type: ignore[arg-type]
        row.window_day,
        row.window_hour,
        row.window_minute,
        row.window_minutes,
    )
    return Policy(check_channel(row.channel), window, check_automatic(row.automatic))


def _store(row: UpdatePolicy | AccountUpdatePolicy, policy: Policy) -> None:
    row.channel = policy.channel
    row.window_kind = policy.window.kind
    row.window_day = policy.window.day
    row.window_hour = policy.window.hour
    row.window_minute = policy.window.minute
    row.window_minutes = policy.window.duration_minutes
    row.automatic = policy.automatic
    row.updated = utcnow()


class Policies:
    """The policy store (blocking: the API calls it in worker threads)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def account_policy(self, account_id: str) -> tuple[Policy, Source]:
        """The account's default, or the built-in one."""
        with self._sessions() as s:
            row = s.get(AccountUpdatePolicy, account_id)
            return (_policy(row), "account") if row is not None else (DEFAULT_POLICY, "default")

    def gateway_policy(self, account_id: str, gateway_id: str) -> tuple[Policy, Source]:
        """The gateway's policy in effect and where it comes from (NotFoundError for a
        gateway of another account)."""
        with self._sessions() as s:
            _gateway(s, account_id, gateway_id)
            return _effective(s, account_id, gateway_id)

    def set_account(
        self,
        account_id: str,
        *,
        channel: str | None = None,
        window: Window | None = None,
        automatic: str | None = None,
    ) -> Policy:
        """Sets (the given fields of) the account's default."""
        with self._sessions.begin() as s:
            row = s.get(AccountUpdatePolicy, account_id)
            current = _policy(row) if row is not None else DEFAULT_POLICY
            policy = _changed(current, channel, window, automatic)
            if row is None:
                row = AccountUpdatePolicy(account_id=account_id)
                s.add(row)
            _store(row, policy)
        LOG.info("account update policy set", extra={"account": account_id, **policy.to_json()})
        return policy

    def set_gateway(
        self,
        account_id: str,
        gateway_id: str,
        *,
        channel: str | None = None,
        window: Window | None = None,
        automatic: str | None = None,
    ) -> Policy:
        """Sets (the given fields of) the gateway's own policy; the others keep what was in
        effect."""
        with self._sessions.begin() as s:
            _gateway(s, account_id, gateway_id)
            current, _source = _effective(s, account_id, gateway_id)
            policy = _changed(current, channel, window, automatic)
            row = s.get(UpdatePolicy, gateway_id)
            if row is None:
                row = UpdatePolicy(gateway_id=gateway_id)
                s.add(row)
            _store(row, policy)
        LOG.info("gateway update policy set", extra={"gateway": gateway_id, **policy.to_json()})
        return policy

    def clear_gateway(self, account_id: str, gateway_id: str) -> tuple[Policy, Source]:
        """Drops the gateway's own policy: its account's default applies again."""
        with self._sessions.begin() as s:
            _gateway(s, account_id, gateway_id)
            row = s.get(UpdatePolicy, gateway_id)
            if row is not None:
                s.delete(row)
        return self.gateway_policy(account_id, gateway_id)


def effective_policies(s: Session, gateways: list[Gateway]) -> dict[str, Policy]:
    """The policy in effect of each of ``gateways`` (by id), read in two queries."""
    ids = [g.id for g in gateways]
    accounts = {g.account_id for g in gateways}
    own = {
        r.gateway_id: _policy(r)
        for r in s.scalars(select(UpdatePolicy).where(UpdatePolicy.gateway_id.in_(ids)))
    }
    defaults = {
        r.account_id: _policy(r)
        for r in s.scalars(
            select(AccountUpdatePolicy).where(AccountUpdatePolicy.account_id.in_(accounts))
        )
    }
    return {g.id: own.get(g.id) or defaults.get(g.account_id) or DEFAULT_POLICY for g in gateways}


def _effective(s: Session, account_id: str, gateway_id: str) -> tuple[Policy, Source]:
    row = s.get(UpdatePolicy, gateway_id)
    if row is not None:
        return _policy(row), "gateway"
    default = s.get(AccountUpdatePolicy, account_id)
    if default is not None:
        return _policy(default), "account"
    return DEFAULT_POLICY, "default"


def _gateway(s: Session, account_id: str, gateway_id: str) -> Gateway:
    g = s.get(Gateway, gateway_id)
    if g is None or g.account_id != account_id:
        raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
    return g


def _changed(
    current: Policy, channel: str | None, window: Window | None, automatic: str | None
) -> Policy:
    policy = current
    if channel is not None:
        policy = replace(policy, channel=check_channel(channel))
    if window is not None:
        policy = replace(policy, window=window)
    if automatic is not None:
        policy = replace(policy, automatic=check_automatic(automatic))
    return policy
