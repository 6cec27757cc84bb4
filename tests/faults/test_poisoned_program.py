"""A poisoned program row: its stored definition replaced by ``'{}'``.

An agent that reads a program it cannot even parse must treat it like any other untrusted
program: fail the step run with the reason, stop that run, and go on serving. Two agents
serve the host; both must stay up, record the poisoned run's step run as failed with the
reason, and then run a good program's run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores import schema as _schema
from tests.acceptance.agents import CLUSTER_KEY, Agents, execute, within

from .checks import S, assert_exactly_once, assert_nothing_active, chain, describe, finish

pytestmark = pytest.mark.timeout(90)

RUN_DEADLINE = 30.0


@pytest.mark.postgres
async def test_poisoned_program_fails_its_run_and_agents_live_on(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    store = pg_store
    journal = tmp_path / "journal"
    poisoned = chain(
        store,
        journal,
        length=1,
        name="poisoned",
        log_dir=tmp_path / "logs",
        host="h1",
        mode="distributed",
        cluster_key=CLUSTER_KEY,
    )
    async with poisoned:
        run_id = await poisoned.submit()
    # Behind the submitter's back, before any agent looks at it.
    await execute(
        store,
        _schema.program.update()
        .where(_schema.program.c.name == "poisoned")
        .values(definition="{}"),
    )
    started = [await agents.start(store, "h1", allow=["tests.faults.*"]) for _ in range(2)]

    handle = evr.attach(store, run_id)
    result = await within(handle.wait(), what="the poisoned run to end", deadline=RUN_DEADLINE)

    assert result.status is evr.RunStatus.failure, describe(result)
    (step,) = result.steps
    assert step.status is S.failure, describe(result)
    assert step.error and "refused" in step.error and "poisoned" in step.error, step.error
    assert result.reason, result
    for agent in started:
        assert agent.proc.returncode is None, await asyncio.to_thread(agent.log)

    # Both agents still serve: a good run after it succeeds.
    good = chain(
        store,
        journal,
        length=3,
        name="good",
        log_dir=tmp_path / "logs",
        host="h1",
        mode="distributed",
        cluster_key=CLUSTER_KEY,
    )
    async with good:
        good_result = await finish(
            good.start(), store=store, fault="a poisoned run before", deadline=RUN_DEADLINE
        )
    assert good_result.status is evr.RunStatus.success, describe(good_result)
    await assert_exactly_once(journal, ["s0", "s1", "s2"])
    await assert_nothing_active(store)
    for agent in started:
        assert agent.proc.returncode is None, await asyncio.to_thread(agent.log)
