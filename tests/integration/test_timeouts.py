"""Per-step timeouts: a process step that ignores SIGTERM is killed with its child after the
grace period, an in-loop step is cancelled; both fail with a timeout error that fires their
failure triggers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr

from ..waiting import pid_alive, wait_until
from . import stepfuncs

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("executor", ["warm", "process"])
async def test_a_process_step_that_ignores_sigterm_is_killed_with_its_child(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path, executor: str
) -> None:
    report = tmp_path / "stubborn.json"
    ev = make_eventor("timeouts")
    ev.add_event("go")
    ev.add_event("timed_out")
    ev.add_step(
        "stubborn", stepfuncs.stubborn, kwargs={"report": str(report)}, timeout=1,
        triggers={evr.StepStatus.failure: ("timed_out",)}, executor=executor,
    )  # fmt: skip
    ev.add_step("handler")
    ev.add_assoc("go", "stubborn")
    ev.add_assoc("timed_out", "handler")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    pids = json.loads(await asyncio.to_thread(report.read_text))
    step = result.step("stubborn")
    assert step.status is evr.StepStatus.failure
    assert step.error is not None
    assert "TimeoutError: step stubborn[0] ran longer than its timeout of 1s" in step.error
    # Its failure trigger fired; the run handled the failure, so it succeeded.
    assert result.step("handler").status is evr.StepStatus.success
    assert result.ok
    # The group got SIGTERM, ignored it, and was killed after the grace period.
    assert (step.ended - step.started).total_seconds() >= 1
    for pid in (pids["pid"], pids["child"]):

        async def gone(pid: int = pid) -> bool:
            return not await asyncio.to_thread(pid_alive, pid)

        await wait_until(gone, what=f"process {pid} to be gone")


async def test_an_in_loop_step_is_cancelled_at_its_timeout(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    ev = evr.Eventor(name="inloop_timeout", store=":memory:", log_dir=tmp_path / "logs")
    ev.add_event("go")
    ev.add_step("forever", forever, timeout=0.2)
    ev.add_assoc("go", "forever")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert cancelled.is_set()
    assert not result
    assert "timeout of 0.2s" in (result.step("forever").error or "")


def test_a_timeout_must_be_positive() -> None:
    ev = evr.Eventor(name="bad_timeout", store=":memory:")
    with pytest.raises(evr.ProgramDefinitionError, match="timeout=0; give the seconds"):
        ev.add_step("s", command=["true"], timeout=0)
    with pytest.raises(evr.ProgramDefinitionError, match="timeout='1'"):
        ev.add_step("s", command=["true"], config={"timeout": "1"})
    ev.add_step("s", command=["true"], config={"timeout": 2})
    assert ev.program.steps["s"].timeout == 2.0
