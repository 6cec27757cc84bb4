"""A distributed run whose agent died, recovered from the command line: the dead agent's
step run is recorded lost and queued again, and the host's new agent runs it and what
follows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import aeventor as evr

from . import distprog
from .agents import CLUSTER_KEY, Agents, subprocess_env, wait_until, within

pytestmark = pytest.mark.timeout(90)

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))


@pytest.mark.postgres
async def test_a_run_whose_agent_died_is_recovered_by_its_agents(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    doomed = await agents.start(pg_store, "s1")
    report = tmp_path / "once.json"
    ev = evr.Eventor(name="agentdied", store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
    go, slept = ev.add_event("go"), ev.add_event("slept")
    ev.add_step(
        "once", host="s1", func=distprog.sleep_once, kwargs={"report": str(report)},
        triggers={evr.StepStatus.success: (slept,)},
    )  # fmt: skip
    ev.add_step("after", host="s1", func=distprog.where, kwargs={"progname": "after"})
    ev.add_assoc(go, "once")
    ev.add_assoc(slept, "after")
    ev.trigger_event(go)
    run_id = await ev.submit()
    await wait_until(report.exists, what="the step to start sleeping")
    pids = json.loads(report.read_text())
    try:
        doomed.proc.kill()  # SIGKILL: its step run stays active under its lease
        await doomed.proc.wait()
        await agents.start(pg_store, "s1")  # the host's new agent
        recover = await asyncio.create_subprocess_exec(
            AEVENTOR, "recover", run_id[:8], "--store", pg_store, env=subprocess_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await within(recover.communicate(), what="aeventor recover")
    finally:
        for pid in (pids["child"], pids["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert recover.returncode == 0, err.decode()
    assert f"run {run_id}: success" in out.decode()
    result = await evr.run_result(pg_store, run_id)
    assert result.ok and result.recovery == 1, result.reason
    once = [(s.recovery, s.status.value) for s in result.steps if s.step == "once"]
    # Lost in the first generation (by the recovery, or by a reaper first), then rerun.
    assert once == [(0, "lost"), (1, "success")], once
    assert result.step("after").recovery == 1
    assert result.step("after").status is evr.StepStatus.success
