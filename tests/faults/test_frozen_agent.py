"""An agent frozen (SIGSTOP) beyond its lease while it runs a step, beside a live agent.

Agent A runs a long step; then a second agent B starts serving the same host queue, and A
is frozen for longer than its lease. B's reaper must take A's step run: record it ``lost``
(it had started; a claim that never started would be requeued) and fire its failure
triggers, which run ``after_loss``. When A is resumed (SIGCONT) it must learn at its next
heartbeat that its lease was taken (the fencing token changed), terminate the step's whole
process group, and have its late completion refused and logged: the database keeps B's
record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

import aeventor as evr
from tests.acceptance.agents import CLUSTER_KEY, Agents, pid_alive, session_members, wait_until

from . import steps
from .checks import (
    S,
    assert_exactly_once,
    assert_nothing_active,
    describe,
    final_result,
    finish,
)

pytestmark = pytest.mark.timeout(120)

LEASE = 3.0
#: Seconds the run may take once A is frozen: B reaps within about 1.5 leases.
RUN_DEADLINE = 30.0
#: Seconds A has, once resumed, to notice and terminate its step (a few heartbeats).
FENCE_DEADLINE = 10.0
#: How a resumed worker may log that its lease was taken or its late outcome refused (any
#: of these, naming the step or its step run).
REFUSAL_EVENTS = {"step.lease_lost", "step.outcome_refused", "step.outcome_not_recorded"}


def program(store: str, journal: Path, report: Path, log_dir: Path) -> evr.Eventor:
    ev = evr.Eventor(
        name="frozen", store=store, log_dir=log_dir, mode="distributed", cluster_key=CLUSTER_KEY
    )
    start, lost = ev.add_event("start"), ev.add_event("lost")
    ev.add_step(
        "long",
        host="h1",
        func=steps.record_then_sleep,
        kwargs={"journal": str(journal), "name": "long", "report": str(report)},
        triggers={S.failure: (lost,)},
    )
    ev.add_step(
        "after_loss",
        host="h1",
        func=steps.record,
        kwargs={"journal": str(journal), "name": "after_loss"},
    )
    ev.add_assoc(start, "long")
    ev.add_assoc(lost, "after_loss")
    ev.trigger_event(start)
    return ev


def _read_json(path: Path) -> dict[str, int] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


@pytest.mark.postgres
async def test_frozen_agent_loses_its_step_and_kills_it(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    store = pg_store
    journal, report = tmp_path / "journal", tmp_path / "long.json"
    timing = ["--lease", str(LEASE), "--heartbeat", "0.5"]
    frozen = await agents.start(store, "h1", allow=["tests.faults.*"], args=timing)
    ev = program(store, journal, report, tmp_path / "logs")
    pids: dict[str, int] | None = None
    resumed = False
    try:
        async with ev:
            handle = ev.start()

            async def long_started() -> bool:
                return await asyncio.to_thread(report.exists)

            await wait_until(long_started, what="A to start the long step")
            pids = await asyncio.to_thread(_read_json, report)
            assert pids is not None
            live = await agents.start(store, "h1", allow=["tests.faults.*"], args=timing)
            frozen.proc.send_signal(signal.SIGSTOP)
            result = await finish(
                handle, store=store, fault="agent A frozen", deadline=RUN_DEADLINE
            )
            # B has recorded the outcome; now A comes back.
            frozen.proc.send_signal(signal.SIGCONT)
            resumed = True
            step = pids

            def step_gone() -> bool:
                # The step, its child, and anything else in its session (its lifeline watcher).
                return (
                    not pid_alive(step["pid"])
                    and not pid_alive(step["child"])
                    and not session_members(step["pid"])
                )

            await wait_until(
                step_gone,
                what="the resumed agent A to terminate its lost step's whole session",
                deadline=FENCE_DEADLINE,
            )

            long_id = result.step("long").id

            async def refusal_logged() -> bool:
                records = await asyncio.to_thread(frozen.records)
                return any(
                    r.get("event") in REFUSAL_EVENTS
                    and (r.get("step") == "long" or r.get("step_run_id") == long_id)
                    for r in records
                )

            await wait_until(
                refusal_logged,
                what=f"A to log that its late outcome of 'long' was refused ({REFUSAL_EVENTS})",
                deadline=FENCE_DEADLINE,
            )
    finally:
        if not resumed:
            with contextlib.suppress(ProcessLookupError):
                frozen.proc.send_signal(signal.SIGCONT)
        if pids is not None:
            for pid in (pids["child"], pids["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # The database keeps the reaper's outcome, not A's late one.
    final = await final_result(store, result.run_id)
    long = final.step("long")
    assert long.status is S.lost, describe(final)
    assert long.error is not None and "lease" in long.error, long.error
    assert frozen.ran(long.worker), long.worker
    after = final.step("after_loss")
    assert after.status is S.success, describe(final)
    assert live.ran(after.worker), after.worker
    assert final.status is evr.RunStatus.success, describe(final)
    await assert_exactly_once(journal, ["long", "after_loss"])
    await assert_nothing_active(store)
    # Both agents live on.
    assert frozen.proc.returncode is None and live.proc.returncode is None
