"""A sqlite store that loses the acknowledgement of a commit, deterministically.

sqlite has no network to cut, so :class:`LostAckSqlite` fakes the one fault that matters:
the chosen write transaction **commits for real**, and then its caller gets
:class:`aeventor.exceptions.ConnectionLost`, as if the connection had died while the commit's
acknowledgement was on its way. The store's own retry path
(:func:`aeventor.backends.stores.base.retry_on_disconnect`) then runs the operation again, on a
database that already holds its first attempt's writes.

Which transaction: :meth:`LostAckSqlite.cut_after_commit`, the same rules as the TCP proxy's
(:mod:`tests.faults.cuts`), matched against the statements SQLAlchemy executed in that
transaction (recorded with an ``after_cursor_execute`` hook, with the cursor's ``rowcount``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aeventor.backends.stores.sqlite import SqliteDatabase
from aeventor.exceptions import ConnectionLost

from .cuts import Cut, Rules, Statement


class LostAckSqlite(SqliteDatabase):
    """:class:`SqliteDatabase` whose chosen commits raise ``ConnectionLost`` once they are done."""

    def __init__(self, *, url: URL, poll_interval: float | None = None) -> None:
        super().__init__(url=url, poll_interval=poll_interval)
        self.rules = Rules()
        #: Commits made, and acknowledgements lost.
        self.commits = 0
        self.cuts = 0
        self._statements: list[Statement] = []

    def cut_after_commit(
        self, after: str | None = None, *, nth: int = 1, times: int = 1, changed: bool = True
    ) -> Cut:
        """Arm a rule (see :class:`tests.faults.cuts.Cut`)."""
        return self.rules.arm(after, nth=nth, times=times, changed=changed)

    def _create_engine(self) -> AsyncEngine:
        engine = super()._create_engine()

        @event.listens_for(engine.sync_engine, "after_cursor_execute")
        def _record(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
            rowcount = getattr(cursor, "rowcount", -1)
            self._statements.append(Statement(statement, rowcount if rowcount >= 0 else None))

        return engine

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with super().transaction() as conn:
            # One connection and a lock (SqliteDatabase): this transaction's statements only.
            self._statements = []
            yield conn
            statements, self._statements = self._statements, []
        # Committed (the block above left without an error).
        self.commits += 1
        if self.rules.pick(statements):
            self.cuts += 1
            raise ConnectionLost(
                f"{self!r}: injected fault: the commit succeeded but its acknowledgement was lost"
            )
