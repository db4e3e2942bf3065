"""Schema version 3: the cluster's tables (nodes, device owners with their fencing epoch, settings, messages)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_node",
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("address", sa.String(255)),
        sa.Column("started_time", sa.BigInteger),
        sa.Column("heartbeat_time", sa.BigInteger),
        sa.Column("connected_devices", sa.Integer),
        sa.PrimaryKeyConstraint("node_id", name="pk_cluster_node"),
    )
    op.create_table(
        "device_owner",
        sa.Column("device_id", sa.Uuid, nullable=False),
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("claimed_time", sa.BigInteger),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_owner"),
    )
    op.create_index("ix_device_owner_node_id", "device_owner", ["node_id"])
    op.create_table(
        "cluster_setting",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_cluster_setting"),
    )
    # INTEGER on SQLite so that the id is the rowid and numbers itself; BIGSERIAL on PostgreSQL.
    op.create_table(
        "cluster_message",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cluster_message"),
    )
    op.execute("UPDATE schema_version SET version = 3")


def downgrade() -> None:
    for table in ("cluster_message", "cluster_setting", "device_owner", "cluster_node"):
        op.drop_table(table)
    op.execute("UPDATE schema_version SET version = 2")
