"""Baseline: the schema of NanoIoT's schema version 1 (tenants, customers, users, devices, credentials, RPCs).

Frozen: what ``metadata.create_all`` of version 1 made, constraint names included. Never edit it; add a revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(sa.schema.CreateSequence(sa.Sequence("rpc_seq_counter")))
    op.create_table(
        "tenant",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenant"),
    )
    op.create_table(
        "customer",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_customer"),
        sa.UniqueConstraint("tenant_id", "title", name="uq_customer_tenant_id_title"),
    )
    op.create_table(
        "tb_user",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("customer_id", sa.Uuid, nullable=False),
        sa.Column("email", sa.String(255), nullable=False),
        sa.Column("authority", sa.String(32), nullable=False),
        sa.Column("first_name", sa.String(255)),
        sa.Column("last_name", sa.String(255)),
        sa.Column("password_hash", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tb_user"),
    )
    op.create_index("uq_tb_user_lower_email", "tb_user", [sa.text("lower(email)")], unique=True)
    op.create_table(
        "device",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("customer_id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("label", sa.String(255)),
        sa.Column("additional_info", sa.Text),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_device"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_device_tenant_id_name"),
    )
    op.create_index("ix_device_tenant_id_created_time", "device", ["tenant_id", "created_time"])
    op.create_index("ix_device_customer_id", "device", ["customer_id"])
    op.create_table(
        "device_credentials",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("device_id", sa.Uuid, nullable=False),
        sa.Column("credentials_type", sa.String(32), nullable=False),
        sa.Column("credentials_id", sa.String(255), nullable=False),
        sa.Column("credentials_value", sa.Text),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_device_credentials"),
        sa.UniqueConstraint("device_id", name="uq_device_credentials_device_id"),
        sa.UniqueConstraint("credentials_id", name="uq_device_credentials_credentials_id"),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], ondelete="CASCADE",
                                name="fk_device_credentials_device_id_device"),
    )
    op.create_table(
        "rpc",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_time", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("device_id", sa.Uuid, nullable=False),
        sa.Column("expiration_time", sa.BigInteger, nullable=False),
        sa.Column("oneway", sa.Boolean, nullable=False),
        sa.Column("method", sa.String(255), nullable=False),
        sa.Column("params", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response", sa.Text),
        sa.Column("additional_info", sa.Text),
        sa.Column("retries", sa.Integer),
        sa.Column("user_id", sa.Uuid),
        sa.PrimaryKeyConstraint("id", name="pk_rpc"),
    )
    op.create_index("ix_rpc_device_id_status_seq", "rpc", ["device_id", "status", "seq"])
    op.create_index("ix_rpc_tenant_id_status", "rpc", ["tenant_id", "status"])
    op.create_index("ix_rpc_status_expiration_time", "rpc", ["status", "expiration_time"])
    op.create_index("ix_rpc_status_created_time", "rpc", ["status", "created_time"])
    # The version table of the releases before Alembic (see revision 0005).
    schema_version = op.create_table(
        "schema_version",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schema_version"),
    )
    op.bulk_insert(schema_version, [{"id": 1, "version": 1}])


def downgrade() -> None:
    for table in ("schema_version", "rpc", "device_credentials", "device", "tb_user", "customer", "tenant"):
        op.drop_table(table)
    if op.get_context().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("rpc_seq_counter")))
