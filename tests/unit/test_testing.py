"""The test doubles of :mod:`aeventor.testing` keep the promises the worker tests rely on."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import aeventor as evr
from aeventor.dispatch import Graph
from aeventor.dispatch.executor import ExecResult, StepLaunch
from aeventor.dispatch.store import StoreTx
from aeventor.dispatch.trust import OwnProgram
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.exceptions import NoResult, UniqueViolation
from aeventor.program.model import RunStatus, StepStatus
from aeventor.testing import FakeClock, FakeExecutor, InMemoryStore


def graph() -> Graph:
    ev = evr.Eventor(name="prog", store=":memory:")
    ev.add_event("start")
    ev.add_event("go")
    ev.add_step("a", triggers={evr.StepStatus.success: ("go",)})
    ev.add_step("b")
    ev.add_assoc("start", "a")
    ev.add_assoc("go", "b")
    return Graph(ev.program)


async def new_run(store: InMemoryStore, g: Graph, run_id: str = "r") -> str:
    program_id = await store.register_program(g.program)
    run_id, _ = await store.create_run(
        g, program_id=program_id, triggers=[("start", "0")], run_id=run_id
    )
    return run_id


async def test_the_module_docstring_example(tmp_path: Path) -> None:
    g = graph()
    store, fake = InMemoryStore(), FakeExecutor()
    program_id = await store.register_program(g.program)
    run_id, _ = await store.create_run(g, program_id=program_id, triggers=[("start", "0")])
    worker = Worker(
        store=store,
        scope=Scope(run_id=run_id),
        config=WorkerConfig(log_dir=tmp_path),
        programs=OwnProgram(g),
        route=lambda step: (fake, step),
    )
    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
        tg.create_task(worker.run())
        await fake.started("a")
        fake.finish("a", value=1)
        fake.finish("b")
    result = await store.load_result(run_id)
    assert result.ok
    assert result.step("a").result == 1


async def test_a_transaction_that_raises_changes_nothing() -> None:
    store = InMemoryStore()
    g = graph()
    run_id = await new_run(store, g)
    before = await store.load_result(run_id)

    async def half_done(tx: StoreTx) -> None:
        await tx.add_triggers(run_id, "0", 0, ["go"])
        await tx.end_run(run_id, RunStatus.failure, "half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await store.write(half_done)
    assert await store.load_result(run_id) == before
    assert await store.fired_events(run_id) == [("start", "0")]


async def test_unique_keys_make_inserts_idempotent_and_runs_unique() -> None:
    store = InMemoryStore()
    g = graph()
    run_id = await new_run(store, g)
    again = await store.trigger(g, run_id=run_id, event="start", sequence="0")
    assert again.ready == 0
    assert [s.step for s in await store.load_result(run_id)] == ["a"]
    with pytest.raises(UniqueViolation):
        await new_run(store, g, run_id=run_id)
    assert await store.register_program(g.program) == await store.register_program(g.program)
    with pytest.raises(NoResult):
        await store.run_status("nope")


async def test_leases_follow_the_injected_clock() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    run_id = await new_run(store, graph())
    [claim] = await store.claim(worker="w", limit=5, run_id=run_id, lease=timedelta(seconds=10))
    assert store.lease_until(claim.id) == clock() + timedelta(seconds=10)
    assert await store.claim(worker="other", limit=5, run_id=run_id) == []
    clock.advance(10)
    assert await store.lapsed_leases() == []  # lapsed means strictly past
    clock.advance(0.001)
    assert await store.lapsed_leases() == [claim]


async def test_heartbeat_returns_held_step_runs_that_are_no_longer_the_workers() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    ev = evr.Eventor(name="pair", store=":memory:")
    ev.add_event("start")
    ev.add_step("a")
    ev.add_step("b")
    ev.add_assoc("start", "a", "b")
    run_id = await new_run(store, Graph(ev.program))
    first, second = await store.claim(worker="w", limit=2, run_id=run_id)
    lease = timedelta(seconds=10)
    beat: dict[str, Any] = {"worker": "w", "hostname": "h", "pid": 1, "hosts": []}
    held = {first.id: first.token, second.id: second.token}
    assert await store.heartbeat(**beat, lease=lease, held=held) == {}
    # A stale token (the step run was taken and claimed again) is not ours any more.
    stale = {first.id: "0" * 32, second.id: second.token}
    assert await store.heartbeat(**beat, lease=lease, held=stale) == {first.id: StepStatus.active}
    await store.cancel_run(run_id, reason="stop")
    assert await store.heartbeat(**beat, lease=lease, held=held) == {
        first.id: StepStatus.cancelled,
        second.id: StepStatus.cancelled,
    }
    assert await store.run_status(run_id) is RunStatus.cancelled


async def test_a_live_workers_step_runs_are_not_lapsed_even_when_their_lease_is() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    run_id = await new_run(store, graph())
    lease = timedelta(seconds=10)
    [claim] = await store.claim(worker="w", limit=1, run_id=run_id, lease=lease)
    beat: dict[str, Any] = {"worker": "w", "hostname": "h", "pid": 1, "hosts": []}
    clock.advance(5)
    await store.heartbeat(**beat, lease=lease, held={})  # alive, but not holding it
    clock.advance(6)
    assert await store.lapsed_leases() == []  # its worker is alive: the worker decides
    assert await store.lapsed_leases(worker="w") == [claim]  # ... and the worker sees it
    clock.advance(10)
    assert await store.lapsed_leases() == [claim]  # the worker's lease lapsed too


async def test_wait_for_run_returns_once_it_ended() -> None:
    store = InMemoryStore()
    g = graph()
    run_id = await new_run(store, g)
    waiter = asyncio.create_task(store.wait_for_run(run_id))
    await asyncio.sleep(0)  # one pass of the loop: the waiter is waiting
    assert not waiter.done()
    await store.cancel_run(run_id, reason="done")
    async with asyncio.timeout(5):
        result = await waiter
    assert result.status is RunStatus.cancelled


async def test_fake_executor_outcomes_pids_and_cancellation(tmp_path: Path) -> None:
    pids: list[int] = []

    async def on_started(pid: int) -> None:
        pids.append(pid)

    def launch(step: str, executor: str, target: str | None) -> StepLaunch:
        from aeventor.dispatch.claims import Claim
        from aeventor.program.model import StepDef

        return StepLaunch(
            claim=Claim(1, "r", step, "0", 0, 1),
            step=StepDef(name=step, executor=executor, target=target),
            program="p",
            env={},
            log_path=tmp_path / "log",
            deterministic_logs=True,
            on_started=on_started,
        )

    fake = FakeExecutor()
    fake.finish("early", ok=False, error="given before launch")
    assert await fake.run(launch("early", "inloop", None)) == ExecResult(
        ok=False, error="given before launch"
    )
    assert pids == []  # no process for an in-loop step

    task = asyncio.create_task(fake.run(launch("p", "process", "m:f")))
    await fake.started("p", deadline=5)
    assert pids and fake.running[0].claim.step == "p"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [x.claim.step for x in fake.cancelled] == ["p"]
    assert fake.running == []

    with pytest.raises(TimeoutError):
        await fake.started("never", deadline=0)

    auto = FakeExecutor(outcome=lambda x: ExecResult(ok=True, value=x.claim.step))
    assert (await auto.run(launch("x", "inloop", None))).value == "x"
    assert auto.results[0][1].value == "x"
    assert auto.peak == 1
