"""Schema version 2: ``rpc.attempts``, so that a resumed command keeps the resends it had used."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rpc", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE schema_version SET version = 2")


def downgrade() -> None:
    op.drop_column("rpc", "attempts")
    op.execute("UPDATE schema_version SET version = 1")
