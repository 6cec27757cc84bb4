"""Initial schema: programs, runs, triggers, step runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aeventor.backends.stores.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "aeventor_program",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("definition", sa.Text, nullable=False),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_program"),
        sa.UniqueConstraint("name", "version", name="uq_aeventor_program_name_version"),
    )
    op.create_table(
        "aeventor_run",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("program_id", _BigId, nullable=False),
        sa.Column("program_name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stopped", sa.Boolean, nullable=False),
        sa.Column("recovery", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.Column("ended", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_run"),
        sa.ForeignKeyConstraint(
            ["program_id"],
            ["aeventor_program.id"],
            name="fk_aeventor_run_program_id_aeventor_program",
        ),
    )
    op.create_index(
        "ix_aeventor_run_program_name_created", "aeventor_run", ["program_name", "created"]
    )
    op.create_index("ix_aeventor_run_status", "aeventor_run", ["status"])
    op.create_table(
        "aeventor_trigger",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("event", sa.String(200), nullable=False),
        sa.Column("sequence", sa.String(200), nullable=False),
        sa.Column("recovery", sa.Integer, nullable=False),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_trigger"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["aeventor_run.id"], name="fk_aeventor_trigger_run_id_aeventor_run"
        ),
        sa.UniqueConstraint(
            "run_id",
            "sequence",
            "recovery",
            "event",
            name="uq_aeventor_trigger_run_id_sequence_recovery_event",
        ),
    )
    op.create_table(
        "aeventor_step_run",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("sequence", sa.String(200), nullable=False),
        sa.Column("recovery", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("lease_until", UTCDateTime, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.Column("started", UTCDateTime, nullable=True),
        sa.Column("ended", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_step_run"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["aeventor_run.id"], name="fk_aeventor_step_run_run_id_aeventor_run"
        ),
        sa.UniqueConstraint(
            "run_id",
            "step",
            "sequence",
            "recovery",
            "attempt",
            name="uq_aeventor_step_run_run_id_step_sequence_recovery_attempt",
        ),
    )
    op.create_index("ix_aeventor_step_run_run_id_status", "aeventor_step_run", ["run_id", "status"])
    op.create_index(
        "ix_aeventor_step_run_ready",
        "aeventor_step_run",
        ["host", "id"],
        postgresql_where=sa.text("status = 'ready'"),
        sqlite_where=sa.text("status = 'ready'"),
    )
    op.create_index("ix_aeventor_step_run_status_host", "aeventor_step_run", ["status", "host"])


def downgrade() -> None:
    op.drop_table("aeventor_step_run")
    op.drop_table("aeventor_trigger")
    op.drop_table("aeventor_run")
    op.drop_table("aeventor_program")
