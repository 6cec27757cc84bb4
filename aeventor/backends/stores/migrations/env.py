"""Alembic environment: migrations always run on a connection aeventor hands in."""

from __future__ import annotations

from typing import cast

from alembic import context
from alembic.runtime.environment import EnvironmentContext

from aeventor.backends.stores.migrations import run_migrations

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "aeventor's migrations run through aeventor (`aeventor db upgrade --store ...`), "
        "not the alembic command line"
    )
# alembic.context is a module proxying the current EnvironmentContext's methods.
run_migrations(cast(EnvironmentContext, context), connection)
