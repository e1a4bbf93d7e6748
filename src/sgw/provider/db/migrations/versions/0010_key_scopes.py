"""Key scopes made by the provider: ``<account id>.<random>`` for every new lineage, so
that no caller-chosen id can land a volume in another tenant's scope; ids of deleted
volumes and snapshots are retired (docs/block-api.md, "Key scopes").

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Volumes record the snapshot they were made from (the key scope no longer tells).
Existing scopes (a volume's or snapshot's id) stay as they are: their chunks keep their
keys and object names. The scope columns grow to 80 characters (PostgreSQL; SQLite does
not enforce lengths, and a table copy of volumes would cascade to the rows naming it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SCOPED = ("volumes", "snapshots", "gc_generations", "chunk_packs", "chunk_locations")


def upgrade() -> None:
    op.create_table(
        "retired_ids",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("retired", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('volume', 'snapshot')", name=op.f("ck_retired_ids_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retired_ids")),
    )
    op.add_column("volumes", sa.Column("source_snapshot_id", sa.String(36), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        for table in _SCOPED:
            op.alter_column(table, "key_scope", type_=sa.String(80), existing_type=sa.String(36))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A scope longer than 36 characters does not fit back: PostgreSQL refuses the
        # downgrade rather than truncate it.
        for table in _SCOPED:
            op.alter_column(table, "key_scope", type_=sa.String(36), existing_type=sa.String(80))
    op.drop_column("volumes", "source_snapshot_id")
    op.drop_table("retired_ids")
