"""The database goes away for longer than the lease while agents run a fan-out.

A private Postgres cluster (never the shared server) is stopped for 8 s while two agents,
leased for 3 s, run 200 short command steps. A worker cannot renew a lease while the server
is down, and nobody else can reap it either: leases are judged on the server's clock, per
worker, so an outage must not turn into step runs recorded lost, nor into steps run twice.
Afterwards the run succeeds, every step ran exactly once, none is lost or skipped, none is
left active, and both agents are still up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aeventor as evr
from tests.acceptance.agents import CLUSTER_KEY, Agents, wait_until

from .checks import (
    SHELL,
    S,
    assert_exactly_once,
    assert_nothing_active,
    describe,
    executions,
    fan_out,
    finish,
    step_names,
)
from .pgcluster import PrivateCluster

pytestmark = pytest.mark.timeout(180)

WIDTH = 200
LEASE = 3.0
OUTAGE = 8.0
#: Seconds the run may take after the server is back (it takes a few).
RUN_DEADLINE = 90.0


async def test_outage_longer_than_the_lease(
    pg_cluster: PrivateCluster, private_pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    store = private_pg_store
    journal = tmp_path / "journal"
    started = [
        await agents.start(store, "h1", allow=[SHELL], args=["--lease", str(LEASE)])
        for _ in range(2)
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

        async def some_ran() -> bool:
            return sum((await executions(journal)).values()) >= 20

        await wait_until(some_ran, what="20 steps to run before the outage")
        ran_before_outage = sum((await executions(journal)).values())
        await pg_cluster.down_for(OUTAGE)
        result = await finish(
            handle, store=store, fault=f"{OUTAGE} s outage", deadline=RUN_DEADLINE
        )

    assert ran_before_outage < WIDTH, "the run ended before the outage: it tested nothing"
    assert result.status is evr.RunStatus.success, describe(result)
    statuses = sorted({s.status for s in result.steps})
    assert statuses == [S.success], describe(result)
    assert len(result.steps) == WIDTH
    await assert_exactly_once(journal, step_names(WIDTH))
    await assert_nothing_active(store)
    for agent in started:
        assert agent.proc.returncode is None, await asyncio.to_thread(agent.log)
