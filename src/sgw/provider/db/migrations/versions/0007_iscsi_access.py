"""iSCSI access closed by default: initiators allowed without CHAP, the open flag, and
volumes kept open since before (docs/appliance.md, "Who may log in").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09

Adds a table and two columns. A volume on a gateway without CHAP credentials was exported
to any initiator until now: it is marked legacy open (its gateway keeps it open too, and
reports so), until the admin sets its access. Every other volume starts closed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "initiator_acls",
        sa.Column("volume_id", sa.String(36), nullable=False),
        sa.Column("initiator", sa.String(255), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_initiator_acls_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("volume_id", "initiator", name=op.f("pk_initiator_acls")),
    )
    op.add_column(
        "volumes",
        sa.Column("iscsi_open", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "volumes",
        sa.Column("iscsi_legacy_open", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.execute(
        sa.text(
            "UPDATE volumes SET iscsi_legacy_open = :yes WHERE gateway_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM chap_credentials c WHERE c.volume_id = volumes.id)"
        ).bindparams(yes=True)
    )


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+), not a batch copy: dropping the old volumes table
    # of a copy would cascade to every row that names a volume (CHAP credentials, maps).
    op.drop_column("volumes", "iscsi_legacy_open")
    op.drop_column("volumes", "iscsi_open")
    op.drop_table("initiator_acls")
