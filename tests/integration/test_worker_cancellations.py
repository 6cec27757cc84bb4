"""Cancel an agent's worker at every await point of a step's life, and check what it leaves.

An in-process :class:`~aeventor.dispatch.worker.Worker` scoped to a host's queue (as an
agent's is: signed programs, ``record_abandoned``) runs one process step of a signed
distributed run. Its task is cancelled at one point of the step's life: while it loads the
run's program, as the executor is entered, while the step's process is being spawned, while
its start is recorded, while it runs, while its end is recorded, and after. Whatever the
point:

- no step run is left ``active`` unrecorded: the step is ``failure`` with a "terminated"
  reason (``record_abandoned``), or it ended before the cancel landed;
- no process of the run is left (the step and its grandchild, found by their
  ``EVENTOR_RUN_ID``);
- a new worker finishes the run.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import aeventor as evr
from aeventor.backends.executors.local import LocalExecutor
from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import Database
from aeventor.dispatch.trust import SignedPrograms
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.program.model import ProgramDef
from aeventor.submission import submit
from tests.backends import backend_url

from ..waiting import pid_alive
from . import stepfuncs
from .helpers import wait_event, wait_until

S = evr.StepStatus

pytestmark = pytest.mark.timeout(120)

KEY = b"worker-cancellations-cluster-key-0123456789"
HOST = "h"
#: Seconds of the cancelled worker's leases (a claim it left unrecorded lapses this soon).
LEASE = 2.0

#: Where the worker's task is cancelled; the cancel lands at the next await after it.
POINTS = (
    "program",  # loading and verifying the run's program
    "launch",  # entering the executor, before any process
    "spawn",  # inside the start of the step's process
    "started",  # recording the step's start (its process runs)
    "wait",  # once the start is recorded: waiting for the process
    "complete",  # recording the step's end (its process is gone)
    "completed",  # after its end was recorded
)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = open_store(url, program="worker-cancellations")
    async with database:
        yield database


def program(report: Path, release: Path, executor: str | None = None) -> ProgramDef:
    """``work`` holds until released; its success runs ``after``, its failure ``recover``.
    ``work`` runs as ``executor`` (default: a plain function's, ``warm``)."""
    ev = evr.Eventor(name="cancel_worker", mode="distributed", cluster_key=KEY)
    start, done, lost = ev.add_event("start"), ev.add_event("done"), ev.add_event("lost")
    ev.add_step(
        "work",
        host=HOST,
        func=stepfuncs.hold,
        kwargs={"report": str(report), "release": str(release)},
        triggers={S.success: (done,), S.failure: (lost,)},
        executor=executor,
    )
    ev.add_step("after", host=HOST, func=stepfuncs.add, kwargs={"a": 1, "b": 2})
    ev.add_step("recover", host=HOST, func=stepfuncs.add, kwargs={"a": 2, "b": 2})
    ev.add_assoc(start, "work")
    ev.add_assoc(done, "after")
    ev.add_assoc(lost, "recover")
    ev.trigger_event(start)
    return ev.program


def run_processes(run_id: str) -> list[str]:
    """Live processes whose environment carries ``EVENTOR_RUN_ID=run_id`` (the run's steps
    and everything they started), each as ``pid state step cmdline``."""
    needle = f"EVENTOR_RUN_ID={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if needle in environ and state not in ("Z", "X"):
            step = next((v for v in environ if v.startswith(b"EVENTOR_STEP_NAME=")), b"")
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry} {state} {step.decode()} {argv}")
    return found


@dataclass
class Hooks:
    """Cancels the worker's task (and the step's) at one point of the step's life."""

    point: str
    worker_task: asyncio.Task[None] | None = None
    hit: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel_here(self, point: str) -> None:
        if point != self.point or self.hit.is_set():
            return
        self.hit.set()
        step_task = asyncio.current_task()
        assert step_task is not None and self.worker_task is not None
        step_task.cancel()
        self.worker_task.cancel()

    def wrap(
        self, before: str | None, after: str | None, func: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                self.cancel_here(before)
            value = await func(*args, **kwargs)
            if after is not None:
                self.cancel_here(after)
            return value

        return wrapped


def make_worker(
    db: Database, executor: LocalExecutor, log_dir: Path, **config: Any
) -> tuple[Worker, SignedPrograms]:
    programs = SignedPrograms(db, key=KEY, allow=("tests.*",))
    worker = Worker(
        store=db,
        scope=Scope(hosts=(HOST,)),
        config=WorkerConfig(record_abandoned=True, log_dir=log_dir, **config),
        programs=programs,
        route=lambda step: (executor, step),
    )
    return worker, programs


async def cancel_at(
    point: str, db: Database, tmp_path: Path, executor_name: str | None = None
) -> None:
    work_dir = tmp_path / point
    await asyncio.to_thread(work_dir.mkdir)
    report, release = work_dir / "report", work_dir / "release"
    run_id = await submit(db, program(report, release, executor_name), [("start", "0")], key=KEY)
    # "hold" returns once released: released from the start where the cancel must come
    # after the step's end, never where it must come while the step runs.
    if point in ("complete", "completed"):
        await asyncio.to_thread(release.touch)

    executor = LocalExecutor()
    worker, programs = make_worker(db, executor, tmp_path / "logs", lease=LEASE)
    hooks = Hooks(point)
    programs.graph_for = hooks.wrap("program", None, programs.graph_for)  # type: ignore[method-assign]
    db.started = hooks.wrap("started", "wait", db.started)  # type: ignore[method-assign]
    db.complete = hooks.wrap("complete", "completed", db.complete)  # type: ignore[method-assign]
    executor.run = hooks.wrap("launch", None, executor.run)  # type: ignore[method-assign]
    executor._start = hooks.wrap("spawn", None, executor._start)  # type: ignore[method-assign]
    # A warm step's start: the request to the warm pool's zygote, until the child's pid.
    assert executor._warm is not None
    executor._warm.start = hooks.wrap("spawn", None, executor._warm.start)  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(worker.run())
        hooks.worker_task = task
        await wait_event(hooks.hit, what=f"the step to reach {point!r}")
        await asyncio.wait([task], timeout=30)
        assert task.done(), f"the worker cancelled at {point!r} did not end"
        assert task.cancelled() or task.exception() is None, task.exception()
    finally:
        del db.started, db.complete
        await executor.aclose()

    # Nothing left running. The lifeline watcher of a step that ended normally exits on its
    # own once told, a moment after its step: wait for that, briefly.
    left: list[str] = []

    def reported() -> list[str]:
        # A warm step (forked, its environment set after the fork) keeps its zygote's in
        # /proc/PID/environ: the pids it reported name it.
        try:
            pids = report.read_text().split()
        except FileNotFoundError:
            return []
        return [f"{pid} (reported by the step)" for pid in pids if pid_alive(int(pid))]

    async def gone() -> bool:
        left[:] = await asyncio.to_thread(run_processes, run_id)
        left.extend(await asyncio.to_thread(reported))
        return not left

    try:
        await wait_until(gone, what="the run's processes to exit", deadline=2)
    except AssertionError:
        raise AssertionError(f"cancelled at {point!r}, the run left processes: {left}") from None
    # Nothing left active unrecorded.
    result = await db.load_result(run_id)
    work = [s for s in result.steps if s.step == "work"]
    assert [s for s in result.steps if s.status is S.active] == [], (point, result.steps)
    if work and work[0].status is S.failure:
        assert work[0].error is not None and work[0].error.startswith("terminated:"), (
            point,
            work[0].error,
        )

    # A new worker finishes the run.
    await asyncio.to_thread(release.touch)
    executor = LocalExecutor()
    worker, _ = make_worker(db, executor, tmp_path / "logs", lease=LEASE, reap=True)
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run(stop))

            async def ended() -> bool:
                return await db.run_status(run_id) is not evr.RunStatus.running

            try:
                await wait_until(
                    ended, what=f"a new worker to finish the run cancelled at {point!r}"
                )
            finally:
                stop.set()
    finally:
        await executor.aclose()
    result = await db.load_result(run_id)
    assert [s for s in result.steps if s.status in (S.ready, S.active)] == [], (point, result)
    # Every failure is a step the cancelled worker terminated; one with no failure trigger
    # ("after") ends the run in failure, as any failed step would.
    failed = [s for s in result.steps if s.status is S.failure]
    assert all(s.error and s.error.startswith("terminated:") for s in failed), (point, failed)
    statuses = {s.step: s.status for s in result.steps}
    assert statuses in (
        {"work": S.success, "after": S.success},
        {"work": S.success, "after": S.failure},
        {"work": S.failure, "recover": S.success},
    ), (point, statuses)
    assert result.ok is (S.failure not in (statuses.get("after"), statuses.get("recover"))), (
        point,
        result.status,
        result.reason,
    )


@pytest.mark.parametrize("point", POINTS)
async def test_cancel_the_worker_at_every_point_of_a_step(
    point: str, db: Database, tmp_path: Path
) -> None:
    await cancel_at(point, db, tmp_path)


@pytest.mark.parametrize("point", ["spawn", "wait"])
async def test_cancel_the_worker_at_the_start_of_a_fresh_process_step(
    point: str, db: Database, tmp_path: Path
) -> None:
    """``executor="process"``: a fresh interpreter, started by the worker itself."""
    await cancel_at(point, db, tmp_path, "process")
