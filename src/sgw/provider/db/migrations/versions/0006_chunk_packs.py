"""Chunk packs: objects holding several chunks, and where each packed chunk is
(docs/adr/0005-chunk-packs.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Only adds tables (chunks stored before stay loose objects, read as before).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "chunk_packs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("key_scope", sa.String(36), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("written", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chunk_packs")),
    )
    op.create_index(op.f("ix_chunk_packs_key_scope"), "chunk_packs", ["key_scope"])
    op.create_table(
        "chunk_locations",
        sa.Column("key_scope", sa.String(36), nullable=False),
        sa.Column("chunk_id", sa.String(64), nullable=False),
        sa.Column("pack_id", sa.String(32), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["pack_id"],
            ["chunk_packs.id"],
            name=op.f("fk_chunk_locations_pack_id_chunk_packs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_scope", "chunk_id", name=op.f("pk_chunk_locations")),
    )
    op.create_index(op.f("ix_chunk_locations_pack_id"), "chunk_locations", ["pack_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_chunk_locations_pack_id"), table_name="chunk_locations")
    op.drop_table("chunk_locations")
    op.drop_index(op.f("ix_chunk_packs_key_scope"), table_name="chunk_packs")
    op.drop_table("chunk_packs")
