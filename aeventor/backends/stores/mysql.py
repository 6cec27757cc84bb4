"""MySQL / MariaDB through aiomysql.

No LISTEN/NOTIFY here: other processes' work is found by polling (``poll_interval``, a
quarter second by default; an indexed query that returns nothing costs little), and this
process's own changes wake its dispatchers directly. Transactions run at READ COMMITTED so a
poll always sees rows committed since the last one; claims use ``FOR UPDATE SKIP LOCKED``
(MariaDB 10.6+, MySQL 8.0+).

Every connection sets the store's statement timeout as a session variable when it connects
(MariaDB ``max_statement_time`` in seconds, MySQL ``max_execution_time`` in milliseconds,
which bounds SELECTs only). A statement larger than the server's ``max_allowed_packet``
makes the server drop the connection: the store reads that limit when it opens
(:attr:`max_value_bytes`), so values that cannot fit are refused before they are sent, and
the server's "packet too big" error is a :class:`~aeventor.exceptions.ValueTooLarge`, never
a lost connection to retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ...exceptions import SchemaVersionError, ValueTooLarge
from .base import DEFAULT_STATEMENT_TIMEOUT, POOL, Database, ErrorKind, migrations_module
from .schema import UTCDateTime

__all__ = ("MySQLDatabase", "backend_class")

MIGRATION_LOCK_TIMEOUT = 120
#: Bytes of a statement's ``max_allowed_packet`` kept for everything but its one large value
#: (the SQL text and the other columns of the row).
STATEMENT_HEADROOM = 64 * 1024

# Server and client error codes, by what they mean for the caller.
_DISCONNECT_CODES = {2003, 2006, 2013, 2055}  # gone away, lost during query, can't connect
_AUTH_CODES = {1044, 1045, 1698}  # access denied (to the database; for the user)
# Deadlock, lock wait timeout, too many connections (for the server; for the user).
_TRANSIENT_CODES = {1213, 1205, 1040, 1203}
_TIMEOUT_CODES = {1969, 3024}  # max_statement_time (MariaDB), max_execution_time (MySQL)
_TOO_LARGE_CODES = {1153, 1301}  # packet bigger than max_allowed_packet; result larger
# Bytes that pymysql escapes (with a backslash) when it puts a string into a statement.
_ESCAPED = (b"\\", b"'", b'"', b"\n", b"\r", b"\0", b"\x1a")


class MySQLDatabase(Database):
    """A MySQL or MariaDB database, polled for other processes' work."""

    clock_in_sql = True

    default_poll_interval = 0.25
    claims_on_insert = True

    def __init__(
        self,
        *,
        url: URL,
        poll_interval: float | None = None,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        super().__init__(url=url, poll_interval=poll_interval, statement_timeout=statement_timeout)
        #: The server's ``@@max_allowed_packet`` (read on open) and its name for messages.
        self.max_allowed_packet: int | None = None
        self.server = "MySQL"
        #: Whether the server is MariaDB (learnt on the first connect).
        self._mariadb = False

    def _create_engine(self) -> AsyncEngine:
        engine = create_async_engine(
            self.url,
            isolation_level="READ COMMITTED",
            **POOL,
            pool_recycle=3600,
            pool_pre_ping=True,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT VERSION()")
                self._mariadb = "mariadb" in str(cursor.fetchone()[0]).lower()
                cursor.execute(*_timeout_statement(self._mariadb, self.statement_timeout))
            finally:
                cursor.close()

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _check_size(
            _conn: Any,
            _cursor: Any,
            statement: str,
            parameters: Any,
            _context: Any,
            executemany: bool,
        ) -> None:
            self._check_statement(statement, parameters, executemany)

        return engine

    def _check_statement(self, statement: str, parameters: Any, executemany: bool) -> None:
        """Refuse a statement larger than ``max_allowed_packet`` before it is sent.

        The server answers one by dropping the connection, often before the client reads
        its "packet too big" error: the driver then reports a lost connection, which would
        be retried until the reconnect deadline. Nothing is sent; the transaction rolls
        back on a healthy connection.
        """
        packet = self.max_allowed_packet
        if packet is None:
            return
        rows = parameters if executemany else (parameters,)
        if executemany and parameters and not isinstance(parameters[0], tuple | list | dict):
            # SQLAlchemy's "insertmanyvalues" (INSERT ... RETURNING of many rows) sends one
            # statement with every row's values in one flat tuple.
            rows = (parameters,)
        # pymysql batches an executemany INSERT into statements it keeps far below any
        # packet limit, so each row is checked as a statement of its own.
        for row in rows or ((),):
            values = row.values() if isinstance(row, dict) else (row or ())
            texts = [v for v in values if isinstance(v, str | bytes)]
            quick = len(statement) + sum(len(v) for v in texts)
            # A character takes at most 4 bytes, escaped at most 2: measure only when close.
            if quick * 4 < packet:
                continue
            size = len(statement.encode()) + sum(
                self.value_size(v) if isinstance(v, str) else 2 * len(v) for v in texts
            )
            if size > packet:
                raise ValueTooLarge(
                    f"{self!r}: a statement of {size:,} bytes was not sent: "
                    f"{self.describe_limit()}; make it smaller, or {self.how_to_raise_limit()}",
                    size=size,
                    limit=self.max_value_bytes,
                )

    async def open(self) -> None:
        if self._engine is not None:
            return
        await super().open()
        try:
            async with self.reading() as conn:
                packet = (await conn.execute(sa.text("SELECT @@max_allowed_packet"))).scalar_one()
        except BaseException:
            await self.aclose()
            raise
        self.max_allowed_packet = int(packet)
        self.server = "MariaDB" if self._mariadb else "MySQL"
        self.max_value_bytes = max(self.max_allowed_packet - STATEMENT_HEADROOM, 0)

    def value_size(self, text: str) -> int:
        # pymysql sends values inside the statement's text, escaping quotes, backslashes,
        # newlines and NULs with a backslash: each of those costs two bytes of the packet.
        data = text.encode()
        return len(data) + sum(data.count(byte) for byte in _ESCAPED)

    def describe_limit(self) -> str:
        if self.max_allowed_packet is None:
            return f"{self.server}'s max_allowed_packet limits each statement"
        return (
            f"{self.server}'s max_allowed_packet is {self.max_allowed_packet:,} bytes "
            f"(at most {self.max_value_bytes:,} per value)"
        )

    def how_to_raise_limit(self) -> str:
        return "raise max_allowed_packet on the server"

    async def _ensure_schema(self) -> None:
        await (await migrations_module()).upgrade_to_head(self.engine, lock=self._named_lock)

    def claims_on_insert_in(self, conn: AsyncConnection, *, retried: bool) -> bool:
        # MariaDB (10.5+) has INSERT ... RETURNING, MySQL has not. A plain INSERT says which
        # rows it inserted; INSERT ... ON DUPLICATE KEY UPDATE cannot. A plain INSERT fails
        # on a row that exists, which only a retried transaction can meet (its first attempt
        # may have committed): that one claims after, as MySQL always does.
        return bool(conn.dialect.insert_returning) and not retried

    def _insert_claimed(self, table: sa.Table) -> Any:
        return table.insert()

    def _insert_ignore(self, table: sa.Table) -> Any:
        # Not INSERT IGNORE: that also turns truncation and other errors into warnings.
        # "id = id" leaves the existing row as it is.
        key = table.primary_key.columns.values()[0]
        return mysql_insert(table).on_duplicate_key_update({key.name: key})

    def server_now(self) -> sa.ColumnElement[datetime]:
        # Naive UTC, as every DATETIME column holds.
        return sa.type_coerce(sa.literal_column("UTC_TIMESTAMP(6)"), UTCDateTime)

    def server_now_plus(self, delta: timedelta) -> sa.ColumnElement[datetime]:
        micros = delta // timedelta(microseconds=1)
        added = sa.func.timestampadd(
            sa.literal_column("MICROSECOND"), micros, sa.literal_column("UTC_TIMESTAMP(6)")
        )
        return sa.type_coerce(added, UTCDateTime)

    def _reason(self, exc: DBAPIError) -> str:
        # pymysql's errors are (code, message) pairs: "message (MySQL error code)".
        args: tuple[Any, ...] = getattr(exc.orig, "args", ())
        if len(args) == 2 and isinstance(args[0], int):
            return f"{args[1]} (error {args[0]})"
        return str(exc.orig)

    def _classify(self, exc: DBAPIError) -> ErrorKind | None:
        args: tuple[Any, ...] = getattr(exc.orig, "args", ())
        code = args[0] if args else None
        if code in _AUTH_CODES:
            return "auth"
        if code in _TOO_LARGE_CODES:
            return "too_large"
        if code in _TIMEOUT_CODES:
            return "timeout"
        if code in _TRANSIENT_CODES:
            return "transient"
        if code in _DISCONNECT_CODES:
            return "disconnect"
        return None

    @contextmanager
    def _named_lock(self, connection: Connection) -> Iterator[None]:
        """Serialise schema upgrades of this database across processes.

        MySQL commits DDL implicitly, so a transaction cannot serialise upgraders: a named
        lock held by this session does, from before the migration's transaction begins
        until after it has committed (a lock released earlier would let another process
        read the revision before the last one and apply the last migration again). Named
        after the database (lock names are server-wide), and waited for without the
        statement timeout, which a long migration elsewhere may exceed.
        """
        name = _lock_name(self.url.database or "")
        self._session_timeout(connection, None)
        got = connection.execute(sa.select(sa.func.get_lock(name, MIGRATION_LOCK_TIMEOUT))).scalar()
        connection.commit()  # ends the transaction those statements began
        if got != 1:
            raise SchemaVersionError(
                f"could not take the schema upgrade lock {name!r} within "
                f"{MIGRATION_LOCK_TIMEOUT}s; another process may be stuck upgrading the schema"
            )
        try:
            yield
        finally:
            if not connection.invalidated:
                connection.execute(sa.select(sa.func.release_lock(name)))
                self._session_timeout(connection, self.statement_timeout)
                connection.commit()

    def _session_timeout(self, connection: Connection, seconds: float | None) -> None:
        connection.exec_driver_sql(*_timeout_statement(self._mariadb, seconds))


def _lock_name(database: str) -> str:
    # At most 64 characters; a long database name is hashed.
    name = f"aeventor_migrate.{database}"
    if len(name) > 64:
        name = "aeventor_migrate." + hashlib.sha1(database.encode()).hexdigest()
    return name


def _timeout_statement(mariadb: bool, seconds: float | None) -> tuple[str, tuple[Any, ...]]:
    """The statement that sets the session's statement timeout (None: no limit)."""
    if mariadb:
        return "SET SESSION max_statement_time = %s", (seconds or 0,)
    return "SET SESSION max_execution_time = %s", (round((seconds or 0) * 1000),)


backend_class = MySQLDatabase
