"""Distributed mode: run modes and queues, signatures, agents, lease indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aeventor.backends.stores.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeventor_program") as batch:
        batch.add_column(sa.Column("signature", sa.String(64), nullable=True))
    with op.batch_alter_table("aeventor_run") as batch:
        batch.add_column(
            sa.Column("mode", sa.String(16), nullable=False, server_default="standalone")
        )
        batch.add_column(sa.Column("submitted_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("signature", sa.String(64), nullable=True))
    op.drop_index("ix_aeventor_step_run_ready", table_name="aeventor_step_run")
    op.drop_index("ix_aeventor_step_run_status_host", table_name="aeventor_step_run")
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.add_column(sa.Column("queue", sa.String(200), nullable=True))
    op.create_index(
        "ix_aeventor_step_run_queue_ready",
        "aeventor_step_run",
        ["queue", "id"],
        postgresql_where=sa.text("status = 'ready'"),
        sqlite_where=sa.text("status = 'ready'"),
    )
    op.create_index(
        "ix_aeventor_step_run_status_lease_until",
        "aeventor_step_run",
        ["status", "lease_until"],
    )
    op.create_index("ix_aeventor_step_run_worker_status", "aeventor_step_run", ["worker", "status"])
    op.create_table(
        "aeventor_agent",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("hostname", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("hosts", sa.Text, nullable=False),
        sa.Column("started", UTCDateTime, nullable=False),
        sa.Column("heartbeat", UTCDateTime, nullable=False),
        sa.Column("stopped", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_agent"),
    )


def downgrade() -> None:
    op.drop_table("aeventor_agent")
    op.drop_index("ix_aeventor_step_run_worker_status", table_name="aeventor_step_run")
    op.drop_index("ix_aeventor_step_run_status_lease_until", table_name="aeventor_step_run")
    op.drop_index("ix_aeventor_step_run_queue_ready", table_name="aeventor_step_run")
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.drop_column("queue")
    op.create_index("ix_aeventor_step_run_status_host", "aeventor_step_run", ["status", "host"])
    op.create_index(
        "ix_aeventor_step_run_ready",
        "aeventor_step_run",
        ["host", "id"],
        postgresql_where=sa.text("status = 'ready'"),
        sqlite_where=sa.text("status = 'ready'"),
    )
    with op.batch_alter_table("aeventor_run") as batch:
        batch.drop_column("signature")
        batch.drop_column("submitted_by")
        batch.drop_column("mode")
    with op.batch_alter_table("aeventor_program") as batch:
        batch.drop_column("signature")
