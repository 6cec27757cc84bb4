"""Waiting on conditions with deadlines, and looking at processes and store rows.

Nothing here sleeps to let time pass: :func:`wait_until` polls a condition and fails with a
message naming it when the deadline passes (pytest-timeout is only the backstop).
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

import aeventor as evr
from aeventor.backends.stores import schema as _schema
from aeventor.backends.stores.base import Database
from aeventor.exceptions import NoResult

from ..waiting import (  # noqa: F401 - re-exported for the tests of this suite
    DEADLINE,
    pid_alive,
    session_members,
    wait_event,
    wait_until,
)


async def rendezvous(barrier: asyncio.Barrier, *, what: str, deadline: float = DEADLINE) -> None:
    """Wait until every party reached ``barrier``: proof that they run at the same time."""
    try:
        async with asyncio.timeout(deadline):
            await barrier.wait()
    except TimeoutError:
        raise AssertionError(
            f"timed out after {deadline} s: {barrier.n_waiting} of {barrier.parties} {what} "
            "were running at the same time"
        ) from None


# -- processes -------------------------------------------------------------------------


async def count_rows(db: Database, table: sa.Table) -> int:
    async with db.reading() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def count_runs(db: Database) -> int:
    return await count_rows(db, _schema.run)


async def step_status(
    db: Database, run_id: str, step: str, sequence: str | int = 0
) -> evr.StepStatus | None:
    """The status of a step run as the store has it now (None: no such row, or no run yet)."""
    try:
        result = await db.load_result(run_id)
    except NoResult:
        return None
    for step_run in result.steps:
        if step_run.step == step and step_run.sequence == str(sequence):
            return step_run.status
    return None


def steps_of(result: evr.RunResult) -> list[tuple[str, str, str]]:
    """``(step, sequence, status)`` of every step run, sorted."""
    return sorted((s.step, s.sequence, s.status.value) for s in result.steps)


def sequences_of(result: evr.RunResult, step: str) -> list[str]:
    """The sequences in which ``step`` ran, sorted."""
    return sorted(s.sequence for s in result.steps if s.step == step)


def fired(events: list[tuple[str, str]], event: str) -> list[str]:
    """The sequences for which ``event`` fired, sorted."""
    return sorted(seq for name, seq in events if name == event)
