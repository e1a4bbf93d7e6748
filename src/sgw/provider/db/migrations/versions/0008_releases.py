"""Releases of the appliance's software published at the provider (signed with TUF:
docs/updates.md).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Only adds a table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("severity", sa.String(16), server_default="normal", nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("published", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("channel IN ('canary', 'stable')", name=op.f("ck_releases_channel")),
        sa.CheckConstraint(
            "severity IN ('normal', 'emergency')", name=op.f("ck_releases_severity")
        ),
        sa.CheckConstraint("length > 0", name=op.f("ck_releases_length")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_releases")),
    )


def downgrade() -> None:
    op.drop_table("releases")
