"""Initial schema: accounts, gateways, volumes, chunk-map segments, snapshots, commits.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Written out in full rather than derived from the models: a migration is a frozen record
of one schema step, and the models will move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _serial() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
    )
    op.create_table(
        "map_segments",
        sa.Column("id", _serial(), autoincrement=True, nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_map_segments")),
    )
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_gateways_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gateways")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_gateways_account_id_name")),
    )
    op.create_index(op.f("ix_gateways_account_id"), "gateways", ["account_id"])
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("gateway_id", sa.String(36), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("map_version", sa.BigInteger(), nullable=False),
        sa.Column("key_scope", sa.String(36), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("mode IN ('cached', 'stored')", name=op.f("ck_volumes_mode")),
        sa.CheckConstraint("chunk_size > 0", name=op.f("ck_volumes_chunk_size")),
        sa.CheckConstraint("map_version >= 0", name=op.f("ck_volumes_map_version")),
        sa.CheckConstraint("size > 0", name=op.f("ck_volumes_size")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_volumes_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_volumes_gateway_id_gateways"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_volumes_account_id_name")),
    )
    op.create_index(op.f("ix_volumes_gateway_id"), "volumes", ["gateway_id"])
    op.create_table(
        "commit_records",
        sa.Column("volume_id", sa.String(36), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("changes_digest", sa.String(64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_commit_records_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("volume_id", "idempotency_key", name=op.f("pk_commit_records")),
    )
    op.create_index(
        op.f("ix_commit_records_volume_id_version"), "commit_records", ["volume_id", "version"]
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("volume_id", sa.String(36), nullable=True),
        sa.Column("parent_snapshot_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("volume_size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("map_version", sa.BigInteger(), nullable=True),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("key_scope", sa.String(36), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'completed', 'error')", name=op.f("ck_snapshots_status")
        ),
        sa.CheckConstraint("chunk_size > 0", name=op.f("ck_snapshots_chunk_size")),
        sa.CheckConstraint("volume_size > 0", name=op.f("ck_snapshots_volume_size")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_snapshots_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["parent_snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_snapshots_parent_snapshot_id_snapshots"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_snapshots_volume_id_volumes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index(op.f("ix_snapshots_account_id_created"), "snapshots", ["account_id", "created"])
    op.create_index(op.f("ix_snapshots_volume_id"), "snapshots", ["volume_id"])
    for owner, owner_table in (("volume", "volumes"), ("snapshot", "snapshots")):
        table = f"{owner}_segments"
        op.create_table(
            table,
            sa.Column(f"{owner}_id", sa.String(36), nullable=False),
            sa.Column("segment_index", sa.Integer(), nullable=False),
            sa.Column("segment_id", _serial(), nullable=False),
            sa.CheckConstraint("segment_index >= 0", name=op.f(f"ck_{table}_segment_index")),
            sa.ForeignKeyConstraint(
                ["segment_id"],
                ["map_segments.id"],
                name=op.f(f"fk_{table}_segment_id_map_segments"),
            ),
            sa.ForeignKeyConstraint(
                [f"{owner}_id"],
                [f"{owner_table}.id"],
                name=op.f(f"fk_{table}_{owner}_id_{owner_table}"),
                ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint(f"{owner}_id", "segment_index", name=op.f(f"pk_{table}")),
        )
        op.create_index(op.f(f"ix_{table}_segment_id"), table, ["segment_id"])


def downgrade() -> None:
    for table in (
        "snapshot_segments",
        "volume_segments",
        "snapshots",
        "commit_records",
        "volumes",
        "gateways",
        "map_segments",
        "accounts",
    ):
        op.drop_table(table)
