"""``tb_user.enabled``: a disabled user's tokens stop working. The first revision made with Alembic.

It also sets the old ``schema_version`` table to 5 for good: NanoIoT releases before Alembic read it and refuse
to start on a database newer than they understand, rather than writing to it. Later revisions leave it alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tb_user", sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()))
    op.execute("UPDATE schema_version SET version = 5")


def downgrade() -> None:
    op.drop_column("tb_user", "enabled")
    op.execute("UPDATE schema_version SET version = 4")
