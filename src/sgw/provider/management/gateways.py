"""Gateways: activation with a one-time key, their records, and what each one may touch.

Activation (DESIGN.md section 4) checks the key (``sgw.common.activation_key``), records
it as used and creates the gateway with the key's public key, in one transaction: a key
activates at most one gateway, once, and a public key belongs to at most one gateway.
The gateway then fetches its credentials by a request signed with that key.

What a gateway may touch: its account's volumes that are bound to it, and snapshots of
those volumes or that it started itself. Everything else is "not found" to it.

Signing keys are cached (``signing_key``): a signed request does not read the gateway's
row. A deactivation drops the entry at once in the process that made it; every process
also looks for gateways deactivated by others once per ``DEACTIVATED_POLL_S``
(``forget_deactivated``), and trusts an entry only while it or the last such look is
younger than ``KEY_TRUST_S``: a deactivated gateway is refused by every provider process
within about 2 s, at most 10 s (docs/adr/0003-gateway-authentication.md, amendment).

Which gateway a volume is bound to is cached too (``owns_volume_known``): a gateway's
chunk uploads, one request per chunk, each name the volume. A volume's gateway never
changes while the volume exists (only deleting the gateway clears it, and a deleted
gateway's requests are refused as above); an entry is trusted for ``OWNER_TRUST_S``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import zoneinfo
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sgw.common import activation_key, signing
from sgw.common.errors import (
    ActivationKeyError,
    AlreadyActivatedError,
    BadRequestError,
    ForbiddenError,
    NameTakenError,
    NotFoundError,
)
from sgw.provider.db.models import (
    NAME_MAX,
    Gateway,
    GatewaySnapshot,
    GatewayStatus,
    Snapshot,
    UsedActivationKey,
    Volume,
    utcnow,
)
from sgw.provider.db.schema import bound_engine, write_lock

LOG = logging.getLogger(__name__)

# A gateway's last-seen time is written at most this often (seconds).
LAST_SEEN_EVERY_S = 60.0
# Last-seen times of many gateways are written together, at most this often (seconds):
# 10,000 gateways would otherwise cost 170 synced writes a second, one per gateway.
LAST_SEEN_FLUSH_S = 1.0
# Deactivations made by other provider processes are looked for this often (seconds).
DEACTIVATED_POLL_S = 2.0
# A cached key is used while it, or the last look for deactivations that began after it
# was read, is younger than this (seconds): the longest a deactivated gateway is still
# served by another process, also when those looks fail (then keys are read anew).
KEY_TRUST_S = 10.0
# How far back each look reaches (seconds): covers clocks of provider machines that
# disagree (by up to the signing window) and looks that failed.
DEACTIVATED_LOOKBACK_S = 600.0
# Most cached keys (an entry is about 0.5 KiB).
KEY_CACHE_MAX = 200_000
# How long a volume's gateway, once read, is trusted without the database (seconds), and
# the most such entries kept.
OWNER_TRUST_S = 5.0
OWNER_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """What a signed request of a gateway is checked against."""

    gateway_id: str
    account_id: str
    status: str
    verifier: signing.Verifier
    fetched: float  # time.monotonic() when read


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    id: str
    account_id: str
    name: str
    status: str
    public_key: str | None
    timezone: str | None
    created: datetime
    activated: datetime | None
    deactivated: datetime | None
    last_seen: datetime | None
    volumes: int = 0


def check_gateway_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        raise BadRequestError(
            f"gateway name {name[:80]!r}: give 1 to {NAME_MAX} printable characters"
        )
    return name


def check_timezone(tz: str | None) -> str | None:
    if tz is None:
        return None
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadRequestError(
            f"time zone {tz[:80]!r} is unknown: give an IANA name such as Europe/Berlin or UTC"
        ) from None
    return tz


class Gateways:
    """The gateway repository."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._seen: dict[str, float] = {}
        self._unsaved: dict[str, datetime] = {}
        self._last_flush = -LAST_SEEN_FLUSH_S
        self._lock = threading.Lock()
        self._keys: dict[str, GatewayKey] = {}
        self._deactivated_seen: datetime | None = None  # wall clock of the last look
        self._swept = -KEY_TRUST_S  # monotonic start of the last successful look
        self._deactivated: frozenset[str] = frozenset()  # what that look found
        self._owners: dict[str, tuple[str, float]] = {}  # volume id: (gateway id, read at)

    def activate(
        self,
        account_id: str,
        key_text: str,
        name: str,
        timezone: str | None = None,
        *,
        code: str | None = None,
        unconfirmed: bool = False,
    ) -> GatewayInfo:
        """Activates the gateway that minted ``key_text`` into the account, if ``code`` is
        the confirmation code the key commits to (shown on the gateway's console only). A
        key of a gateway from before codes has none: it needs ``unconfirmed``."""
        name = check_gateway_name(name)
        timezone = check_timezone(timezone)
        now = datetime.now(UTC)
        key = activation_key.check(key_text, now.timestamp())
        if key.commitment is None:
            if not unconfirmed:
                raise ActivationKeyError(
                    "this key comes from a gateway release without confirmation codes, so "
                    "nothing proves it was taken from the appliance's console and not by "
                    "someone on its network: update the appliance, or activate with "
                    "--unconfirmed after checking the key came from it"
                )
            LOG.warning(
                "activation without a confirmation code (a gateway from before codes)",
                extra={"account": account_id},
            )
        elif code is None:
            raise ForbiddenError(
                "give the gateway's confirmation code (--code): it is shown on the "
                "appliance's console (or `sgw gateway activation-code` on it)"
            )
        elif not key.confirms(code):
            LOG.warning(
                "activation refused: wrong confirmation code", extra={"account": account_id}
            )
            raise ForbiddenError(
                "the confirmation code does not match this key's gateway: read it again on "
                "the appliance's console (`sgw gateway activation-code`) and get a new key "
                "from that appliance"
            )
        gateway = Gateway(
            id=str(uuid.uuid4()),
            account_id=account_id,
            name=name,
            created=now,
            public_key=key.public_key.hex(),
            status=GatewayStatus.ACTIVE.value,
            timezone=timezone,
            activated=now,
        )
        try:
            with self._sessions.begin() as s:
                s.execute(delete(UsedActivationKey).where(UsedActivationKey.expires < now))
                if s.get(UsedActivationKey, key.digest) is not None:
                    raise ActivationKeyError(
                        "this activation key was used already; each key activates once: get "
                        "a new one from the gateway"
                    )
                if s.scalar(select(Gateway.id).where(Gateway.public_key == gateway.public_key)):
                    raise AlreadyActivatedError(
                        "the gateway behind this key is activated already; to activate it "
                        "again, deactivate it and reset its identity (delete identity.key in "
                        "its data directory)"
                    )
                taken = select(Gateway.id).where(
                    Gateway.account_id == account_id, Gateway.name == name
                )
                if s.scalar(taken) is not None:
                    raise NameTakenError(f"a gateway named {name!r} exists; pick another name")
                s.add(gateway)
                s.flush()
                expires = datetime.fromtimestamp(key.expires, UTC)
                s.add(UsedActivationKey(digest=key.digest, gateway_id=gateway.id, expires=expires))
        except IntegrityError as e:
            # A concurrent activation of the same key or gateway won the race.
            raise ActivationKeyError(
                "this activation key or gateway was activated at the same moment by another "
                "request; list the gateways to see it"
            ) from e
        LOG.info(
            "gateway activated",
            extra={"gateway": gateway.id, "account": account_id, "region": key.region},
        )
        return _info(gateway)

    def by_public_key(self, public_key: bytes) -> GatewayInfo | None:
        with self._sessions() as s:
            g = s.scalar(select(Gateway).where(Gateway.public_key == public_key.hex()))
            return None if g is None else _info(g)

    def by_id(self, gateway_id: str) -> GatewayInfo | None:
        with self._sessions() as s:
            g = s.get(Gateway, gateway_id)
            return None if g is None else _info(g)

    def get(self, account_id: str, gateway_id: str) -> GatewayInfo:
        with self._sessions() as s:
            g = s.get(Gateway, gateway_id)
            if g is None or g.account_id != account_id:
                raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
            count = s.scalar(select(func.count()).where(Volume.gateway_id == gateway_id))
            return _info(g, int(count or 0))

    def list_gateways(self, account_id: str) -> list[GatewayInfo]:
        with self._sessions() as s:
            counts = {
                gateway_id: count
                for gateway_id, count in s.execute(
                    select(Volume.gateway_id, func.count())
                    .where(Volume.account_id == account_id, Volume.gateway_id.is_not(None))
                    .group_by(Volume.gateway_id)
                )
            }
            rows = s.scalars(
                select(Gateway).where(Gateway.account_id == account_id).order_by(Gateway.created)
            )
            return [_info(g, int(counts.get(g.id, 0))) for g in rows]

    def update(
        self,
        account_id: str,
        gateway_id: str,
        *,
        name: str | None = None,
        timezone: str | None = None,
    ) -> GatewayInfo:
        """Renames the gateway and/or sets its time zone."""
        values: dict[str, str] = {}
        if name is not None:
            values["name"] = check_gateway_name(name)
        if timezone is not None:
            values["timezone"] = check_timezone(timezone) or ""
        try:
            with self._sessions.begin() as s:
                g = s.get(Gateway, gateway_id)
                if g is None or g.account_id != account_id:
                    raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
                if "name" in values:
                    taken = select(Gateway.id).where(
                        Gateway.account_id == account_id,
                        Gateway.name == values["name"],
                        Gateway.id != gateway_id,
                    )
                    if s.scalar(taken) is not None:
                        raise NameTakenError(
                            f"a gateway named {values['name']!r} exists; pick another name"
                        )
                for field, value in values.items():
                    setattr(g, field, value)
        except IntegrityError as e:
            raise NameTakenError(f"a gateway named {name!r} exists; pick another name") from e
        LOG.info("gateway updated", extra={"gateway": gateway_id, "fields": sorted(values)})
        return self.get(account_id, gateway_id)

    def deactivate(self, account_id: str, gateway_id: str) -> GatewayInfo:
        """Revokes the gateway's credentials for good: its requests are refused from now."""
        with self._sessions.begin() as s:
            g = s.get(Gateway, gateway_id)
            if g is None or g.account_id != account_id:
                raise NotFoundError(f"gateway {gateway_id} not found in account {account_id}")
            if g.status != GatewayStatus.DEACTIVATED.value:
                g.status = GatewayStatus.DEACTIVATED.value
                g.deactivated = utcnow()
        self._keys.pop(gateway_id, None)
        LOG.warning("gateway deactivated", extra={"gateway": gateway_id, "account": account_id})
        return self.get(account_id, gateway_id)

    # Signing keys (cached)

    def signing_key(self, gateway_id: str) -> GatewayKey | None:
        """The gateway's cached key while trusted (see the module doc); no database."""
        key = self._keys.get(gateway_id)
        if key is None or time.monotonic() - max(key.fetched, self._swept) >= KEY_TRUST_S:
            return None
        return key

    def load_signing_keys(self, gateway_ids: Iterable[str]) -> dict[str, GatewayKey]:
        """Reads the keys of these gateways (those that exist and have one) and caches
        them (blocking)."""
        ids = list(dict.fromkeys(gateway_ids))
        out: dict[str, GatewayKey] = {}
        fetched = time.monotonic()  # before the read: the entry is no newer than this
        with self._sessions() as s:
            for i in range(0, len(ids), 500):
                rows = s.execute(
                    select(
                        Gateway.id, Gateway.account_id, Gateway.status, Gateway.public_key
                    ).where(Gateway.id.in_(ids[i : i + 500]))
                )
                for gid, account_id, status, public_key in rows:
                    if public_key is None:
                        continue
                    try:
                        verifier = signing.Verifier(bytes.fromhex(public_key))
                    except ValueError:
                        continue
                    out[gid] = GatewayKey(gid, account_id, status, verifier, fetched)
        if len(self._keys) + len(out) > KEY_CACHE_MAX:
            self._keys.clear()
        self._keys.update(out)
        # A look for deactivations that ran while this read: its finding wins (it stores
        # before it drops, and this drops after it stored: either order drops the entry).
        for gid in self._deactivated.intersection(out):
            self._keys.pop(gid, None)
        return out

    def forget_deactivated(self) -> list[str]:
        """Drops the cached keys of gateways deactivated lately, by any process
        (blocking; called every ``DEACTIVATED_POLL_S``). Returns the ids dropped."""
        started = time.monotonic()
        now = utcnow()
        since = (self._deactivated_seen or now) - timedelta(seconds=DEACTIVATED_LOOKBACK_S)
        with self._sessions() as s:
            found = frozenset(s.scalars(select(Gateway.id).where(Gateway.deactivated >= since)))
        self._deactivated = found
        dropped = []
        for gid in found:
            key = self._keys.get(gid)
            if key is not None and key.status == GatewayStatus.ACTIVE.value:
                self._keys.pop(gid, None)
                dropped.append(gid)
        self._deactivated_seen = now
        self._swept = started
        return dropped

    def touch(self, gateway_id: str, *, flush: bool = True) -> bool:
        """Records that the gateway was just seen (at most once a minute); the times are
        written for many gateways together, at most once a second: here, unless
        ``flush`` is False (the event loop's callers), when the return value says that
        ``flush_seen`` is due."""
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(gateway_id, -LAST_SEEN_EVERY_S) >= LAST_SEEN_EVERY_S:
                self._seen[gateway_id] = now
                self._unsaved[gateway_id] = utcnow()
            due = bool(self._unsaved) and now - self._last_flush >= LAST_SEEN_FLUSH_S
        if due and flush:
            self.flush_seen()
        return due

    def flush_seen(self, force: bool = False) -> None:
        """Writes the last-seen times not written yet (blocking), at most once a second
        unless ``force``."""
        now = time.monotonic()
        with self._lock:
            if not self._unsaved or (not force and now - self._last_flush < LAST_SEEN_FLUSH_S):
                return  # written with the next flush
            self._last_flush = now
            batch, self._unsaved = self._unsaved, {}
        table = Gateway.__table__
        # Queued with the process's other frequent writers (SQLite: not in its busy
        # handler's sleeps, which held up the control channel's writes).
        with self._write_lock(), self._sessions.begin() as s:
            s.execute(
                table.update()  # type: ignore[attr-defined]
                .where(table.c.id == bindparam("gid"))
                .values(last_seen=bindparam("seen")),
                [{"gid": g, "seen": t} for g, t in batch.items()],
            )

    def _write_lock(self) -> AbstractContextManager[object]:
        bind = bound_engine(self._sessions)
        if bind is None:
            return contextlib.nullcontext()
        return write_lock(bind.url.render_as_string(hide_password=False))

    # What a gateway may touch

    def owns_volume(self, gateway_id: str, volume_id: str) -> bool:
        """True if the volume is bound to the gateway (blocking: reads the database)."""
        fetched = time.monotonic()  # before the read: the entry is no newer than this
        with self._sessions() as s:
            owner = s.scalar(select(Volume.gateway_id).where(Volume.id == volume_id))
        if owner is not None:
            if len(self._owners) >= OWNER_CACHE_MAX:
                self._owners.clear()
            self._owners[volume_id] = (owner, fetched)
        return owner == gateway_id

    def owns_volume_known(self, gateway_id: str, volume_id: str) -> bool:
        """True if ``owns_volume`` found the volume bound to the gateway less than
        ``OWNER_TRUST_S`` ago (no database); False means "ask ``owns_volume``"."""
        entry = self._owners.get(volume_id)
        return (
            entry is not None
            and entry[0] == gateway_id
            and time.monotonic() - entry[1] < OWNER_TRUST_S
        )

    def owns_snapshot(self, gateway_id: str, snapshot_id: str) -> bool:
        with self._sessions() as s:
            if s.get(GatewaySnapshot, snapshot_id) is not None:
                owner = s.scalar(
                    select(GatewaySnapshot.gateway_id).where(
                        GatewaySnapshot.snapshot_id == snapshot_id
                    )
                )
                return owner == gateway_id
            volume_owner = s.scalar(
                select(Volume.gateway_id)
                .join(Snapshot, Snapshot.volume_id == Volume.id)
                .where(Snapshot.id == snapshot_id)
            )
            return volume_owner == gateway_id

    def claim_snapshot(self, gateway_id: str, snapshot_id: str) -> None:
        """Records that the gateway started the snapshot (idempotent)."""
        try:
            with self._sessions.begin() as s:
                if s.get(GatewaySnapshot, snapshot_id) is None:
                    s.add(GatewaySnapshot(snapshot_id=snapshot_id, gateway_id=gateway_id))
        except IntegrityError:
            pass  # a concurrent retry recorded it


def _info(g: Gateway, volumes: int = 0) -> GatewayInfo:
    return GatewayInfo(
        id=g.id,
        account_id=g.account_id,
        name=g.name,
        status=g.status,
        public_key=g.public_key,
        timezone=g.timezone,
        created=g.created,
        activated=g.activated,
        deactivated=g.deactivated,
        last_seen=g.last_seen,
        volumes=volumes,
    )
