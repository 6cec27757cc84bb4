"""Schema management with Alembic: numbered migrations shipped in the package.

:func:`upgrade_to_head` runs on first use of a store (and from ``aeventor db upgrade``): a new
database gets the whole schema, an older one is upgraded, a newer one (created by a later
aeventor) is refused. Each backend serialises concurrent upgrades (a Postgres advisory lock,
a MySQL named lock, sqlite's write lock), so processes that start together do not race.

aeventor keeps its own version table, ``aeventor_alembic_version``, so it can share a
database with an application that uses Alembic itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ....exceptions import SchemaVersionError
from ..schema import metadata

__all__ = (
    "VERSION_TABLE",
    "current_revision",
    "head_revision",
    "load_scripts",
    "migrate",
    "run_migrations",
    "upgrade_to_head",
)

VERSION_TABLE = "aeventor_alembic_version"
_HERE = Path(__file__).parent


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    # Reading and importing the migration files is file I/O: done once per process, and
    # off the event loop (load_scripts), so opening a store never reads them in the loop.
    script = ScriptDirectory.from_config(_config())
    script.get_current_head()  # loads the revision map
    return script


async def load_scripts() -> ScriptDirectory:
    """The shipped migrations, read once per process in a worker thread."""
    return await asyncio.to_thread(_scripts)


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def run_migrations(context: EnvironmentContext, connection: Connection) -> None:
    """Migrate on aeventor's connection and version table (what ``env.py`` does)."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def migrate(connection: Connection, script: ScriptDirectory, revision: str = "head") -> None:
    """Upgrade to ``revision`` with already loaded scripts (no file is read).

    This is alembic's ``command.upgrade`` without its re-reading of the scripts and env.py.
    """

    def upgrade(rev: Any, _context: Any) -> Any:
        return script._upgrade_revs(revision, rev)

    with EnvironmentContext(
        _config(connection), script, fn=upgrade, destination_rev=revision
    ) as context:
        run_migrations(context, connection)


def _upgrade(connection: Connection, script: ScriptDirectory) -> None:
    current = current_revision(connection)
    if current is not None:
        try:
            script.get_revision(current)
        except Exception as exc:  # alembic raises several types for an unknown revision
            raise SchemaVersionError(
                f"the database schema is at revision {current!r}, which this aeventor "
                f"(head {script.get_current_head()!r}) does not know: it was created by a "
                "newer aeventor. Upgrade aeventor on this host, or use another database"
            ) from exc
        if current == script.get_current_head():
            return
    migrate(connection, script)


async def upgrade_to_head(
    engine: AsyncEngine,
    *,
    lock: Callable[[Connection], AbstractContextManager[Any]] | None = None,
) -> None:
    """Bring the schema to this aeventor's head revision (a no-op when it is there).

    Args:
        lock: a context manager entered around the upgrade, on the migration's
            connection, to serialise concurrent upgraders.

    Raises:
        SchemaVersionError: the database was created by a newer aeventor.
    """

    script = await load_scripts()

    def run(connection: Connection) -> None:
        with lock(connection) if lock is not None else nullcontext():
            _upgrade(connection, script)

    async with engine.begin() as conn:
        await conn.run_sync(run)
