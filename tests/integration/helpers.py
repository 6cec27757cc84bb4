"""Waiting on conditions with deadlines, and looking at processes and store rows.

Nothing here sleeps to let time pass: :func:`wait_until` polls a condition and fails with a
message naming it when the deadline passes (pytest-timeout is only the backstop).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa

import aeventor as evr
from aeventor import _schema
from aeventor.backends.base import Database
from aeventor.exceptions import NoResult

#: Seconds any single condition may take to come true.
DEADLINE = 30.0
#: How often :func:`wait_until` re-checks its condition.
POLL = 0.01


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, what: str, deadline: float = DEADLINE
) -> None:
    """Return as soon as ``condition()`` is true; fail the test after ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline} s waiting for {what}") from None


async def wait_event(event: asyncio.Event, *, what: str, deadline: float = DEADLINE) -> None:
    """Wait for ``event`` to be set; fail the test after ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            await event.wait()
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline} s waiting for {what}") from None


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


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, awaiting its reaper)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def session_members(session_id: int) -> list[int]:
    """Live (non-zombie) processes of session ``session_id``: a step's whole process tree."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        # state, ppid, pgrp, session
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == session_id:
            members.append(int(entry))
    return members


# -- the store -------------------------------------------------------------------------


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
