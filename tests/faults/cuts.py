"""Which commit loses its acknowledgement: rules shared by the TCP proxy and the sqlite store.

A :class:`Cut` picks a committed transaction by what it ran: the Nth commit from the moment
the rule is armed, or the Nth commit of a transaction in which a statement matching a
regular expression changed at least one row (the statements the store runs are in
:mod:`tests.faults.sql`). "Changed a row" matters: a claim that found nothing ready, or a
completion of a step run that is no longer active, commits too, and cutting those tests
nothing.

A transaction is a list of :class:`Statement`: its SQL and the rows it affected (None while
unknown: the proxy reads that from the server's reply, the sqlite store from the cursor).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field


@dataclass
class Statement:
    sql: str
    #: Rows the statement affected or returned (None: not known).
    rows: int | None = None

    def __str__(self) -> str:
        sql = " ".join(self.sql.split())
        return f"{sql[:120]}{'...' if len(sql) > 120 else ''} -> {self.rows} rows"


@dataclass
class Cut:
    """One armed rule.

    Attributes:
        after: the regular expression (``re.search``) one statement of the transaction must
            match; None: any transaction.
        changed: only when that statement affected at least one row.
        nth: cut every nth matching commit (1: the next one).
        times: how many cuts the rule makes before it disarms itself.
        seen: matching commits seen so far; made: cuts made so far.
        hold: instead of cutting the connection, hold the server's acknowledgement of the
            COMMIT until :meth:`release` (the TCP proxy only): the client stays blocked
            with its transaction committed, for as long as the test wants.
        statements: the SQL of each transaction that was cut (for failure messages).
        done: set once the rule has made all its cuts.
        committed: set once the server acknowledged a picked COMMIT (the proxy only).
    """

    after: re.Pattern[str] | None = None
    changed: bool = True
    nth: int = 1
    times: int = 1
    seen: int = 0
    made: int = 0
    hold: bool = False
    statements: list[list[Statement]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Let a held acknowledgement through."""
        self.released.set()

    def matches(self, transaction: list[Statement]) -> bool:
        if self.after is None:
            return True
        return any(
            self.after.search(s.sql) and (not self.changed or (s.rows or 0) > 0)
            for s in transaction
        )

    def __str__(self) -> str:
        what = (
            "any transaction"
            if self.after is None
            else f"a transaction where /{self.after.pattern}/ changed rows"
        )
        action = "hold the ack of" if self.hold else "cut after"
        return f"{action} every {self.nth} COMMIT of {what} ({self.made}/{self.times} made)"


class Rules:
    """The armed rules of one proxy or store; the first that picks a commit cuts it."""

    def __init__(self) -> None:
        self.armed: list[Cut] = []

    def arm(
        self,
        after: str | None = None,
        *,
        nth: int = 1,
        times: int = 1,
        changed: bool = True,
        hold: bool = False,
    ) -> Cut:
        if nth < 1 or times < 1:
            raise ValueError(f"nth={nth} and times={times} must be at least 1")
        pattern = None if after is None else re.compile(after)
        rule = Cut(after=pattern, changed=changed, nth=nth, times=times, hold=hold)
        self.armed.append(rule)
        return rule

    def pick(self, transaction: list[Statement]) -> Cut | None:
        """The rule that picks the commit of ``transaction`` (its statements), if any."""
        for rule in self.armed:
            if rule.made >= rule.times or not rule.matches(transaction):
                continue
            rule.seen += 1
            if rule.seen % rule.nth:
                continue
            rule.made += 1
            rule.statements.append(list(transaction))
            if rule.made >= rule.times:
                rule.done.set()
            return rule
        return None
