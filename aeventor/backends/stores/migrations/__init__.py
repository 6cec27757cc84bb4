"""Schema management with Alembic: numbered migrations shipped in the package.

:func:`upgrade_to_head` runs on first use of a store (and from ``aeventor db upgrade``): a new
database gets the whole schema, an older one is upgraded, a newer one (created by a later
aeventor) is refused.

Stores that open at the same moment must not race, in one process or across processes:

- Alembic runs a migration through module-level proxies (``alembic.context``,
  ``alembic.op``) that point at one migration at a time: two migrations interleaved on one
  event loop (or in two threads) run each other's operations on the wrong connection and
  fail (``KeyError: 'config'``). :func:`upgrade_to_head` therefore migrates only while it
  holds the process's :data:`ALEMBIC_LOCK`, awaited without blocking the loop.
- Across processes each backend passes a lock that is taken *before* the migration's
  transaction begins and released only *after* it has committed (a Postgres session
  advisory lock, a MySQL named lock; sqlite's ``BEGIN IMMEDIATE`` is its write lock), so
  the check of the current revision and the upgrade are one step: the next process reads
  the committed version. MySQL commits every DDL statement at once, which a transaction
  cannot hide: releasing its lock before the final commit would let another process read
  the version of the previous revision and apply the last migration a second time.
- The unlocked fast path (the schema is already at head) is safe everywhere: a revision
  is recorded only after its migration's statements (in the same transaction on Postgres
  and sqlite), so a reader that sees the head revision sees the whole schema, and a reader
  of a half-made schema sees an older revision (or none) and takes the lock.

aeventor keeps its own version table, ``aeventor_alembic_version``, so it can share a
database with an application that uses Alembic itself.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ....exceptions import SchemaVersionError
from ..schema import VERSION_TABLE, metadata

__all__ = (
    "ALEMBIC_LOCK",
    "VERSION_TABLE",
    "current_revision",
    "head_revision",
    "load_scripts",
    "migrate",
    "run_migrations",
    "upgrade_to_head",
)

_HERE = Path(__file__).parent

#: Held by the migration that owns Alembic's module-level proxies; process-wide, whatever
#: the thread or event loop (a ``threading.Lock``, awaited through :func:`_alembic_proxies`).
ALEMBIC_LOCK = threading.Lock()


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


def check_known(current: str | None, script: ScriptDirectory) -> None:
    """Refuse a revision these migrations do not know (a newer aeventor made it)."""
    if current is not None:
        try:
            script.get_revision(current)
        except Exception as exc:  # alembic raises several types for an unknown revision
            raise SchemaVersionError(
                f"the database schema is at revision {current!r}, which this aeventor "
                f"(head {script.get_current_head()!r}) does not know: it was created by a "
                "newer aeventor. Upgrade aeventor on this host, or use another database"
            ) from exc


def _upgrade(connection: Connection, script: ScriptDirectory) -> None:
    current = current_revision(connection)
    check_known(current, script)
    if current != script.get_current_head():
        migrate(connection, script)


@asynccontextmanager
async def _alembic_proxies() -> AsyncIterator[None]:
    """Hold :data:`ALEMBIC_LOCK` without blocking the event loop.

    Taken at once when it is free; else a worker thread waits for it. A caller cancelled
    meanwhile leaves that thread to release the lock as soon as it gets it.
    """
    if not ALEMBIC_LOCK.acquire(blocking=False):
        acquiring = asyncio.ensure_future(asyncio.to_thread(ALEMBIC_LOCK.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            acquiring.add_done_callback(_release_when_acquired)
            raise
    try:
        yield
    finally:
        ALEMBIC_LOCK.release()


def _release_when_acquired(acquiring: asyncio.Future[bool]) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None and acquiring.result():
        ALEMBIC_LOCK.release()


async def upgrade_to_head(
    engine: AsyncEngine,
    *,
    lock: Callable[[Connection], AbstractContextManager[Any]] | None = None,
) -> None:
    """Bring the schema to this aeventor's head revision (a no-op when it is there).

    Args:
        lock: a context manager that serialises upgraders across processes, entered on
            the migration's connection before its transaction begins and left after that
            transaction has ended (committed or rolled back). None: the transaction's
            own begin locks the database (sqlite's ``BEGIN IMMEDIATE``).

    Raises:
        SchemaVersionError: the database was created by a newer aeventor.
    """

    script = await load_scripts()
    async with engine.connect() as conn:
        current = await conn.run_sync(current_revision)
    check_known(current, script)
    if current == script.get_current_head():
        return

    def run(connection: Connection) -> None:
        with lock(connection) if lock is not None else nullcontext(), connection.begin():
            _upgrade(connection, script)

    async with _alembic_proxies(), engine.connect() as conn:
        await conn.run_sync(run)
