"""Cancelling one step run: from the run's handle (terminated at once, no process left) and
from another process (``aeventor cancel RUN STEP``: at the controller's next heartbeat), on
every store; the run reacts as to a failure of the step."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr

from ..waiting import pid_alive, wait_until, within
from . import stepfuncs

pytestmark = pytest.mark.timeout(60)

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))
F = evr.StepStatus.failure


def program(
    make_eventor: Callable[..., evr.Eventor], pid_file: Path, *, handled: bool, **kwargs: object
) -> evr.Eventor:
    ev = make_eventor("cancel_step", **kwargs)
    ev.add_event("go")
    ev.add_event("stopped")
    triggers = {F: ("stopped",)} if handled else {}
    ev.add_step(
        "sleeper", stepfuncs.spawn_and_sleep, kwargs={"pid_file": str(pid_file)},
        triggers=triggers,
    )  # fmt: skip
    ev.add_step("handler")
    ev.add_assoc("go", "sleeper")
    ev.add_assoc("stopped", "handler")
    ev.trigger_event("go")
    return ev


async def pids(pid_file: Path) -> list[int]:
    async def written() -> bool:
        return await asyncio.to_thread(pid_file.exists)

    await wait_until(written, what="the step to start")
    return [int(p) for p in (await asyncio.to_thread(pid_file.read_text)).split()]


async def all_gone(found: list[int]) -> None:
    for pid in found:

        async def gone(pid: int = pid) -> bool:
            return not await asyncio.to_thread(pid_alive, pid)

        await wait_until(gone, what=f"process {pid} to be gone")


async def test_cancel_step_from_the_handle_terminates_it_and_fires_its_failure_triggers(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    ev = program(make_eventor, pid_file, handled=True)
    async with ev:
        handle = ev.start()
        found = await pids(pid_file)
        await handle.cancel_step("sleeper", reason="operator said so")
        result = await within(handle.wait(), what="the run")
        with pytest.raises(evr.AeventorError, match="has ended"):
            await handle.cancel_step("sleeper")
    await all_gone(found)
    sleeper = result.step("sleeper")
    assert (sleeper.status, sleeper.error) == (evr.StepStatus.cancelled, "operator said so")
    assert result.step("handler").status is evr.StepStatus.success
    assert result.ok


async def test_an_unhandled_cancel_stops_the_run(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    ev = program(make_eventor, pid_file, handled=False)
    async with ev:
        handle = ev.start()
        await pids(pid_file)
        with pytest.raises(evr.ProgramDefinitionError, match="no step 'nope'"):
            await handle.cancel_step("nope")
        await handle.cancel_step("sleeper")
        # Nothing else was pending: the run ended in the cancel's own transaction.
        result = await within(handle.wait(), what="the run")
        with pytest.raises(evr.AeventorError, match="has ended"):
            await handle.cancel_step("sleeper")
    assert result.status is evr.RunStatus.failure
    assert "step sleeper[0] was cancelled" in (result.reason or "")
    assert result.step("sleeper").status is evr.StepStatus.cancelled


async def test_cancel_step_from_another_process(
    make_eventor: Callable[..., evr.Eventor], store_url: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    ev = program(make_eventor, pid_file, handled=True, lease=3)
    async with ev:
        handle = ev.start()
        found = await pids(pid_file)
        done = await asyncio.to_thread(
            subprocess.run,
            [AEVENTOR, "cancel", handle.run_id[:8], "sleeper", "--store", store_url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "step sleeper of run" in done.stdout and "cancelled" in done.stdout
        # The controller terminates it at its next heartbeat (every second with lease=3).
        result = await within(handle.wait(), what="the run")
    await all_gone(found)
    assert result.step("sleeper").status is evr.StepStatus.cancelled
    assert result.step("handler").status is evr.StepStatus.success
