"""Alembic environment: migrations always run on a connection aeventor hands in."""

from __future__ import annotations

from alembic import context

from aeventor.backends.stores.migrations import VERSION_TABLE
from aeventor.backends.stores.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "aeventor's migrations run through aeventor (`aeventor db upgrade --store ...`), "
        "not the alembic command line"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
