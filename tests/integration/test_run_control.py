"""Controlling runs: start() and its handle, cancel (no process left behind), run_sync()."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores.base import Database
from aeventor.exceptions import AeventorError, ProgramDefinitionError

from . import stepfuncs
from .helpers import (
    DEADLINE,
    count_runs,
    pid_alive,
    rendezvous,
    session_members,
    step_status,
    steps_of,
    wait_event,
    wait_until,
)

MakeEventor = Callable[..., evr.Eventor]
S = evr.StepStatus


async def noop() -> str:
    return "noop"


async def test_start_wait_and_live_handle(make_eventor: MakeEventor) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def gate() -> str:
        entered.set()
        await wait_event(release, what="the test to open the gate")
        return "opened"

    ev = make_eventor()
    ev.add_event("start")
    extra = ev.add_event("extra")
    ev.add_step("gate", func=gate)
    ev.add_step("extra_step", func=noop)
    ev.add_assoc("start", "gate")
    ev.add_assoc(extra, "extra_step")
    ev.trigger_event("start")

    handle = ev.start()
    assert isinstance(handle.run_id, str) and len(handle.run_id) == 32
    await wait_event(entered, what="the gate step to start")
    assert handle.status is evr.RunStatus.running
    assert not handle.done()
    with pytest.raises(AeventorError, match="while a run is live"):
        ev.trigger_event(extra, 7)
    with pytest.raises(ProgramDefinitionError, match="undefined event 'nope'"):
        await handle.trigger_event("nope")
    await handle.trigger_event(extra, 7)  # into the live run
    release.set()
    async with asyncio.timeout(DEADLINE):
        result = await handle.wait()

    assert result, result.reason
    assert result.run_id == handle.run_id
    assert handle.status is evr.RunStatus.success
    assert handle.done()
    assert steps_of(result) == [("extra_step", "7", "success"), ("gate", "0", "success")]
    assert result.step("gate").result == "opened"
    assert (await handle.wait()).run_id == result.run_id  # waiting again returns the result
    with pytest.raises(AeventorError, match="has ended"):
        await handle.trigger_event(extra, 8)


async def test_two_runs_started_from_one_eventor(make_eventor: MakeEventor) -> None:
    both = asyncio.Barrier(2)

    async def meet() -> str:
        await rendezvous(both, what="runs of one Eventor")
        return evr.current_step().run_id

    ev = make_eventor()
    ev.add_event("start")
    ev.add_step("meet", func=meet)
    ev.add_assoc("start", "meet")
    ev.trigger_event("start")

    first, second = ev.start(), ev.start()
    async with asyncio.timeout(DEADLINE):
        results = [await first.wait(), await second.wait()]

    assert all(results), [r.reason for r in results]
    assert [r.step("meet").result for r in results] == [first.run_id, second.run_id]
    assert first.run_id != second.run_id


# -- cancel ----------------------------------------------------------------------------


def _read_pids(path: Path) -> tuple[int, int] | None:
    try:
        leader, grandchild = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return int(leader), int(grandchild)


@pytest.mark.parametrize("kind", ["command", "function"])
async def test_cancel_kills_the_step_and_its_grandchild(
    make_eventor: MakeEventor, store_db: Database, tmp_path: Path, kind: str
) -> None:
    pid_file = tmp_path / "pids"
    ev = make_eventor()
    if kind == "command":
        script = f"sleep 300 & echo $$ $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; wait"
        ev.add_step("sleeper", command=["sh", "-c", script])
    else:
        ev.add_step("sleeper", func=stepfuncs.spawn_and_sleep, args=(str(pid_file),))
    ev.add_event("start")
    ev.add_assoc("start", "sleeper")
    ev.trigger_event("start")

    handle = ev.start()

    async def pids_written() -> bool:
        return await asyncio.to_thread(_read_pids, pid_file) is not None

    await wait_until(pids_written, what="the step's pid file")
    pids = await asyncio.to_thread(_read_pids, pid_file)
    assert pids is not None
    leader, grandchild = pids

    async def pid_recorded() -> bool:
        result = await store_db.load_result(handle.run_id)
        return result.step("sleeper").pid == leader

    try:
        await wait_until(pid_recorded, what="the step's pid in the store")
        assert pid_alive(leader) and pid_alive(grandchild)
        assert handle.status is evr.RunStatus.running

        handle.cancel()
        async with asyncio.timeout(DEADLINE):
            result = await handle.wait()

        # SIGKILL is delivered, not synchronous: the group is gone moments later.
        await wait_until(
            lambda: (
                not pid_alive(leader)
                and not pid_alive(grandchild)
                and session_members(leader) == []
            ),
            what="the step's whole session (grandchild and lifeline watcher too) to be gone",
            deadline=5,
        )
    finally:
        # Should the engine leave them behind, do not let them outlive the test.
        for pid in (leader, grandchild, *session_members(leader)):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not result
    assert result.status is evr.RunStatus.cancelled
    assert handle.status is evr.RunStatus.cancelled
    assert result.reason == "cancelled"
    assert result.ended is not None
    assert steps_of(result) == [("sleeper", "0", "cancelled")]
    assert result.step("sleeper").ended is not None
    stored = await store_db.load_result(handle.run_id)
    assert stored.status is evr.RunStatus.cancelled
    assert steps_of(stored) == [("sleeper", "0", "cancelled")]


async def test_cancel_right_after_start(make_eventor: MakeEventor, store_db: Database) -> None:
    """wait() returns a cancelled result even when the run never got to the store."""
    ev = make_eventor()
    ev.add_event("start")
    ev.add_step("s", func=noop)
    ev.add_assoc("start", "s")
    ev.trigger_event("start")

    handle = ev.start()
    handle.cancel()
    async with asyncio.timeout(DEADLINE):
        result = await handle.wait()

    assert not result
    assert result.status is evr.RunStatus.cancelled
    assert result.run_id == handle.run_id
    assert handle.status is evr.RunStatus.cancelled
    assert list(result.steps) == []
    assert await count_runs(store_db) == 0


async def test_cancelling_the_awaiting_task_cancels_the_run(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    """Cancel ``await ev.run()`` itself: an in-loop step and a waiting one end cancelled."""
    run_ids: list[str] = []
    entered = asyncio.Event()

    async def forever() -> None:
        run_ids.append(evr.current_step().run_id)
        entered.set()
        await asyncio.Event().wait()

    ev = make_eventor(max_concurrency=1)
    ev.add_event("start")
    ev.add_step("forever", func=forever)
    ev.add_step("waiting", func=noop)
    ev.add_assoc("start", "forever", "waiting")
    ev.trigger_event("start")

    task = asyncio.create_task(ev.run())
    await wait_event(entered, what="the in-loop step to start")
    (run_id,) = run_ids
    await wait_until(
        lambda: _status_is(store_db, run_id, "forever", S.active), what="forever to be active"
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(DEADLINE):
            await task

    result = await store_db.load_result(run_id)
    assert result.status is evr.RunStatus.cancelled
    assert steps_of(result) == [("forever", "0", "cancelled"), ("waiting", "0", "cancelled")]


async def _status_is(db: Database, run_id: str, step: str, status: evr.StepStatus) -> bool:
    return await step_status(db, run_id, step) is status


# -- run_sync --------------------------------------------------------------------------


def _sync_program(make_eventor: MakeEventor) -> evr.Eventor:
    async def in_loop() -> str:
        return "in loop"

    ev = make_eventor()
    ev.add_event("start")
    ev.add_step("in_loop", func=in_loop)
    ev.add_step("in_process", func=stepfuncs.add, args=(1, 2))
    ev.add_assoc("start", "in_loop", "in_process")
    ev.trigger_event("start")
    return ev


async def test_run_sync_from_a_thread_without_a_loop(make_eventor: MakeEventor) -> None:
    ev = _sync_program(make_eventor)

    result = await asyncio.to_thread(ev.run_sync)

    assert result, result.reason
    assert {s.step: s.result for s in result.steps} == {"in_loop": "in loop", "in_process": 3}


async def test_run_sync_inside_a_loop_and_start_outside_one_raise(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    ev = _sync_program(make_eventor)

    with pytest.raises(AeventorError, match="inside a running event loop"):
        ev.run_sync()
    with pytest.raises(AeventorError, match="needs a running event loop"):
        await asyncio.to_thread(ev.start)

    assert await count_runs(store_db) == 0


def test_run_sync_from_plain_code(make_eventor: MakeEventor) -> None:
    ev = _sync_program(make_eventor)

    result = ev.run_sync()

    assert result, result.reason
    assert steps_of(result) == [("in_loop", "0", "success"), ("in_process", "0", "success")]
