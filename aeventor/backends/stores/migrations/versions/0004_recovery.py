"""Recovery, retries and delays: who drives a run, where its logs are, how its current
generation replays; when a retried step run may be claimed; delayed associations.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aeventor.backends.stores.schema import UTCDateTime

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeventor_run") as batch:
        batch.add_column(sa.Column("controller", sa.String(200), nullable=True))
        batch.add_column(sa.Column("log_dir", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("replay", sa.String(16), nullable=True))
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.add_column(sa.Column("not_before", UTCDateTime, nullable=True))
    op.create_table(
        "aeventor_delay",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("sequence", sa.String(200), nullable=False),
        sa.Column("recovery", sa.Integer, nullable=False),
        sa.Column("event", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("due", UTCDateTime, nullable=False),
        sa.Column("done", UTCDateTime, nullable=True),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["aeventor_run.id"], name="fk_aeventor_delay_run_id_aeventor_run"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_aeventor_delay"),
        sa.UniqueConstraint(
            "run_id",
            "sequence",
            "recovery",
            "event",
            "kind",
            "target",
            name="uq_aeventor_delay_run_id_sequence_recovery_event_kind_target",
        ),
    )
    op.create_index("ix_aeventor_delay_done_due", "aeventor_delay", ["done", "due"])
    op.create_index("ix_aeventor_delay_run_id_done", "aeventor_delay", ["run_id", "done"])


def downgrade() -> None:
    op.drop_table("aeventor_delay")
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.drop_column("not_before")
    with op.batch_alter_table("aeventor_run") as batch:
        batch.drop_column("replay")
        batch.drop_column("log_dir")
        batch.drop_column("controller")
