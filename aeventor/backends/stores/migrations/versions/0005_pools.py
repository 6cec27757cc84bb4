"""Pools and concurrency limits: a row per pool (locked to count its slots), and the slots
step runs wait for or hold.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aeventor.backends.stores.schema import UTCDateTime

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aeventor_pool",
        sa.Column("name", sa.String(300), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_aeventor_pool"),
    )
    op.create_index("ix_aeventor_pool_run_id", "aeventor_pool", ["run_id"])
    op.create_table(
        "aeventor_slot",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("pool", sa.String(300), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("step_run_id", _BIG_ID, nullable=True),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("held", sa.Boolean, nullable=False),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["aeventor_run.id"], name="fk_aeventor_slot_run_id_aeventor_run"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_slot"),
    )
    op.create_index("ix_aeventor_slot_pool_held", "aeventor_slot", ["pool", "held"])
    op.create_index("ix_aeventor_slot_step_run_id", "aeventor_slot", ["step_run_id"])
    op.create_index("ix_aeventor_slot_run_id", "aeventor_slot", ["run_id"])


def downgrade() -> None:
    op.drop_table("aeventor_slot")
    op.drop_table("aeventor_pool")
