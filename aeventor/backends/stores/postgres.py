"""Postgres through asyncpg: the shared store of distributed mode.

State changes commit with a ``NOTIFY`` in the same transaction (delivered at commit, dropped
on rollback); one dedicated LISTEN connection per store object wakes this process's
dispatchers within milliseconds. The payload is tiny: the run id and a sender token, so a
process ignores its own notifications (it already knows what it changed).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ...exceptions import ConnectionLost
from ...logs import get_logger
from .base import Database
from .migrations import upgrade_to_head
from .pg_listener import PgListener, asyncpg_dsn

__all__ = ("CHANNEL", "PostgresDatabase", "backend_class")

log = get_logger("aeventor.store")

CHANNEL = "aeventor"
#: Key of the advisory lock that serialises schema upgrades.
MIGRATION_LOCK = 0x6165_7665  # "aeve"
LISTENER_READY_TIMEOUT = 30.0
#: ``application_name`` of the LISTEN connection, so that ``pg_stat_activity`` tells it
#: apart from the pool's connections.
LISTENER_APPLICATION_NAME = "aeventor listener"


class PostgresDatabase(Database):
    """A Postgres database; LISTEN/NOTIFY carries wake-ups between processes."""

    def __init__(self, *, url: URL, poll_interval: float | None = None) -> None:
        super().__init__(url=url, poll_interval=poll_interval)
        self._sender = uuid.uuid4().hex[:12]
        self._listener: PgListener | None = None
        self._listener_task: asyncio.Task[None] | None = None

    def _create_engine(self) -> AsyncEngine:
        return create_async_engine(self.url, pool_size=10, max_overflow=20)

    async def open(self) -> None:
        if self._engine is not None:
            return
        await super().open()
        try:
            await self._start_listener()
        except BaseException:
            await self.aclose()
            raise

    async def _start_listener(self) -> None:
        ready = asyncio.Event()
        self._listener = PgListener(
            dsn=asyncpg_dsn(self.url),
            channels=[CHANNEL],
            on_notify=self._on_notify,
            on_connect=self.notifier.notify_all,
            connect=functools.partial(
                asyncpg.connect, server_settings={"application_name": LISTENER_APPLICATION_NAME}
            ),
        )
        # Supervised: aclose() cancels and awaits it; if it dies, _listener_died says so
        # loudly and falls back to polling rather than leaving dispatchers asleep.
        task = asyncio.create_task(self._listener.run(task_status=ready), name="aeventor listen")
        self._listener_task = task
        task.add_done_callback(self._listener_died)
        waiter = asyncio.ensure_future(ready.wait())
        try:
            await asyncio.wait(
                {waiter, task}, timeout=LISTENER_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if not ready.is_set():
            raise ConnectionLost(
                f"{self!r}: the LISTEN connection did not come up within "
                f"{LISTENER_READY_TIMEOUT:.0f}s"
            )

    def _listener_died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        log.error(
            "postgres listener stopped; falling back to polling every second",
            store=repr(self),
            exc_info=task.exception(),
        )
        self.poll_interval = 1.0
        self.notifier.notify_all()

    def _on_notify(self, _channel: str, payload: str) -> None:
        run_id, _, sender = payload.partition(" ")
        if sender != self._sender:
            self.notifier.notify(run_id)

    @property
    def listener(self) -> PgListener | None:
        return self._listener

    async def aclose(self) -> None:
        task, self._listener_task = self._listener_task, None
        if task is not None:
            task.remove_done_callback(self._listener_died)
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("postgres listener failed", exc_info=task.exception())
        self._listener = None
        await super().aclose()

    async def _ensure_schema(self) -> None:
        await upgrade_to_head(self.engine, lock=_advisory_lock)

    async def _notify_work(
        self, conn: AsyncConnection, run_id: str, queues: Collection[str | None] = ()
    ) -> None:
        await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, f"{run_id} {self._sender}")))

    def _insert_ignore(self, table: sa.Table) -> Any:
        return pg_insert(table).on_conflict_do_nothing()

    def _is_disconnect(self, exc: DBAPIError) -> bool:
        # SQLSTATE class 08 (connection exception) and 57P01-57P03 (admin shutdown, crash
        # shutdown, cannot connect now: a server restarting).
        for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
            state = getattr(error, "sqlstate", None)
            if isinstance(state, str) and (state.startswith("08") or state[:4] == "57P0"):
                return True
        return False

    def _constraint_name(self, exc: IntegrityError) -> str | None:
        return getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None)


@contextmanager
def _advisory_lock(connection: Connection) -> Iterator[None]:
    # Transaction-scoped: released at the migration's commit or rollback.
    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
    yield


backend_class = PostgresDatabase
