"""The provider's relational schema: accounts, gateways, volumes, chunk maps, snapshots.

A volume's chunk map (chunk index -> chunk id, the SHA-256 hex of the chunk's plaintext)
is stored in immutable *segments*, each holding the entries of ``SEGMENT_CHUNKS``
consecutive chunk indexes, plus one *pointer* row per non-empty segment saying which
segment row is current for that part of the volume. A commit writes new segment rows only
for the segments it touches and swaps their pointers, so updating a 1 TiB volume rewrites a
few kilobytes, not the whole map. A snapshot copies the pointers (at most one row per GiB
of volume at the default sizes), never chunk data and never segment contents, so it is
incremental by construction; a cached volume created from a snapshot copies them too.

Segment encoding (``MapSegment.data``): a format byte (``SEGMENT_FORMAT``) followed by
entries sorted by offset, each a 2-byte big-endian offset inside the segment and the
32-byte raw digest. A zero chunk has no entry and an empty segment has no row at all. Maps
are sparse for most of their lives (new volumes, thin hosts), where this costs 34 bytes
per written chunk instead of 32 KiB per touched segment for a dense array of digests; a
fully written segment costs 6% more than the dense form, which is the price of never
paying for holes. The format byte lets a later revision change the encoding per row.

Segment rows are shared by every pointer that names them (a volume and all snapshots
taken while that part did not change) and deleted as soon as the last pointer to them
goes, in the same transaction; foreign keys from both pointer tables forbid deleting one
that is still named. There is deliberately no ``chunks`` table with reference counts:
keeping counts exact would turn a snapshot into one row update per chunk instead of a
pointer copy. Garbage collection instead enumerates the referenced chunk ids from the
segment rows that some pointer names and sweeps objects that are not among them and are
older than a grace period, the grace covering chunks uploaded for a commit that has not
landed yet. (Writers delete the segment rows they orphan; the rare row two concurrent
PostgreSQL transactions leave behind is removed by ``ChunkMaps.sweep_segments``.)
``chunk_locations`` is not such a table either: it says where a packed chunk's bytes are
(one row per stored chunk, not per reference) and is collected the same way.

Identifiers of user-visible records are UUID strings (portable between SQLite and
PostgreSQL, safe to expose); timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

# Chunk indexes per map segment: 1 GiB of volume at the default 1 MiB chunk, at most
# 34 KiB per segment row, 1024 pointer rows for a full 1 TiB volume. Smaller segments
# make scattered commits cheaper and snapshots of big volumes dearer. Offsets fit 2 bytes.
SEGMENT_CHUNKS = 1024
# First byte of every segment row's data: the sparse (offset, digest) encoding above.
SEGMENT_FORMAT = 1
# Longest names (accounts, gateways, volumes) and idempotency keys, in characters.
NAME_MAX = 255
KEY_MAX = 255
# Longest key scope: ``<account id>.<32 hex digits>`` (69 characters), made by the provider
# for every new lineage (sgw.provider.blockstore.keys.new_scope); lineages started before
# migration 0010 keep the id of the volume or snapshot that started them (36).
KEY_SCOPE_MAX = 80
# A raw 32-byte Ed25519 public key, or a SHA-256 digest, in hex.
PUBLIC_KEY_HEX = 64
DIGEST_HEX = 64

# Constraint names are part of the schema that later migrations must name; a convention
# keeps them identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An integer primary key that autoincrements on both backends (SQLite only does so for
# INTEGER PRIMARY KEY).
# SQLite keeps the length the first schema declared (36) and does not enforce it; changing
# a column's declared type there means copying the table, which would cascade to every row
# that names a volume (migration 0010).
_KEY_SCOPE = String(KEY_SCOPE_MAX).with_variant(String(36), "sqlite")
_SERIAL = BigInteger().with_variant(Integer(), "sqlite")


class VolumeMode(enum.StrEnum):
    """Where a volume's primary copy lives (DESIGN.md section 1)."""

    CACHED = "cached"
    STORED = "stored"


class GatewayStatus(enum.StrEnum):
    """An activated gateway is ``active`` until an admin deactivates it (for good)."""

    ACTIVE = "active"
    DEACTIVATED = "deactivated"


class SnapshotStatus(enum.StrEnum):
    """A snapshot is ``pending`` while blocks are put into it, then immutable."""

    PENDING = "pending"
    COMPLETED = "completed"
    ERROR = "error"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Account(Base):
    """A customer of the provider; owns gateways, volumes and snapshots."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # The provider's operator account (made by ``sgw provider init``) may create accounts.
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Quotas the operator sets (``sgw accounts quota-set``; docs/provider.md, "Quotas"):
    # most volumes, most provisioned bytes (sum of volume sizes), most requests per second
    # per provider process. None: unlimited (volumes, bytes), the default rate (rate).
    quota_volumes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    quota_rate: Mapped[float | None] = mapped_column(Float, nullable=True)


class Gateway(Base):
    """An appliance belonging to an account, known by the Ed25519 public key it activated
    with; its requests are signed with that key (docs/adr/0003-gateway-authentication.md).
    """

    __tablename__ = "gateways"
    __table_args__ = (
        UniqueConstraint("account_id", "name"),
        Index("ix_gateways_public_key", "public_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # Raw Ed25519 public key as 64 lowercase hex digits; None for gateways made without
    # activation (development), which cannot sign requests.
    public_key: Mapped[str | None] = mapped_column(String(PUBLIC_KEY_HEX))
    status: Mapped[str] = mapped_column(
        String(16), default=GatewayStatus.ACTIVE.value, server_default=GatewayStatus.ACTIVE.value
    )
    timezone: Mapped[str | None] = mapped_column(String(64))
    activated: Mapped[datetime | None] = mapped_column(UtcDateTime())
    deactivated: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Last authenticated request (updated at most once a minute per gateway).
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Volume(Base):
    """A block volume and the version of its chunk map (bumped by every commit)."""

    __tablename__ = "volumes"
    __table_args__ = (
        UniqueConstraint("account_id", "name"),
        CheckConstraint("mode IN ('cached', 'stored')", name="mode"),
        CheckConstraint("size > 0", name="size"),
        CheckConstraint("chunk_size > 0", name="chunk_size"),
        CheckConstraint("map_version >= 0", name="map_version"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    gateway_id: Mapped[str | None] = mapped_column(
        ForeignKey("gateways.id", ondelete="SET NULL"), index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    map_version: Mapped[int] = mapped_column(BigInteger, default=0)
    # Which chunk key encrypts this volume's chunks, and the object-key prefix they live
    # under: the volume's own id, or that of the snapshot it was made from (see KeyRing).
    key_scope: Mapped[str] = mapped_column(_KEY_SCOPE)
    # The snapshot the volume was made from (kept after that snapshot is deleted); None
    # for an empty volume, and for every volume made before migration 0010.
    source_snapshot_id: Mapped[str | None] = mapped_column(String(36))
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # iSCSI access (sgw.common.iscsi; the initiators are in chap_credentials and
    # initiator_acls): the admin's open flag (any initiator, no authentication: labs), and
    # whether the volume is open since before access was closed by default (set by the
    # schema upgrade for volumes on a gateway without CHAP, then as the gateway reports;
    # cleared when the admin sets the volume's access).
    iscsi_open: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    iscsi_legacy_open: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class GcGeneration(Base):
    """How many garbage-collection passes have deleted chunks of a key scope. A provider
    that read the counter before putting a chunk and finds it unchanged at the commit
    (with the scope's maps locked) knows the chunk is still there without asking the
    store."""

    __tablename__ = "gc_generations"

    key_scope: Mapped[str] = mapped_column(_KEY_SCOPE, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class ChunkPack(Base):
    """One pack object (``packs/<key scope>/<id>``): the encoded chunks of one upload
    request and an index of them (``sgw.provider.blockstore.packs``).

    The row is made before the object is written and marked ``written`` together with
    the locations of its chunks once the object is durable, so an object without a row is
    always garbage, and deleting a row deletes its locations (the foreign key cascades).
    """

    __tablename__ = "chunk_packs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_scope: Mapped[str] = mapped_column(_KEY_SCOPE, index=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    written: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ChunkLocation(Base):
    """Where a packed chunk of a key scope is: its pack and byte range. A chunk of the
    scope with no location is a loose object (``chunks/<scope>/<id[:2]>/<id>``)."""

    __tablename__ = "chunk_locations"

    key_scope: Mapped[str] = mapped_column(_KEY_SCOPE, primary_key=True)
    chunk_id: Mapped[str] = mapped_column(String(DIGEST_HEX), primary_key=True)
    pack_id: Mapped[str] = mapped_column(
        ForeignKey("chunk_packs.id", ondelete="CASCADE"), index=True
    )
    offset: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(Integer)
    # When the chunk was last stored: garbage collection spares younger ones (the grace
    # period covers an upload whose commit has not come yet).
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class MapSegment(Base):
    """Immutable entries of SEGMENT_CHUNKS consecutive chunk indexes (encoding above)."""

    __tablename__ = "map_segments"

    id: Mapped[int] = mapped_column(_SERIAL, primary_key=True, autoincrement=True)
    # Number of entries in ``data``: statistics without decoding.
    chunk_count: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class VolumeSegment(Base):
    """The current segment of one part of a volume's map; absent means all zero."""

    __tablename__ = "volume_segments"
    __table_args__ = (CheckConstraint("segment_index >= 0", name="segment_index"),)

    volume_id: Mapped[str] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    segment_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("map_segments.id"), index=True)


class Snapshot(Base):
    """An immutable chunk map: of a volume at ``map_version``, or built block by block.

    ``volume_id`` is empty for snapshots started through the block API without a volume
    and after the volume is deleted (snapshots outlive their volumes).
    """

    __tablename__ = "snapshots"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'completed', 'error')", name="status"),
        CheckConstraint("volume_size > 0", name="volume_size"),
        CheckConstraint("chunk_size > 0", name="chunk_size"),
        Index(None, "account_id", "created"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    volume_id: Mapped[str | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="SET NULL"), index=True
    )
    parent_snapshot_id: Mapped[str | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(String(16))
    volume_size: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    # The volume's map version captured; None for a snapshot built through the block API.
    map_version: Mapped[int | None] = mapped_column(BigInteger)
    description: Mapped[str | None] = mapped_column(String(NAME_MAX))
    # The key scope of its chunks: its volume's, its parent's, or its own id.
    key_scope: Mapped[str] = mapped_column(_KEY_SCOPE)
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    completed: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The slot of its volume's snapshot schedule it was taken for (UTC); None for one
    # taken by hand or built through the block API. Only these count for ``retain``.
    scheduled_for: Mapped[datetime | None] = mapped_column(UtcDateTime())


class SnapshotSegment(Base):
    """A snapshot's segment pointers: a copy of its volume's at snapshot time."""

    __tablename__ = "snapshot_segments"
    __table_args__ = (CheckConstraint("segment_index >= 0", name="segment_index"),)

    snapshot_id: Mapped[str] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    segment_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("map_segments.id"), index=True)


class CommitRecord(Base):
    """The version a chunk-map commit produced, by idempotency key, so retries are no-ops.

    ``changes_digest`` (SHA-256 hex of the canonical change list) tells a retry from a
    different commit that reuses a key. Only the newest records per volume are kept.
    """

    __tablename__ = "commit_records"
    __table_args__ = (Index(None, "volume_id", "version"),)

    volume_id: Mapped[str] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    idempotency_key: Mapped[str] = mapped_column(String(KEY_MAX), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    changes_digest: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ApiToken(Base):
    """An admin API token of an account, stored as the SHA-256 of the token.

    Tokens are 256 random bits, so a plain digest cannot be reversed or guessed; a slow
    password hash would only slow every request.
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    token_hash: Mapped[str] = mapped_column(String(DIGEST_HEX), unique=True)
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(UtcDateTime())


class UsedActivationKey(Base):
    """An activation key that activated a gateway: each key works once.

    Kept until the key expires (a key is valid for 30 minutes); ``digest`` is the SHA-256
    of the key's signed part.
    """

    __tablename__ = "used_activation_keys"

    digest: Mapped[str] = mapped_column(String(DIGEST_HEX), primary_key=True)
    gateway_id: Mapped[str | None] = mapped_column(ForeignKey("gateways.id", ondelete="SET NULL"))
    expires: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class RequestNonce(Base):
    """A signed request's nonce, kept for twice the clock-skew window and a margin after
    its timestamp (sgw.provider.auth.nonces) so that a replay of the request is refused."""

    __tablename__ = "request_nonces"

    key_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class GatewaySnapshot(Base):
    """Which gateway started a snapshot, so that it (and only it, among gateways) may use
    the snapshot after its volume is gone or when it was built through the block API."""

    __tablename__ = "gateway_snapshots"

    snapshot_id: Mapped[str] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), index=True
    )


class SnapshotSchedule(Base):
    """When a volume is snapshotted automatically: every ``recurrence_hours`` hours from
    ``start_hour`` (in the gateway's time zone), keeping the newest ``retain`` scheduled
    snapshots (sgw.provider.control.schedules runs them)."""

    __tablename__ = "snapshot_schedules"
    __table_args__ = (
        CheckConstraint("start_hour >= 0 AND start_hour < 24", name="start_hour"),
        CheckConstraint("recurrence_hours IN (1, 2, 4, 8, 12, 24)", name="recurrence_hours"),
        CheckConstraint("retain IS NULL OR retain > 0", name="retain"),
    )

    volume_id: Mapped[str] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    start_hour: Mapped[int] = mapped_column(Integer)
    recurrence_hours: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(NAME_MAX))
    retain: Mapped[int | None] = mapped_column(Integer)
    updated: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ChapCredential(Base):
    """A volume's CHAP credentials for one initiator; the secrets are encrypted (AES-GCM
    under a key derived from the master key), since LIO needs them in the clear."""

    __tablename__ = "chap_credentials"

    volume_id: Mapped[str] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    initiator: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    # Mutual CHAP: the secret the target proves itself with; None for one-way CHAP.
    target_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    updated: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class InitiatorAcl(Base):
    """An initiator allowed on a volume without CHAP: an ACL alone, for hosts on a
    trusted network."""

    __tablename__ = "initiator_acls"

    volume_id: Mapped[str] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    initiator: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    updated: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ControlServer(Base):
    """A running control server (a ``sgw provider serve`` process): where its peers reach
    it, and its last heartbeat; one without a recent heartbeat is gone."""

    __tablename__ = "control_servers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(String(NAME_MAX))
    started: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    heartbeat: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class GatewayConnection(Base):
    """Which control server holds a gateway's long-poll (the registration table): fresh
    while that server's heartbeat is recent; the server removes it when the gateway's
    connection closes or it stops polling. ``heartbeat``: when it was last registered."""

    __tablename__ = "gateway_connections"

    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), primary_key=True
    )
    server_id: Mapped[str] = mapped_column(String(36), index=True)
    since: Mapped[datetime] = mapped_column(UtcDateTime())
    heartbeat: Mapped[datetime] = mapped_column(UtcDateTime())


class ControlMessage(Base):
    """A command for a gateway and its outcome (the control channel).

    ``status``: queued -> delivered (sent in a poll's answer, sent again if not
    acknowledged in time) -> acknowledged (the gateway holds it durably) -> succeeded or
    failed (its reply); queued or delivered ones past ``expires`` become expired. The
    gateway executes each ``idempotency_key`` once, however often it is delivered.
    """

    __tablename__ = "control_messages"
    __table_args__ = (
        UniqueConstraint("gateway_id", "idempotency_key"),
        CheckConstraint(
            "status IN ('queued', 'delivered', 'acknowledged', 'succeeded', 'failed', 'expired')",
            name="status",
        ),
        Index(None, "status", "gateway_id"),
        Index(None, "gateway_id", "created"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    gateway_id: Mapped[str] = mapped_column(ForeignKey("gateways.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    args: Mapped[str] = mapped_column(Text)  # JSON object
    idempotency_key: Mapped[str] = mapped_column(String(KEY_MAX))
    status: Mapped[str] = mapped_column(String(16))
    # The server that accepted the command: replies are forwarded there for its waiters.
    origin_server: Mapped[str | None] = mapped_column(String(36))
    created: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires: Mapped[datetime] = mapped_column(UtcDateTime())
    delivered: Mapped[datetime | None] = mapped_column(UtcDateTime())
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    acknowledged: Mapped[datetime | None] = mapped_column(UtcDateTime())
    completed: Mapped[datetime | None] = mapped_column(UtcDateTime())
    result: Mapped[str | None] = mapped_column(Text)  # JSON object
    error: Mapped[str | None] = mapped_column(Text)


class Release(Base):
    """A release of the appliance's software published at this provider: a TUF target
    (sgw.provider.releases) in one channel, with its manifest; revoked releases are
    removed from the signed targets and kept here for the record."""

    __tablename__ = "releases"
    __table_args__ = (
        CheckConstraint("channel IN ('canary', 'stable')", name="channel"),
        CheckConstraint("severity IN ('normal', 'emergency')", name="severity"),
        CheckConstraint("length > 0", name="length"),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16), default="normal", server_default="normal")
    # The TUF target path of the bundle, its length and SHA-256 (hex).
    target: Mapped[str] = mapped_column(String(KEY_MAX))
    length: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(DIGEST_HEX))
    manifest: Mapped[str] = mapped_column(Text)  # JSON object (sgw.common.releases)
    published: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked: Mapped[datetime | None] = mapped_column(UtcDateTime())


# What update reports and policies may say (sgw.provider.updates; docs/updates.md).
UPDATE_STATES = (
    "downloading",
    "verified",
    "installed",
    "waiting",
    "swapping",
    "done",
    "failed",
    "refused",
)
ROLLOUT_STATES = ("running", "halted", "completed", "superseded")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class _PolicyColumns:
    """An update policy (sgw.provider.updates.policy): the channel whose releases a gateway
    takes, its maintenance window (sgw.common.maintenance.Window, in the gateway's time
    zone) and whether it swaps to every release in it or to emergency ones only."""

    channel: Mapped[str] = mapped_column(String(16))
    window_kind: Mapped[str] = mapped_column(String(16))
    window_day: Mapped[int] = mapped_column(Integer)
    window_hour: Mapped[int] = mapped_column(Integer)
    window_minute: Mapped[int] = mapped_column(Integer)
    window_minutes: Mapped[int] = mapped_column(Integer)
    automatic: Mapped[str] = mapped_column(String(16))
    updated: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    @declared_attr.directive
    def __table_args__(cls) -> tuple[CheckConstraint, ...]:  # noqa: N805
        return (
            CheckConstraint("channel IN ('canary', 'stable')", name="channel"),
            CheckConstraint("automatic IN ('all', 'emergency')", name="automatic"),
            CheckConstraint("window_kind IN ('weekly', 'monthly')", name="window_kind"),
        )


class UpdatePolicy(_PolicyColumns, Base):
    """A gateway's own update policy (over its account's default)."""

    __tablename__ = "update_policies"

    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), primary_key=True
    )


class AccountUpdatePolicy(_PolicyColumns, Base):
    """The update policy of an account's gateways that have none of their own."""

    __tablename__ = "account_update_policies"

    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )


class Rollout(Base):
    """A release handed out to the fleet in phases (sgw.provider.updates.rollouts):
    1 the canary channel's gateways, 2 ``share`` percent of the rest, 3 everyone. A phase
    advances once its gateways are done and stayed healthy for ``soak_s``; the rollout
    halts by itself on ``max_failures`` failed swaps or on a gateway silent for
    ``heartbeat_timeout_s`` after its swap. Every provider process evaluates it; each
    step is a conditional update, so it happens once."""

    __tablename__ = "rollouts"
    __table_args__ = (
        CheckConstraint(_in("state", ROLLOUT_STATES), name="state"),
        CheckConstraint("phase >= 1 AND phase <= 3", name="phase"),
        CheckConstraint("share >= 0 AND share <= 100", name="share"),
        CheckConstraint("soak_s >= 0", name="soak_s"),
        CheckConstraint("max_failures >= 1", name="max_failures"),
        CheckConstraint("heartbeat_timeout_s > 0", name="heartbeat_timeout_s"),
        Index(None, "state"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version: Mapped[str] = mapped_column(ForeignKey("releases.version"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    phase: Mapped[int] = mapped_column(Integer)
    phase_started: Mapped[datetime] = mapped_column(UtcDateTime())
    share: Mapped[int] = mapped_column(Integer)
    soak_s: Mapped[float] = mapped_column(Float)
    max_failures: Mapped[int] = mapped_column(Integer)
    heartbeat_timeout_s: Mapped[float] = mapped_column(Float)
    halt_reason: Mapped[str | None] = mapped_column(Text)
    halted: Mapped[datetime | None] = mapped_column(UtcDateTime())
    started: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    completed: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class UpdateReport(Base):
    """One progress report of a gateway's update agent (``POST /v1/updates/reports``):
    the history. A report sent again (same gateway, version, state and time) is one row."""

    __tablename__ = "update_reports"
    __table_args__ = (
        CheckConstraint(_in("state", UPDATE_STATES), name="state"),
        UniqueConstraint("gateway_id", "version", "state", "at"),
        Index(None, "version", "state"),
    )

    id: Mapped[int] = mapped_column(_SERIAL, primary_key=True, autoincrement=True)
    gateway_id: Mapped[str] = mapped_column(ForeignKey("gateways.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    # The swap's pause (seconds), on a done report.
    pause_s: Mapped[float | None] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(UtcDateTime())  # the gateway's clock
    received: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class GatewayUpdate(Base):
    """A gateway's update state: its latest report (by the time the gateway gave it), the
    version it runs by that report, and the release an admin asked it to swap to at once
    (``sgw updates now``) until it reports that release done or failed."""

    __tablename__ = "gateway_updates"

    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), primary_key=True
    )
    running: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    pause_s: Mapped[float | None] = mapped_column(Float)
    at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    received: Mapped[datetime | None] = mapped_column(UtcDateTime())
    now_version: Mapped[str | None] = mapped_column(String(64))
    now_set: Mapped[datetime | None] = mapped_column(UtcDateTime())


class RetiredId(Base):
    """The id of a deleted volume or snapshot: never given to anything again (a caller
    may choose a volume's or a snapshot's id; one that named something else, now or before,
    is refused with the same answer as a taken one)."""

    __tablename__ = "retired_ids"
    __table_args__ = (CheckConstraint("kind IN ('volume', 'snapshot')", name="kind"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    retired: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class HealthGateway(Base):
    """A gateway's health at a glance (``sgw.provider.health``): the labels and metrics of
    its newest report, when it came, and the highest ``seq`` stored (what the gateway may
    forget). ``num`` is a small number that the sample rows name instead of the gateway's
    36-character id (the samples are most of the health store's bytes)."""

    __tablename__ = "health_gateways"

    num: Mapped[int] = mapped_column(_SERIAL, primary_key=True, autoincrement=True)
    gateway_id: Mapped[str] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), unique=True
    )
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_at: Mapped[datetime] = mapped_column(UtcDateTime())  # the gateway's clock
    received: Mapped[datetime] = mapped_column(UtcDateTime())  # the provider's
    version: Mapped[str] = mapped_column(String(100))
    kernel: Mapped[str] = mapped_column(String(100))
    hypervisor: Mapped[str] = mapped_column(String(100))
    site: Mapped[str] = mapped_column(String(100))
    latest: Mapped[bytes] = mapped_column(LargeBinary)  # sgw.provider.health.codec


class HealthSample(Base):
    """One report's metrics, as received, until the retention pass moves its hour into a
    raw block (``HealthBlock``). ``at``: the gateway's clock,
    in whole seconds since the epoch (an integer: compact, and hours are ``at / 3600`` on
    both databases)."""

    __tablename__ = "health_samples"
    __table_args__ = (Index(None, "at"),)

    gw: Mapped[int] = mapped_column(
        ForeignKey("health_gateways.num", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # sgw.provider.health.codec


class HealthBlock(Base):
    """A block of a gateway's health data (sgw.provider.health.store): ``tier`` 0, an hour
    of raw samples; 1, a day of hourly buckets; 2, 32 days of daily buckets, from ``start``
    (epoch seconds); ``data``: columnar and compressed (sgw.provider.health.codec)."""

    __tablename__ = "health_blocks"
    __table_args__ = (Index(None, "tier", "start"),)

    gw: Mapped[int] = mapped_column(
        ForeignKey("health_gateways.num", ondelete="CASCADE"), primary_key=True
    )
    tier: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class HealthEventRow(Base):
    """An event a gateway reported: the ``n``-th of report ``seq`` (so it is stored once)."""

    __tablename__ = "health_events"
    __table_args__ = (Index(None, "at"), Index(None, "gw", "at"))

    gw: Mapped[int] = mapped_column(
        ForeignKey("health_gateways.num", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    volume: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class PeriodicJob(Base):
    """When a job that every provider process runs is due next: a process runs it only
    when its conditional update of ``due`` takes (sgw.provider.db.periodic)."""

    __tablename__ = "periodic_jobs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    due: Mapped[datetime] = mapped_column(UtcDateTime())
    holder: Mapped[str | None] = mapped_column(String(64))
