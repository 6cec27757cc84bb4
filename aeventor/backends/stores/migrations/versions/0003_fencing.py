"""Faults: fencing tokens and MACs of step runs, worker leases, text of any size on MySQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from aeventor.backends.stores.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (table, column, nullable) of the text columns MySQL must hold in LONGTEXT.
_LONG = (
    ("aeventor_program", "definition", False),
    ("aeventor_run", "reason", True),
    ("aeventor_step_run", "result", True),
    ("aeventor_step_run", "error", True),
)


def upgrade() -> None:
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.add_column(sa.Column("token", sa.String(32), nullable=True))
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))
    with op.batch_alter_table("aeventor_agent") as batch:
        batch.add_column(sa.Column("lease_until", UTCDateTime, nullable=True))
    if op.get_context().dialect.name in ("mysql", "mariadb"):
        for table, column, nullable in _LONG:
            op.alter_column(
                table,
                column,
                type_=mysql.LONGTEXT(),
                existing_type=sa.Text(),
                existing_nullable=nullable,
            )


def downgrade() -> None:
    if op.get_context().dialect.name in ("mysql", "mariadb"):
        for table, column, nullable in _LONG:
            op.alter_column(
                table,
                column,
                type_=sa.Text(),
                existing_type=mysql.LONGTEXT(),
                existing_nullable=nullable,
            )
    with op.batch_alter_table("aeventor_agent") as batch:
        batch.drop_column("lease_until")
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.drop_column("mac")
        batch.drop_column("token")
