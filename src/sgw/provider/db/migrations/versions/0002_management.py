"""Management plane: operator accounts, API tokens, gateway identities and activation,
request nonces, snapshot ownership by gateway, snapshot schedules, CHAP credentials.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Only adds: new tables, and new columns with server defaults on ``accounts`` and
``gateways`` (``ALTER TABLE ADD COLUMN`` on both backends, no table rebuild).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("operator", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("gateways", sa.Column("public_key", sa.String(64), nullable=True))
    op.add_column(
        "gateways",
        sa.Column("status", sa.String(16), server_default="active", nullable=False),
    )
    op.add_column("gateways", sa.Column("timezone", sa.String(64), nullable=True))
    op.add_column("gateways", sa.Column("activated", sa.DateTime(timezone=True), nullable=True))
    op.add_column("gateways", sa.Column("deactivated", sa.DateTime(timezone=True), nullable=True))
    op.add_column("gateways", sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_gateways_public_key", "gateways", ["public_key"], unique=True)

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_api_tokens_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_account_id"), "api_tokens", ["account_id"])

    op.create_table(
        "used_activation_keys",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("gateway_id", sa.String(36), nullable=True),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_used_activation_keys_gateway_id_gateways"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_used_activation_keys")),
    )
    op.create_index(op.f("ix_used_activation_keys_expires"), "used_activation_keys", ["expires"])

    op.create_table(
        "request_nonces",
        sa.Column("key_id", sa.String(80), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "nonce", name=op.f("pk_request_nonces")),
    )
    op.create_index(op.f("ix_request_nonces_expires"), "request_nonces", ["expires"])

    op.create_table(
        "gateway_snapshots",
        sa.Column("snapshot_id", sa.String(36), nullable=False),
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_gateway_snapshots_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_gateway_snapshots_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", name=op.f("pk_gateway_snapshots")),
    )
    op.create_index(op.f("ix_gateway_snapshots_gateway_id"), "gateway_snapshots", ["gateway_id"])

    op.create_table(
        "snapshot_schedules",
        sa.Column("volume_id", sa.String(36), nullable=False),
        sa.Column("start_hour", sa.Integer(), nullable=False),
        sa.Column("recurrence_hours", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(255), nullable=True),
        sa.Column("retain", sa.Integer(), nullable=True),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "start_hour >= 0 AND start_hour < 24",
            name=op.f("ck_snapshot_schedules_start_hour"),
        ),
        sa.CheckConstraint(
            "recurrence_hours IN (1, 2, 4, 8, 12, 24)",
            name=op.f("ck_snapshot_schedules_recurrence_hours"),
        ),
        sa.CheckConstraint(
            "retain IS NULL OR retain > 0", name=op.f("ck_snapshot_schedules_retain")
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_snapshot_schedules_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("volume_id", name=op.f("pk_snapshot_schedules")),
    )

    op.create_table(
        "chap_credentials",
        sa.Column("volume_id", sa.String(36), nullable=False),
        sa.Column("initiator", sa.String(255), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("target_secret", sa.LargeBinary(), nullable=True),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_chap_credentials_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("volume_id", "initiator", name=op.f("pk_chap_credentials")),
    )


def downgrade() -> None:
    for table in (
        "chap_credentials",
        "snapshot_schedules",
        "gateway_snapshots",
        "request_nonces",
        "used_activation_keys",
        "api_tokens",
    ):
        op.drop_table(table)
    op.drop_index("ix_gateways_public_key", table_name="gateways")
    with op.batch_alter_table("gateways") as batch:
        for column in ("last_seen", "deactivated", "activated", "timezone", "status", "public_key"):
            batch.drop_column(column)
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("operator")
