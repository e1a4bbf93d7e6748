"""GC generations: a counter per key scope, bumped by every garbage-collection pass that
deletes chunks of the scope, so that a commit can trust a chunk put since the counter was
read without asking the object store again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

Only adds a table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gc_generations",
        sa.Column("key_scope", sa.String(36), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_scope", name=op.f("pk_gc_generations")),
    )


def downgrade() -> None:
    op.drop_table("gc_generations")
