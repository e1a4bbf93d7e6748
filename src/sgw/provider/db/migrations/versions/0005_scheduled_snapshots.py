"""Scheduled snapshots: the schedule slot a snapshot was taken for, so that a schedule's
retention counts (and deletes) its own snapshots and never those taken by hand.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Only adds a nullable column (existing snapshots count as taken by hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("snapshots", sa.Column("scheduled_for", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("scheduled_for")
