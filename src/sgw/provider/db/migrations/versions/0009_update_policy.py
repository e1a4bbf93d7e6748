"""Update policies (per gateway, account defaults), rollouts, the update agents' reports
and each gateway's update state (docs/updates.md, "Maintenance windows and policy" and
"Rollouts").

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Only adds tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = (
    "('downloading', 'verified', 'installed', 'waiting', 'swapping', 'done', 'failed', 'refused')"
)


def _policy_columns(table: str) -> list[Any]:
    return [
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("window_kind", sa.String(16), nullable=False),
        sa.Column("window_day", sa.Integer(), nullable=False),
        sa.Column("window_hour", sa.Integer(), nullable=False),
        sa.Column("window_minute", sa.Integer(), nullable=False),
        sa.Column("window_minutes", sa.Integer(), nullable=False),
        sa.Column("automatic", sa.String(16), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("channel IN ('canary', 'stable')", name=op.f(f"ck_{table}_channel")),
        sa.CheckConstraint("automatic IN ('all', 'emergency')", name=op.f(f"ck_{table}_automatic")),
        sa.CheckConstraint(
            "window_kind IN ('weekly', 'monthly')", name=op.f(f"ck_{table}_window_kind")
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "update_policies",
        sa.Column("gateway_id", sa.String(36), nullable=False),
        *_policy_columns("update_policies"),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_update_policies_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gateway_id", name=op.f("pk_update_policies")),
    )
    op.create_table(
        "account_update_policies",
        sa.Column("account_id", sa.String(36), nullable=False),
        *_policy_columns("account_update_policies"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_account_update_policies_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_update_policies")),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("phase_started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("share", sa.Integer(), nullable=False),
        sa.Column("soak_s", sa.Float(), nullable=False),
        sa.Column("max_failures", sa.Integer(), nullable=False),
        sa.Column("heartbeat_timeout_s", sa.Float(), nullable=False),
        sa.Column("halt_reason", sa.Text(), nullable=True),
        sa.Column("halted", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('running', 'halted', 'completed', 'superseded')",
            name=op.f("ck_rollouts_state"),
        ),
        sa.CheckConstraint("phase >= 1 AND phase <= 3", name=op.f("ck_rollouts_phase")),
        sa.CheckConstraint("share >= 0 AND share <= 100", name=op.f("ck_rollouts_share")),
        sa.CheckConstraint("soak_s >= 0", name=op.f("ck_rollouts_soak_s")),
        sa.CheckConstraint("max_failures >= 1", name=op.f("ck_rollouts_max_failures")),
        sa.CheckConstraint("heartbeat_timeout_s > 0", name=op.f("ck_rollouts_heartbeat_timeout_s")),
        sa.ForeignKeyConstraint(
            ["version"], ["releases.version"], name=op.f("fk_rollouts_version_releases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_state"), "rollouts", ["state"])
    op.create_index(op.f("ix_rollouts_version"), "rollouts", ["version"])
    op.create_table(
        "update_reports",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("from_version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("pause_s", sa.Float(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(f"state IN {_STATES}", name=op.f("ck_update_reports_state")),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_update_reports_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_reports")),
        sa.UniqueConstraint(
            "gateway_id",
            "version",
            "state",
            "at",
            name=op.f("uq_update_reports_gateway_id_version_state_at"),
        ),
    )
    op.create_index(op.f("ix_update_reports_version_state"), "update_reports", ["version", "state"])
    op.create_table(
        "gateway_updates",
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.Column("running", sa.String(64), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("pause_s", sa.Float(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received", sa.DateTime(timezone=True), nullable=True),
        sa.Column("now_version", sa.String(64), nullable=True),
        sa.Column("now_set", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_gateway_updates_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gateway_id", name=op.f("pk_gateway_updates")),
    )


def downgrade() -> None:
    op.drop_table("gateway_updates")
    op.drop_index(op.f("ix_update_reports_version_state"), table_name="update_reports")
    op.drop_table("update_reports")
    op.drop_index(op.f("ix_rollouts_version"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_state"), table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_table("account_update_policies")
    op.drop_table("update_policies")
