"""Four agents race over one fan-out of 1,000 steps: each runs exactly once.

Every agent claims with ``FOR UPDATE SKIP LOCKED`` from the same host queue, and each
completion may claim what it makes ready; nothing is faulted but the timing. Postgres is the
session's private cluster (no other suite's or engineer's connections compete), MariaDB the
shared server. Each step
appends its name to a journal, so a step run twice (or never) shows however the store
recorded it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aeventor as evr
from tests.acceptance.agents import CLUSTER_KEY, Agents

from .checks import (
    SHELL,
    S,
    assert_exactly_once,
    assert_nothing_active,
    describe,
    fan_out,
    finish,
    step_names,
)

pytestmark = pytest.mark.timeout(180)

WIDTH = 1000
AGENTS = 4
RUN_DEADLINE = 120.0


async def test_four_agents_race_over_a_fan_out_postgres(
    private_pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    """On the private cluster (300 connections, nobody else's load: four agents' pools and
    listeners need some 40)."""
    await race(private_pg_store, agents, tmp_path)


@pytest.mark.mysql
async def test_four_agents_race_over_a_fan_out_mariadb(
    mysql_store: str, agents: Agents, tmp_path: Path
) -> None:
    await race(mysql_store, agents, tmp_path)


async def race(store: str, agents: Agents, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    # 16 steps at a time each (twice the default): more racing, and a shorter test.
    started = [
        await agents.start(store, "h1", allow=[SHELL], args=["--max-concurrency", "16"])
        for _ in range(AGENTS)
    ]
    ev = fan_out(
        store,
        journal,
        width=WIDTH,
        log_dir=tmp_path / "logs",
        host="h1",
        mode="distributed",
        cluster_key=CLUSTER_KEY,
    )
    async with ev:
        handle = ev.start()
        result = await finish(handle, store=store, fault="4 racing agents", deadline=RUN_DEADLINE)

    assert result.status is evr.RunStatus.success, describe(result)
    assert len(result.steps) == WIDTH
    assert {s.status for s in result.steps} == {S.success}, describe(result)
    await assert_exactly_once(journal, step_names(WIDTH))
    await assert_nothing_active(store)
    # Every agent took part (a race of one is no race).
    workers = {s.worker for s in result.steps}
    idle = [a.pid for a in started if not any(a.ran(worker) for worker in workers)]
    assert not idle, f"agents that ran nothing: {idle}"
    for agent in started:
        assert agent.proc.returncode is None, await asyncio.to_thread(agent.log)
