"""MySQL / MariaDB through aiomysql.

No LISTEN/NOTIFY here: other processes' work is found by polling (``poll_interval``, a
quarter second by default; an indexed query that returns nothing costs little), and this
process's own changes wake its dispatchers directly. Transactions run at READ COMMITTED so a
poll always sees rows committed since the last one; claims use ``FOR UPDATE SKIP LOCKED``
(MariaDB 10.6+, MySQL 8.0+).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ...exceptions import SchemaVersionError
from .base import Database
from .migrations import upgrade_to_head
from .schema import UTCDateTime

__all__ = ("MySQLDatabase", "backend_class")

MIGRATION_LOCK = "aeventor_migrate"
MIGRATION_LOCK_TIMEOUT = 120
# Client error codes of a lost connection: server gone away, lost during query, can't connect.
_DISCONNECT_CODES = {2003, 2006, 2013, 2055}


class MySQLDatabase(Database):
    """A MySQL or MariaDB database, polled for other processes' work."""

    default_poll_interval = 0.25
    # INSERT ... ON DUPLICATE KEY UPDATE cannot say which rows it inserted: claim after.
    claims_on_insert = False

    def _create_engine(self) -> AsyncEngine:
        return create_async_engine(
            self.url,
            isolation_level="READ COMMITTED",
            pool_size=10,
            max_overflow=20,
            pool_recycle=3600,
            pool_pre_ping=True,
        )

    async def _ensure_schema(self) -> None:
        await upgrade_to_head(self.engine, lock=_named_lock)

    def _insert_ignore(self, table: sa.Table) -> Any:
        # Not INSERT IGNORE: that also turns truncation and other errors into warnings.
        # "id = id" leaves the existing row as it is.
        return mysql_insert(table).on_duplicate_key_update({"id": table.c.id})

    def server_now(self) -> sa.ColumnElement[datetime]:
        # Naive UTC, as every DATETIME column holds.
        return sa.type_coerce(sa.literal_column("UTC_TIMESTAMP(6)"), UTCDateTime)

    def server_now_plus(self, delta: timedelta) -> sa.ColumnElement[datetime]:
        micros = delta // timedelta(microseconds=1)
        added = sa.func.timestampadd(
            sa.literal_column("MICROSECOND"), micros, sa.literal_column("UTC_TIMESTAMP(6)")
        )
        return sa.type_coerce(added, UTCDateTime)

    def _is_disconnect(self, exc: DBAPIError) -> bool:
        args: tuple[Any, ...] = getattr(exc.orig, "args", ())
        return len(args) > 0 and args[0] in _DISCONNECT_CODES


@contextmanager
def _named_lock(connection: Connection) -> Iterator[None]:
    # MySQL commits DDL implicitly, so a transaction cannot serialise upgraders: a named
    # lock held by this session does.
    got = connection.execute(
        sa.select(sa.func.get_lock(MIGRATION_LOCK, MIGRATION_LOCK_TIMEOUT))
    ).scalar()
    if got != 1:
        raise SchemaVersionError(
            f"could not take the schema upgrade lock {MIGRATION_LOCK!r} within "
            f"{MIGRATION_LOCK_TIMEOUT}s; another process may be stuck upgrading the schema"
        )
    try:
        yield
    finally:
        connection.execute(sa.select(sa.func.release_lock(MIGRATION_LOCK)))


backend_class = MySQLDatabase
