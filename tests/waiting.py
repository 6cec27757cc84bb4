"""Waiting with deadlines, and looking at processes through /proc: shared by the suites.

Nothing here sleeps to let time pass: :func:`wait_until` polls a condition and fails with a
message naming it when the deadline passes (pytest-timeout is only the backstop).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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


async def within(awaitable: Awaitable[Any], *, what: str, deadline: float = DEADLINE) -> Any:
    """Await ``awaitable``; fail the test (naming ``what``) after ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline} s waiting for {what}") from None


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
