"""Recovery and retries: who drives a run, where its logs are, how its current generation
replays; when a retried step run may be claimed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aeventor.backends.stores.schema import UTCDateTime

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


def downgrade() -> None:
    with op.batch_alter_table("aeventor_step_run") as batch:
        batch.drop_column("not_before")
    with op.batch_alter_table("aeventor_run") as batch:
        batch.drop_column("replay")
        batch.drop_column("log_dir")
        batch.drop_column("controller")
