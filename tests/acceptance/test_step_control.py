"""Control of step runs on agents: a step's timeout terminates its whole process group on
the agent's host, and its failure triggers fire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import aeventor as evr
from tests.integration import stepfuncs

from .agents import ALLOW, CLUSTER_KEY, Agents, pid_alive, wait_until, within

pytestmark = pytest.mark.timeout(90)


@pytest.mark.postgres
async def test_a_timeout_on_an_agent_kills_the_step_and_its_child(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    await agents.start(pg_store, "s1", allow=(*ALLOW, "tests.integration.stepfuncs"))
    report = tmp_path / "stubborn.json"
    ev = evr.Eventor(name="timeouts", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    ev.add_event("go")
    ev.add_event("timed_out")
    ev.add_step(
        "stubborn", stepfuncs.stubborn, kwargs={"report": str(report)}, timeout=1, host="s1",
        triggers={evr.StepStatus.failure: ("timed_out",)},
    )  # fmt: skip
    ev.add_step("handler", host="s1")
    ev.add_assoc("go", "stubborn")
    ev.add_assoc("timed_out", "handler")
    ev.trigger_event("go")
    result = await within(ev.run(), what="the run")
    step = result.step("stubborn")
    assert step.status is evr.StepStatus.failure
    assert "ran longer than its timeout of 1s" in (step.error or "")
    assert result.step("handler").status is evr.StepStatus.success
    pids = json.loads(report.read_text())
    for pid in (pids["pid"], pids["child"]):
        await wait_until(lambda pid=pid: not pid_alive(pid), what=f"process {pid} to be gone")


@pytest.mark.postgres
async def test_a_retry_on_an_agent_is_signed_and_run(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    """The agent that recorded the failure signs the next attempt and runs it after its
    backoff; the agents verify each attempt's MAC (it covers the attempt)."""
    await agents.start(pg_store, "s1", allow=(*ALLOW, "tests.integration.stepfuncs"))
    ev = evr.Eventor(name="retries", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    ev.add_event("go")
    ev.add_step(
        "flaky", stepfuncs.fail_until, host="s1",
        kwargs={"counter": str(tmp_path / "count"), "succeed_at": 2},
        retry=evr.Retry(attempts=2, backoff=0.2),
    )  # fmt: skip
    ev.add_assoc("go", "flaky")
    ev.trigger_event("go")
    result = await within(ev.run(), what="the run")
    assert result.ok, [(s.attempt, s.error) for s in result.steps]
    assert [(s.attempt, s.status.value) for s in result.steps] == [
        (1, "failure"), (2, "success"),
    ]  # fmt: skip
