"""Schema version 4: who sent each command (``rpc.initiator``) and its bulk batch; rule chains and relations."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rpc", sa.Column("initiator", sa.Text))
    op.add_column("rpc", sa.Column("batch_id", sa.Uuid))
    op.create_index("ix_rpc_batch_id", "rpc", ["batch_id"])
    op.create_table(
        "rule_chain",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("type", sa.String(32), nullable=False, server_default="CORE"),
        sa.Column("root", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("debug_mode", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("configuration", sa.Text),
        sa.Column("additional_info", sa.Text),
        sa.Column("metadata", sa.Text),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("id", name="pk_rule_chain"),
    )
    op.create_index("ix_rule_chain_tenant_id_root", "rule_chain", ["tenant_id", "root"])
    op.create_table(
        "entity_relation",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("from_id", sa.Uuid, nullable=False),
        sa.Column("from_type", sa.String(32), nullable=False),
        sa.Column("to_id", sa.Uuid, nullable=False),
        sa.Column("to_type", sa.String(32), nullable=False),
        sa.Column("relation_type_group", sa.String(32), nullable=False),
        sa.Column("relation_type", sa.String(255), nullable=False),
        sa.Column("additional_info", sa.Text),
        sa.PrimaryKeyConstraint("from_id", "from_type", "to_id", "to_type", "relation_type_group", "relation_type",
                                name="pk_entity_relation"),
    )
    op.create_index("ix_entity_relation_to_id_to_type", "entity_relation", ["to_id", "to_type"])
    op.create_table(
        "rpc_batch",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("request", sa.Text),
        sa.Column("initiator", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_rpc_batch"),
    )
    op.execute("UPDATE schema_version SET version = 4")


def downgrade() -> None:
    for table in ("rpc_batch", "entity_relation", "rule_chain"):
        op.drop_table(table)
    op.drop_index("ix_rpc_batch_id", "rpc")
    op.drop_column("rpc", "batch_id")
    op.drop_column("rpc", "initiator")
    op.execute("UPDATE schema_version SET version = 3")
