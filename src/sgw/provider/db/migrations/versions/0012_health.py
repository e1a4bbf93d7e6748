"""The health store: each gateway's newest report and labels, recent raw samples, blocks
of samples and of hourly and daily aggregates, events, and the periodic jobs' schedule
(docs/health.md, "At the provider").

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08

Only adds tables. Samples and blocks are plain rowid tables on SQLite, not ``WITHOUT
ROWID``: their rows (0.3 to 10 KB) are larger than such a table keeps in its b-tree pages
(about 1 KB at 4 KiB pages), and each would spill into an overflow page of its own
(measured: 4.7 KB stored per 1.3 KB row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _gw(table: str) -> list[Any]:
    return [
        sa.Column("gw", _SERIAL, nullable=False),
        sa.ForeignKeyConstraint(
            ["gw"],
            ["health_gateways.num"],
            name=op.f(f"fk_{table}_gw_health_gateways"),
            ondelete="CASCADE",
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "health_gateways",
        sa.Column("num", _SERIAL, autoincrement=True, nullable=False),
        sa.Column("gateway_id", sa.String(36), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("kernel", sa.String(100), nullable=False),
        sa.Column("hypervisor", sa.String(100), nullable=False),
        sa.Column("site", sa.String(100), nullable=False),
        sa.Column("latest", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name=op.f("fk_health_gateways_gateway_id_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("num", name=op.f("pk_health_gateways")),
        sa.UniqueConstraint("gateway_id", name=op.f("uq_health_gateways_gateway_id")),
    )
    op.create_table(
        "health_samples",
        *_gw("health_samples"),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("gw", "seq", name=op.f("pk_health_samples")),
    )
    op.create_index(op.f("ix_health_samples_at"), "health_samples", ["at"])
    op.create_table(
        "health_blocks",
        *_gw("health_blocks"),
        sa.Column("tier", sa.SmallInteger(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("gw", "tier", "start", name=op.f("pk_health_blocks")),
    )
    op.create_index(op.f("ix_health_blocks_tier_start"), "health_blocks", ["tier", "start"])
    op.create_table(
        "health_events",
        *_gw("health_events"),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("volume", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("gw", "seq", "n", name=op.f("pk_health_events")),
    )
    op.create_index(op.f("ix_health_events_at"), "health_events", ["at"])
    op.create_index(op.f("ix_health_events_gw_at"), "health_events", ["gw", "at"])
    op.create_table(
        "periodic_jobs",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("due", sa.DateTime(timezone=True), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_periodic_jobs")),
    )


def downgrade() -> None:
    op.drop_table("periodic_jobs")
    op.drop_index(op.f("ix_health_events_gw_at"), table_name="health_events")
    op.drop_index(op.f("ix_health_events_at"), table_name="health_events")
    op.drop_table("health_events")
    op.drop_index(op.f("ix_health_blocks_tier_start"), table_name="health_blocks")
    op.drop_table("health_blocks")
    op.drop_index(op.f("ix_health_samples_at"), table_name="health_samples")
    op.drop_table("health_samples")
    op.drop_table("health_gateways")
