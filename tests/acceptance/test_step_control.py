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


@pytest.mark.postgres
async def test_cancelling_one_step_run_on_an_agent_leaves_no_process(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    await agents.start(pg_store, "s1", allow=(*ALLOW, "tests.integration.stepfuncs"))
    pid_file = tmp_path / "pids"
    ev = evr.Eventor(name="cancelone", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    ev.add_event("go")
    ev.add_event("stopped")
    ev.add_step(
        "sleeper", stepfuncs.spawn_and_sleep, kwargs={"pid_file": str(pid_file)}, host="s1",
        triggers={evr.StepStatus.failure: ("stopped",)},
    )  # fmt: skip
    ev.add_step("handler", host="s1")
    ev.add_assoc("go", "sleeper")
    ev.add_assoc("stopped", "handler")
    ev.trigger_event("go")
    async with ev:
        handle = ev.start()
        await wait_until(pid_file.exists, what="the step to start")
        pids = [int(p) for p in pid_file.read_text().split()]
        await handle.cancel_step("sleeper")
        result = await within(handle.wait(), what="the run")
    for pid in pids:
        await wait_until(lambda pid=pid: not pid_alive(pid), what=f"process {pid} to be gone")
    assert result.step("sleeper").status is evr.StepStatus.cancelled
    assert result.step("handler").status is evr.StepStatus.success


@pytest.mark.postgres
async def test_a_delay_survives_a_restart_of_every_process(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    """The submitter exits at once; the only agent dies before the delay is due; the
    host's next agent reaches it."""
    doomed = await agents.start(pg_store, "s1")
    ev = evr.Eventor(name="delayed", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    ev.add_event("go")
    ev.add_step("first", host="s1")
    ev.add_step("later", host="s1")
    ev.add_assoc("go", "first")
    ev.add_assoc("go", "later", delay=3)
    ev.trigger_event("go")
    async with ev:
        run_id = await ev.submit()

    async def first_done() -> bool:
        result = await evr.run_result(pg_store, run_id)
        return any(s.step == "first" and s.status.value == "success" for s in result.steps)

    await wait_until(first_done, what="the first step")
    doomed.proc.kill()
    await doomed.proc.wait()
    await agents.start(pg_store, "s1")

    async def ended() -> bool:
        return (await evr.run_result(pg_store, run_id)).status is not evr.RunStatus.running

    await wait_until(ended, what="the run to end")
    result = await evr.run_result(pg_store, run_id)
    assert result.ok, result.reason
    assert (result.step("later").created - result.step("first").created).total_seconds() >= 2.9


@pytest.mark.postgres
async def test_a_process_step_on_an_agent_fires_an_event(pg_store: str, agents: Agents) -> None:
    await agents.start(pg_store, "s1", allow=(*ALLOW, "tests.integration.stepfuncs"))
    ev = evr.Eventor(name="stepevents", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    ev.add_event("go")
    ev.add_event("next")
    ev.add_step("looper", stepfuncs.fire_events, args=["next", 2], host="s1")
    ev.add_step("each", host="s1")
    ev.add_assoc("go", "looper")
    ev.add_assoc("next", "each")
    ev.trigger_event("go")
    result = await within(ev.run(), what="the run")
    assert result.ok, [(s.step, s.error) for s in result.steps]
    assert sorted(s.sequence for s in result.steps if s.step == "each") == ["0", "1"]
