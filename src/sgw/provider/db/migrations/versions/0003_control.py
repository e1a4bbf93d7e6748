"""Control channel: control servers, the registration table (which server holds which
gateway's long-poll), and the messages for gateways with their outcomes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Only adds tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "control_servers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("url", sa.String(255), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_control_servers")),
    )
    op.create_index(op.f("ix_control_servers_heartbeat"), "control_servers", ["heartbeat"])

    op.create_table(
        "gateway_connections",
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.Column("server_id", sa.String(36), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_gateway_connections_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gateway_id", name=op.f("pk_gateway_connections")),
    )
    op.create_index(op.f("ix_gateway_connections_server_id"), "gateway_connections", ["server_id"])

    op.create_table(
        "control_messages",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("origin_server", sa.String(36), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("acknowledged", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'delivered', 'acknowledged', 'succeeded', 'failed', 'expired')",
            name=op.f("ck_control_messages_status"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_control_messages_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_control_messages_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_control_messages")),
        sa.UniqueConstraint(
            "gateway_id",
            "idempotency_key",
            name=op.f("uq_control_messages_gateway_id_idempotency_key"),
        ),
    )
    op.create_index(
        op.f("ix_control_messages_status_gateway_id"),
        "control_messages",
        ["status", "gateway_id"],
    )
    op.create_index(
        op.f("ix_control_messages_gateway_id_created"),
        "control_messages",
        ["gateway_id", "created"],
    )


def downgrade() -> None:
    for table in ("control_messages", "gateway_connections", "control_servers"):
        op.drop_table(table)
