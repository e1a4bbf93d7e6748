"""Per-account quotas: most volumes, most provisioned bytes, most requests per second
(docs/provider.md, "Quotas").

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Adds three nullable columns to accounts; NULL (every existing account) means unlimited
volumes and bytes and the default request rate, so nothing changes until the operator
sets a quota.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("quota_volumes", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("quota_bytes", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("quota_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch table copy of accounts would cascade to
    # the rows naming it.
    for column in ("quota_rate", "quota_bytes", "quota_volumes"):
        op.drop_column("accounts", column)
