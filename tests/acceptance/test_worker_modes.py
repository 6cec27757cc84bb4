"""The two modes of the one worker on one store: a standalone run next to a real agent.

A standalone run's worker leases its step runs like an agent's, and an agent's reaper looks
at every lapsed lease in the store, whoever holds it. So a standalone step that runs longer
than its lease must have its lease renewed by its run's heartbeat, or the agent next door
records it lost and stops the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import aeventor as evr

from .agents import Agents, within

pytestmark = pytest.mark.timeout(90)

#: The lease of both the agent and the standalone run, in seconds.
LEASE = 2.0
#: How long the standalone step runs: more than twice the lease.
OUTLIVE = 2.5 * LEASE


def outlive_the_lease(seconds: float, value: str) -> dict[str, object]:
    """A process step longer than its lease: sleep ``seconds``, then return ``value``."""
    began = time.monotonic()
    time.sleep(seconds)
    return {"value": value, "slept": time.monotonic() - began}


async def check_standalone_next_to_agent(store: str, agents: Agents, tmp_path: Path) -> None:
    # The agent serves a host no step of the run names; its reaper runs every lease/2.
    agent = await agents.start(store, "other", args=["--lease", f"{LEASE:g}", "--heartbeat", "0.5"])
    ev = evr.Eventor(name="outlive", store=store, lease=LEASE, log_dir=tmp_path / "logs")
    start = ev.add_event("start")
    step = ev.add_step("long", func=outlive_the_lease, kwargs={"seconds": OUTLIVE, "value": "kept"})
    ev.add_assoc(start, step)
    ev.trigger_event(start)

    result = await within(ev.run(), what="the standalone run", deadline=OUTLIVE + 30)

    assert result.ok, (result.status, result.reason, [(s.step, s.error) for s in result])
    long = result.step("long")
    assert long.status is evr.StepStatus.success, long.error
    assert long.result["value"] == "kept", long.result
    assert long.result["slept"] >= OUTLIVE, long.result
    # The agent's reaper ran all along and found nothing lapsed.
    assert agent.proc.returncode is None, agent.log()
    assert agent.records("step.lost") == [], agent.log()
    assert not [r for r in agent.records() if r.get("run_id") == result.run_id], agent.log()


@pytest.mark.postgres
async def test_standalone_step_longer_than_its_lease_next_to_an_agent_postgres(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    await check_standalone_next_to_agent(pg_store, agents, tmp_path)


@pytest.mark.mysql
async def test_standalone_step_longer_than_its_lease_next_to_an_agent_mariadb(
    mysql_store: str, agents: Agents, tmp_path: Path
) -> None:
    await check_standalone_next_to_agent(mysql_store, agents, tmp_path)
