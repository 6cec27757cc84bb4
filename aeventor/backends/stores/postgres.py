"""Postgres through asyncpg: the shared store of distributed mode.

State changes commit with a ``NOTIFY`` in the same transaction (delivered at commit, dropped
on rollback); one dedicated LISTEN connection per store object wakes this process's
dispatchers within milliseconds. The payload is tiny: the run id and a sender token, so a
process ignores its own notifications (it already knows what it changed).

Channels: every change of a run is sent on :data:`CHANNEL` (dispatchers and followers of
runs); work made ready for a host is also sent on that host's queue channel
(:func:`queue_channel`), which only the agents taking that host's work listen on, so an
agent wakes only for work it may take. The listener LISTENs on the queue channels of the
queues subscribed to in this process (:meth:`~.base.Notifier.subscribe_queues`), adding
them while connected and again after every reconnect.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
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
from .base import DEFAULT_STATEMENT_TIMEOUT, POOL, Database, ErrorKind, migrations_module
from .pg_listener import PgListener, asyncpg_dsn
from .schema import UTCDateTime

__all__ = ("CHANNEL", "PostgresDatabase", "backend_class", "queue_channel")

log = get_logger("aeventor.store")

CHANNEL = "aeventor"
#: Prefix of the queue channels; see :func:`queue_channel`.
QUEUE_CHANNEL_PREFIX = "aeventor_q_"
#: Key of the advisory lock that serialises schema upgrades.
MIGRATION_LOCK = 0x6165_7665  # "aeve"
LISTENER_READY_TIMEOUT = 30.0
#: ``application_name`` of the LISTEN connection, so that ``pg_stat_activity`` tells it
#: apart from the pool's connections.
LISTENER_APPLICATION_NAME = "aeventor listener"


def queue_channel(queue: str | None) -> str:
    """The channel that announces ready work for ``queue`` (a host name; None: standalone).

    Host names may be up to 200 characters of anything, and a channel name is an identifier
    of at most 63 bytes: hash the name. 64 bits of SHA-1 make a collision between two hosts
    of one cluster improbable, and one would only cause spurious wake-ups.
    """
    if queue is None:
        return f"{QUEUE_CHANNEL_PREFIX}standalone"  # not hex: no host hashes to it
    digest = hashlib.sha1(queue.encode(), usedforsecurity=False).hexdigest()
    return QUEUE_CHANNEL_PREFIX + digest[:16]


class PostgresDatabase(Database):
    """A Postgres database; LISTEN/NOTIFY carries wake-ups between processes."""

    clock_in_sql = True

    fires_on_insert = True
    ends_locking_run = True

    def __init__(
        self,
        *,
        url: URL,
        poll_interval: float | None = None,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        super().__init__(url=url, poll_interval=poll_interval, statement_timeout=statement_timeout)
        self._sender = uuid.uuid4().hex[:12]
        self._listener: PgListener | None = None
        self._listener_task: asyncio.Task[None] | None = None
        #: The queue channels this process listens on, and the queues each stands for.
        self._channel_queues: dict[str, set[str | None]] = {}
        self.notifier.on_new_queues = self._listen_queues

    def _create_engine(self) -> AsyncEngine:
        # The statement timeout is a setting of every pooled session, sent at connect.
        timeout_ms = round((self.statement_timeout or 0) * 1000)
        return create_async_engine(
            self.url,
            **POOL,
            connect_args={"server_settings": {"statement_timeout": str(timeout_ms)}},
        )

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
            channels=[CHANNEL, *self._channel_queues],
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

    async def listen_for_changes(self) -> None:
        """Hear other processes' changes on a store opened by :meth:`open_for_reading`.

        :meth:`open` listens already; a read-only opening does not, so that ``aeventor
        runs`` costs one connection. ``aeventor watch`` and ``logs -f`` call this to be
        woken by NOTIFY rather than only by their poll.

        .. versionadded:: 0.1
        """
        if self._listener_task is None:
            await self._start_listener()

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

    def _listen_queues(self, queues: Sequence[str | None]) -> None:
        """Listen on the channels of ``queues`` (called when they gain a first subscriber)."""
        for queue in queues:
            self._channel_queues.setdefault(queue_channel(queue), set()).add(queue)
        if self._listener is not None:
            # LISTENs from the listener's task, then wakes every subscriber to rescan.
            self._listener.add_channels([queue_channel(queue) for queue in queues])

    def _on_notify(self, channel: str, payload: str) -> None:
        run_id, _, sender = payload.partition(" ")
        if sender == self._sender:
            return
        if channel == CHANNEL:
            self.notifier.notify(run_id)
            return
        for queue in self._channel_queues.get(channel, ()):
            self.notifier.notify_queue(queue)

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
        await (await migrations_module()).upgrade_to_head(self.engine, lock=_advisory_lock)

    def _classify(self, exc: DBAPIError) -> ErrorKind | None:
        for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
            state = getattr(error, "sqlstate", None)
            if not isinstance(state, str):
                continue
            # 28000 (invalid authorization: no such role, pg_hba refused), 28P01 (password).
            if state.startswith("28"):
                return "auth"
            # Deadlock, serialization failure, lock not available, too many connections.
            if state in ("40P01", "40001", "55P03", "53300"):
                return "transient"
            # query_canceled: by the statement timeout (else by a user: not ours to retry).
            if state == "57014" and "statement timeout" in str(error):
                return "timeout"
            # Class 08 (connection exception) and 57P01-57P03 (admin shutdown, crash
            # shutdown, cannot connect now: a server restarting).
            if state.startswith("08") or state[:4] == "57P0":
                return "disconnect"
        return None

    async def _notify_work(
        self, conn: AsyncConnection, run_id: str, queues: Collection[str | None] = ()
    ) -> None:
        """NOTIFY, at commit, the run's channel and the channel of each of ``queues``."""
        payload = f"{run_id} {self._sender}"
        channels = [CHANNEL, *dict.fromkeys(queue_channel(queue) for queue in queues)]
        # One statement however many queues: pg_notify() per channel in one SELECT.
        await conn.execute(
            sa.select(*(sa.func.pg_notify(channel, payload) for channel in channels))
        )

    def _insert_ignore(self, table: sa.Table) -> Any:
        return pg_insert(table).on_conflict_do_nothing()

    def server_now(self) -> sa.ColumnElement[datetime]:
        # The transaction's start on the server's clock: one instant for all its rows.
        return sa.type_coerce(sa.func.now(), UTCDateTime)

    def server_now_plus(self, delta: timedelta) -> sa.ColumnElement[datetime]:
        interval = sa.func.make_interval(0, 0, 0, 0, 0, 0, delta.total_seconds())
        return sa.type_coerce(sa.func.now() + interval, UTCDateTime)

    def _constraint_name(self, exc: IntegrityError) -> str | None:
        return getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None)


@contextmanager
def _advisory_lock(connection: Connection) -> Iterator[None]:
    """Serialise schema upgrades of this database (advisory locks are per database).

    A session lock, taken before the migration's transaction begins and released after it
    ends: the next upgrader reads the committed revision. Waited for without the statement
    timeout (a long migration elsewhere may exceed it); a session that dies releases it.
    """
    connection.exec_driver_sql("SET statement_timeout = 0")
    connection.execute(sa.select(sa.func.pg_advisory_lock(MIGRATION_LOCK)))
    connection.commit()  # ends the transaction those statements began
    try:
        yield
    finally:
        if not connection.invalidated:
            connection.execute(sa.select(sa.func.pg_advisory_unlock(MIGRATION_LOCK)))
            connection.exec_driver_sql("RESET statement_timeout")
            connection.commit()


backend_class = PostgresDatabase
