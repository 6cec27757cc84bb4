"""What every fault test asserts at the end, and the programs they run.

- the run's final record (:func:`final_result`);
- each step ran exactly once (:func:`assert_exactly_once`: the journal of
  :mod:`.steps` counts executions, whoever ran them);
- no step run is left ``active`` anywhere in the database (:func:`assert_nothing_active`),
  read directly, never through a proxy.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as _schema

from . import steps

S = evr.StepStatus


async def final_result(store: str, run_id: str) -> evr.RunResult:
    async with open_store(store, program="faults-check") as db:
        return await db.load_result(run_id)


async def active_step_runs(store: str) -> list[Any]:
    """Every step run recorded ``active`` in the store, of any run."""
    query = sa.select(
        _schema.step_run.c.run_id,
        _schema.step_run.c.step,
        _schema.step_run.c.sequence,
        _schema.step_run.c.worker,
        _schema.step_run.c.lease_until,
    ).where(_schema.step_run.c.status == S.active.value)
    async with open_store(store, program="faults-check") as db, db.reading() as conn:
        return list((await conn.execute(query)).all())


async def assert_nothing_active(store: str) -> None:
    active = await active_step_runs(store)
    assert not active, f"step runs left active: {active}"


async def executions(journal: Path) -> Counter[str]:
    return await asyncio.to_thread(steps.executions, journal)


async def assert_exactly_once(journal: Path, names: Iterable[str]) -> None:
    counts = await executions(journal)
    expected = Counter(names)
    twice = {name: n for name, n in counts.items() if n > 1}
    never = sorted(set(expected) - set(counts))
    assert counts == expected, (
        f"ran more than once: {twice or 'none'}; never ran: {never[:20] or 'none'}"
        f"{' ...' if len(never) > 20 else ''}; unexpected: {sorted(set(counts) - set(expected))}"
    )


def describe(result: evr.RunResult) -> str:
    """A run's record, one line per step run that did not succeed (for assertion messages)."""
    others = [
        f"{s.step}[{s.sequence}] {s.status.value}: {(s.error or '').strip()[-200:]}"
        for s in result.steps
        if s.status is not S.success
    ]
    return f"run {result.run_id} {result.status.value} ({result.reason}); " + (
        "; ".join(others[:10]) or "every step run succeeded"
    )


def chain(
    store: str,
    journal: Path,
    *,
    length: int = 3,
    name: str = "chain",
    log_dir: Path,
    host: str | None = None,
    **kwargs: Any,
) -> evr.Eventor:
    """``s0 -> s1 -> ...``: each step a process that records itself; sequence 1."""
    ev = evr.Eventor(name=name, store=store, log_dir=log_dir, **kwargs)
    events = [ev.add_event(f"e{i}") for i in range(length)]
    for i in range(length):
        ev.add_step(
            f"s{i}",
            func=steps.record,
            kwargs={"journal": str(journal), "name": f"s{i}"},
            host=host,
            triggers={S.success: (events[i + 1],)} if i + 1 < length else None,
        )
        ev.add_assoc(events[i], f"s{i}")
    ev.trigger_event(events[0], 1)
    return ev


#: What command steps run: a shell appending its first argument to the journal (its second).
SHELL = "/bin/sh"
RECORD_COMMAND = 'echo "$0" >> "$1"'


def fan_out(
    store: str,
    journal: Path,
    *,
    width: int,
    name: str = "fanout",
    log_dir: Path,
    host: str | None = None,
    **kwargs: Any,
) -> evr.Eventor:
    """One event starting ``width`` independent steps ``f0000 ...``, each recording itself.

    They are command steps (a shell, a millisecond to start; a Python step process takes a
    hundred), so that hundreds of them fit in a test's time. Agents must allow
    :data:`SHELL`.
    """
    ev = evr.Eventor(name=name, store=store, log_dir=log_dir, **kwargs)
    start = ev.add_event("start")
    names = step_names(width)
    for step in names:
        ev.add_step(step, command=[SHELL, "-c", RECORD_COMMAND, step, str(journal)], host=host)
    ev.add_assoc(start, *names)
    ev.trigger_event(start, 1)
    return ev


def step_names(width: int) -> list[str]:
    return [f"f{i:04d}" for i in range(width)]


async def finish(
    handle: evr.RunHandle, *, store: str, fault: object, deadline: float
) -> evr.RunResult:
    """The run's result once it ended; past ``deadline``, cancel it and fail the test with
    the fault and what the store holds ``active`` (the usual shape of a hang)."""
    try:
        async with asyncio.timeout(deadline):
            return await handle.wait()
    except TimeoutError:
        pass
    active = await active_step_runs(store)
    handle.cancel()
    try:
        async with asyncio.timeout(30):
            await handle.wait()
    except TimeoutError:
        pass
    raise AssertionError(
        f"run {handle.run_id} did not end within {deadline} s of the fault ({fault}); "
        f"{len(active)} step run(s) active: "
        + ", ".join(f"{r.step}[{r.sequence}] worker={r.worker}" for r in active[:10])
    )
