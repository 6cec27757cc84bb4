"""sqlite through aiosqlite: the embedded store of standalone mode.

One connection per store, shared by every coroutine of this process behind an asyncio lock:
sqlite has one writer at a time anyway, and a single connection is the only way an in-memory
database is seen by more than one coroutine. Write transactions begin IMMEDIATE, so two
processes sharing a file serialise on the write lock instead of deadlocking on an upgrade
from a read lock; WAL and a busy timeout let them wait for each other.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from ...exceptions import DatabaseError
from ...logs import get_logger
from ...utils import backoff, stop_at_deadline
from .base import DEFAULT_STATEMENT_TIMEOUT, Database

__all__ = ("SqliteDatabase", "backend_class")

log = get_logger("aeventor.store")

BUSY_TIMEOUT_MS = 30_000


class SqliteDatabase(Database):
    """A sqlite file, or ``:memory:`` (private to this store object)."""

    fires_on_insert = True

    def __init__(
        self,
        *,
        url: URL,
        poll_interval: float | None = None,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        # sqlite has no statement timeout; kept for messages (busy_timeout bounds lock waits).
        super().__init__(url=url, poll_interval=poll_interval, statement_timeout=statement_timeout)
        self._lock = asyncio.Lock()

    @property
    def in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    def _create_engine(self) -> AsyncEngine:
        engine = create_async_engine(self.url, poolclass=StaticPool)
        in_memory = self.in_memory

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take BEGIN out of the driver's hands (it would begin DEFERRED, lazily).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                # WAL is set in _ensure_schema: switching to it does not wait on the busy
                # timeout, so it needs retries, which a sync event hook cannot await.
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock, super().transaction() as conn:
            yield conn

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock, super().reading() as conn:
            yield conn

    async def _ensure_schema(self) -> None:
        async with self._lock:
            if not self.in_memory:
                await self._use_wal()
            await super()._ensure_schema()

    async def _use_wal(self) -> None:
        """Put the file in WAL mode (it stays so), retrying while another opener holds it.

        ``PRAGMA journal_mode = WAL`` fails at once with "database is locked" when another
        connection is switching the same new file; it does not wait on ``busy_timeout``, so
        :func:`aeventor.utils.backoff` retries it, with short jittered delays, for as long as
        that timeout (measured on the store's ``clock``).
        """
        retrying = backoff(
            initial=0.01,
            maximum=0.2,
            stop=stop_at_deadline(self.clock, self.clock() + BUSY_TIMEOUT_MS / 1000),
            retry_on=lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc),
            sleep=self.sleep,
            log=log,
            event="WAL switch locked; retrying",
            level=logging.DEBUG,
        )
        async with self.engine.connect() as conn:
            # The driver connection, outside SQLAlchemy's BEGIN: the journal mode cannot
            # change inside a transaction.
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            try:
                async for attempt in retrying:
                    with attempt:
                        await raw.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                raise DatabaseError(f"{self!r}: cannot switch to WAL: {exc}") from exc

    def _insert_ignore(self, table: Any) -> Any:
        return sqlite_insert(table).on_conflict_do_nothing()


backend_class = SqliteDatabase
