"""The worker on the in-memory store and the fake executor: claims, leases, reaping, draining,
cancellation, concurrency and trust, without sockets, processes or sleeps.

Leases are measured with a :class:`FakeClock`; heartbeats are driven by calling the worker's
beat directly (the heartbeat and reaper loops are configured far slower than any test).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import aeventor as evr
from aeventor import signing
from aeventor.dispatch import Graph
from aeventor.dispatch.executor import ExecResult
from aeventor.dispatch.trust import OwnProgram, Programs, SignedPrograms
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.exceptions import DatabaseError
from aeventor.program.model import RunStatus, StepStatus
from aeventor.submission import submit
from aeventor.testing import FakeClock, FakeExecutor, InMemoryStore

#: Bounds every wait of a test.
DEADLINE = 5.0
#: Long enough that the heartbeat and reaper loops never run during a test.
LEASE = 60.0
KEY = b"k" * 32


def work(value: str) -> str:
    """A module-level step function: a process step (the fake executor never runs it)."""
    return value


def chain(n: int, *, name: str = "chain", process: bool = False) -> Graph:
    """start -> s0 -> s1 -> ... each step's success fires the next one's event."""
    ev = evr.Eventor(name=name, store=":memory:")
    ev.add_event("start")
    for i in range(n):
        ev.add_event(f"e{i + 1}")
        func = work if process else None
        ev.add_step(
            f"s{i}",
            func=func,
            kwargs={"value": f"v{i}"} if process else None,
            triggers={StepStatus.success: (f"e{i + 1}",)},
        )
        ev.add_assoc("start" if i == 0 else f"e{i}", f"s{i}")
    return Graph(ev.program)


def fan_out(n: int, *, host: str | None = None) -> Graph:
    """start -> s0 .. s{n-1}, side by side."""
    ev = evr.Eventor(name="fan", store=":memory:")
    ev.add_event("start")
    for i in range(n):
        ev.add_step(f"s{i}", host=host)
    ev.add_assoc("start", *[f"s{i}" for i in range(n)])
    return Graph(ev.program)


def with_recovery() -> Graph:
    """s0's failure fires ``recover``, which runs ``fix``: a handled failure."""
    ev = evr.Eventor(name="recover", store=":memory:")
    ev.add_event("start")
    ev.add_event("recover")
    ev.add_step("s0", triggers={StepStatus.failure: ("recover",)})
    ev.add_step("fix")
    ev.add_assoc("start", "s0")
    ev.add_assoc("recover", "fix")
    return Graph(ev.program)


async def new_run(
    store: InMemoryStore, graph: Graph, worker: Worker | None = None, **kwargs: Any
) -> str:
    program_id = await store.register_program(graph.program, signature=kwargs.pop("ps", None))
    run_id, advance = await store.create_run(
        graph,
        program_id=program_id,
        triggers=[("start", "0")],
        take=None if worker is None else worker.taker(),
        **kwargs,
    )
    if worker is not None:
        worker.apply(run_id, advance)
    return run_id


def make_worker(
    store: InMemoryStore,
    graph: Graph,
    fake: FakeExecutor,
    log_dir: Path,
    *,
    run_id: str | None = None,
    hosts: Sequence[str] | None = None,
    programs: Programs | None = None,
    **config: Any,
) -> Worker:
    config.setdefault("lease", LEASE)
    return Worker(
        store=store,
        scope=Scope(run_id=run_id, hosts=None if hosts is None else tuple(hosts)),
        config=WorkerConfig(log_dir=log_dir, **config),
        programs=programs or OwnProgram(graph),
        route=lambda step: (fake, step),
        monotonic=getattr(store.clock, "monotonic", time.monotonic),
    )


@asynccontextmanager
async def running(
    worker: Worker, stop: asyncio.Event | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """Run the worker in the background; on exit, wait (bounded) for it to return."""
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
        async with asyncio.timeout(DEADLINE):
            await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Seen(logging.Handler):
    """Sets an event when the library logs a given event name (``record.event``)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.name_wanted = name
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == self.name_wanted:
            self.seen.set()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], asyncio.Event]]:
    """``logged(name)``: an event set when the library logs ``name``."""
    caplog.set_level(logging.DEBUG, logger="aeventor")
    handlers: list[_Seen] = []
    logger = logging.getLogger("aeventor")

    def make(name: str) -> asyncio.Event:
        handler = _Seen(name)
        handlers.append(handler)
        logger.addHandler(handler)
        return handler.seen

    yield make
    for handler in handlers:
        logger.removeHandler(handler)


def succeed(launch: Any) -> ExecResult:
    return ExecResult(ok=True, value=f"{launch.claim.step}-done")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> InMemoryStore:
    return InMemoryStore(clock=clock)


# -- claim ------------------------------------------------------------------------------------


async def test_a_chain_runs_to_success(store: InMemoryStore, tmp_path: Path) -> None:
    graph = chain(3, process=True)
    fake = FakeExecutor(outcome=succeed)
    run_id = await new_run(store, graph)
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    async with asyncio.timeout(DEADLINE):
        await worker.run()

    result = await store.load_result(run_id)
    assert result.ok, result
    assert [(s.step, s.status, s.result) for s in result] == [
        (f"s{i}", StepStatus.success, f"s{i}-done") for i in range(3)
    ]
    # Process steps report their pid; the worker records it.
    assert all(s.pid is not None and s.worker == worker.id for s in result)
    assert await store.fired_events(run_id) == [("start", "0")] + [
        (f"e{i}", "0") for i in (1, 2, 3)
    ]
    assert [launch.claim.step for launch in fake.launches] == ["s0", "s1", "s2"]


async def test_two_workers_never_run_the_same_step_run(
    store: InMemoryStore, tmp_path: Path
) -> None:
    graph = fan_out(6)
    run_id = await new_run(store, graph)
    fakes = [FakeExecutor(), FakeExecutor()]
    workers = [
        make_worker(store, graph, fake, tmp_path, run_id=run_id, concurrency=3) for fake in fakes
    ]
    async with running(workers[0]), running(workers[1]):
        for fake in fakes:
            await fake.wait_for(lambda fake=fake: len(fake.running) == 3, deadline=DEADLINE)  # type: ignore[misc]
        for fake in fakes:
            for launch in list(fake.running):
                fake.finish(launch.claim.step)

    ids = [launch.claim.id for fake in fakes for launch in fake.launches]
    assert len(ids) == 6 and len(set(ids)) == 6
    result = await store.load_result(run_id)
    assert result.ok
    assert {s.worker for s in result} == {w.id for w in workers}


# -- lost acknowledgements: a retried write finds its own commit ------------------------------


@pytest.mark.parametrize("lost", [1, 2, 3, 4], ids=["create", "s0", "s1", "s2"])
async def test_a_lost_acknowledgement_of_any_write_strands_nothing(
    store: InMemoryStore, tmp_path: Path, lost: int
) -> None:
    """The ``lost``-th write (run creation, claims, starts, completions) commits but its
    acknowledgement is lost; the retry recognises the commit, so every step runs once and
    the run ends."""
    graph = chain(3)
    fake = FakeExecutor(outcome=succeed)
    # Made before its run, as Eventor makes it: the run's creation claims s0 for it.
    worker = make_worker(store, graph, fake, tmp_path, run_id="not yet")
    writes = 0
    original = store.write

    async def counting(operation: Any) -> Any:
        nonlocal writes
        writes += 1
        if writes == lost:
            store.lose_acknowledgements(1)
        return await original(operation)

    store.write = counting  # type: ignore[method-assign]
    run_id = await new_run(store, graph, worker)
    worker.scope = Scope(run_id=run_id)
    async with asyncio.timeout(DEADLINE):
        await worker.run()
    result = await store.load_result(run_id)
    assert result.ok, result
    assert [launch.claim.step for launch in fake.launches] == ["s0", "s1", "s2"]
    assert [s.status for s in result] == [StepStatus.success] * 3


async def test_a_claim_whose_acknowledgement_was_lost_returns_what_it_took(
    store: InMemoryStore,
) -> None:
    graph = fan_out(3)
    run_id = await new_run(store, graph)
    store.lose_acknowledgements(1)
    claims = await store.claim(worker="w", limit=2, run_id=run_id)
    assert len(claims) == 2 and len({c.token for c in claims}) == 1
    assert len(await store.claim(worker="w", limit=5, run_id=run_id)) == 1


async def test_an_agents_worker_serves_through_store_errors(
    store: InMemoryStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    graph = fan_out(2, host="h")
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(store, graph, fake, tmp_path, hosts=["h"], lease=0.4)
    failures = 2
    claim = store.claim

    async def failing_claim(**kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise DatabaseError("deadlock detected (the test's)")
        return await claim(**kwargs)

    store.claim = failing_claim  # type: ignore[method-assign]
    run_id = await new_run(store, graph, mode="distributed")
    async with running(worker, stop := asyncio.Event()):
        async with asyncio.timeout(DEADLINE):
            result = await store.wait_for_run(run_id)
        stop.set()
    assert result.ok
    assert failures == 0
    logged = [r for r in caplog.records if getattr(r, "event", None) == "worker.claim_failed"]
    assert len(logged) == 2


# -- leases: renew and reap -------------------------------------------------------------------


async def test_heartbeats_keep_a_long_step_leased(
    store: InMemoryStore, clock: FakeClock, tmp_path: Path
) -> None:
    graph = chain(1)
    run_id = await new_run(store, graph)
    fake = FakeExecutor()
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id, lease=10.0, heartbeat=9.0)
    reaper = make_worker(store, graph, FakeExecutor(), tmp_path, run_id=run_id)
    async with running(worker):
        launch = await fake.started("s0", deadline=DEADLINE)
        claim_id = launch.claim.id
        first = store.lease_until(claim_id)
        assert first == clock() + timedelta(seconds=10)
        for _ in range(3):  # 24 s in all: far past the first lease
            clock.advance(8)
            await worker._beat()
            assert store.lease_until(claim_id) == clock() + timedelta(seconds=10)
            assert await store.lapsed_leases() == []
            assert await reaper.reap() == 0
        fake.finish("s0")

    result = await store.load_result(run_id)
    assert result.ok
    assert result.step("s0").error is None


async def test_a_lapsed_claim_is_reaped_as_lost_and_its_failure_trigger_fires(
    store: InMemoryStore, clock: FakeClock, tmp_path: Path
) -> None:
    graph = with_recovery()
    run_id = await new_run(store, graph)
    # A worker claims s0, starts its process and dies: nothing renews its lease.
    [claim] = await store.claim(
        worker="gone", limit=1, run_id=run_id, lease=timedelta(seconds=LEASE)
    )
    await store.started(graph, claim, pid=4242)
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    assert await worker.reap() == 0  # the lease holds: not lost yet

    clock.advance(LEASE + 1)
    assert [c.id for c in await store.lapsed_leases()] == [claim.id]
    await worker._beat()  # a reaper judges only while its own beats are regular
    assert await worker.reap() == 1
    lost = (await store.load_result(run_id)).step("s0")
    assert lost.status is StepStatus.lost
    assert lost.error is not None and lost.error.startswith("lost: ")
    assert ("recover", "0") in await store.fired_events(run_id)

    # The failure was handled: the reaping worker runs the fix and the run succeeds.
    async with asyncio.timeout(DEADLINE):
        await worker.run()
    result = await store.load_result(run_id)
    assert result.ok
    assert result.step("fix").status is StepStatus.success
    assert [launch.claim.step for launch in fake.launches] == ["fix"]


async def test_a_lapsed_claim_that_never_started_is_requeued_and_runs_once(
    store: InMemoryStore, clock: FakeClock, tmp_path: Path
) -> None:
    graph = with_recovery()
    run_id = await new_run(store, graph)
    # A worker claims s0 and dies before it starts it: no pid was recorded.
    await store.claim(worker="gone", limit=1, run_id=run_id, lease=timedelta(seconds=LEASE))
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    clock.advance(LEASE + 1)
    await worker._beat()  # a reaper judges only while its own beats are regular
    assert await worker.reap() == 1
    requeued = (await store.load_result(run_id)).step("s0")
    assert requeued.status is StepStatus.ready
    assert requeued.worker is None and requeued.error is None
    assert await store.fired_events(run_id) == [("start", "0")]  # no failure fired

    async with asyncio.timeout(DEADLINE):
        await worker.run()
    result = await store.load_result(run_id)
    assert result.ok
    assert [launch.claim.step for launch in fake.launches] == ["s0"]


async def test_a_reaper_waits_a_lease_after_its_own_heartbeats_stopped(
    store: InMemoryStore, clock: FakeClock, tmp_path: Path
) -> None:
    """After an outage (or a freeze) every owner's lease lapsed; the reaper gives the live
    ones a whole lease to renew theirs before it judges anyone lost."""
    graph = with_recovery()
    run_id = await new_run(store, graph)
    lease = timedelta(seconds=LEASE)
    [claim] = await store.claim(worker="owner", limit=1, run_id=run_id, lease=lease)
    await store.started(graph, claim, pid=4242)
    reaper = make_worker(store, graph, FakeExecutor(), tmp_path, hosts=["h"], reap=True)
    clock.advance(LEASE + 1)
    await reaper._beat()
    clock.advance(3 * LEASE)  # the reaper's beats stopped too: an outage
    assert await reaper.reap() == 0  # its last beat is old: it cannot judge anyone
    await reaper._beat()
    assert await store.lapsed_leases() != []
    assert await reaper.reap() == 0
    held = {claim.id: claim.token}
    await store.heartbeat(worker="owner", hostname="h", pid=1, hosts=["h"], lease=lease, held=held)
    clock.advance(LEASE)
    await reaper._beat()
    assert await store.lapsed_leases() == []  # the owner renewed in time
    assert await reaper.reap() == 0
    assert (await store.load_result(run_id)).step("s0").status is StepStatus.active


async def test_a_lease_renewed_after_it_lapsed_is_not_reaped(
    store: InMemoryStore, clock: FakeClock
) -> None:
    graph = with_recovery()
    run_id = await new_run(store, graph)
    lease = timedelta(seconds=10)
    [claim] = await store.claim(worker="slow", limit=1, run_id=run_id, lease=lease)
    clock.advance(11)
    assert await store.lapsed_leases() != []
    # The worker was only slow: it renews before the reaper records the loss.
    await store.heartbeat(
        worker="slow", hostname="h", pid=1, hosts=[], lease=lease, held={claim.id: claim.token}
    )
    advance = await store.complete(
        graph, claim, status=StepStatus.failure, error="lost", only_if_lapsed=True
    )
    assert not advance.recorded
    assert (await store.load_result(run_id)).step("s0").status is StepStatus.active


# -- drain ------------------------------------------------------------------------------------


async def test_stopping_lets_a_running_step_finish_within_grace(
    store: InMemoryStore, tmp_path: Path, logged: Callable[[str], asyncio.Event]
) -> None:
    graph = chain(2)
    run_id = await new_run(store, graph)
    fake = FakeExecutor()
    draining = logged("worker.draining")
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id, grace=DEADLINE)
    stop = asyncio.Event()
    async with running(worker, stop):
        await fake.started("s0", deadline=DEADLINE)
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await draining.wait()  # stopped claiming: what s0 makes ready stays ready
        fake.finish("s0", value=7)

    result = await store.load_result(run_id)
    assert result.step("s0").status is StepStatus.success
    assert result.step("s0").result == 7
    # Stopping, the worker claimed nothing more: s1 waits for someone else.
    assert result.step("s1").status is StepStatus.ready
    assert result.status is RunStatus.running
    assert fake.cancelled == []


@pytest.mark.parametrize("record_abandoned", [True, False])
async def test_a_step_outliving_grace_is_terminated(
    store: InMemoryStore, tmp_path: Path, record_abandoned: bool
) -> None:
    graph = chain(2)
    run_id = await new_run(store, graph)
    fake = FakeExecutor()
    worker = make_worker(
        store, graph, fake, tmp_path, run_id=run_id, grace=0, record_abandoned=record_abandoned
    )
    stop = asyncio.Event()
    async with running(worker, stop):
        launch = await fake.started("s0", deadline=DEADLINE)
        stop.set()

    assert fake.cancelled == [launch]
    s0 = (await store.load_result(run_id)).step("s0")
    if record_abandoned:
        assert s0.status is StepStatus.failure
        assert s0.error is not None and s0.error.startswith("terminated: ")
        assert "grace" in s0.error
    else:
        # Left to the owner (a standalone run is cancelled as a whole by its owner).
        assert s0.status is StepStatus.active
        assert s0.error is None


# -- cancel -----------------------------------------------------------------------------------


async def test_a_run_cancelled_in_the_store_terminates_its_step_at_the_next_heartbeat(
    store: InMemoryStore, tmp_path: Path
) -> None:
    graph = chain(2)
    run_id = await new_run(store, graph)
    fake = FakeExecutor()
    # record_abandoned: even a worker that records what it terminates leaves cancelled alone.
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id, record_abandoned=True)
    async with running(worker):
        launch = await fake.started("s0", deadline=DEADLINE)
        await store.cancel_run(run_id, reason="cancelled by the test")
        assert fake.cancelled == []  # nothing happens until the worker hears of it
        await worker._beat()
        await fake.wait_for(lambda: fake.cancelled == [launch], deadline=DEADLINE)

    assert worker.status is RunStatus.cancelled
    result = await store.load_result(run_id)
    assert result.status is RunStatus.cancelled
    assert result.reason == "cancelled by the test"
    assert result.step("s0").status is StepStatus.cancelled
    assert [s.step for s in result] == ["s0"]


async def test_a_worker_whose_lease_was_taken_terminates_its_step_and_records_nothing(
    store: InMemoryStore, clock: FakeClock, tmp_path: Path
) -> None:
    """Fencing: a worker frozen past its lease is reaped by another; when it beats again it
    learns its token is stale, terminates its step, and its late outcome is refused."""
    graph = with_recovery()
    fake = FakeExecutor()
    run_id = await new_run(store, graph)
    owner = make_worker(store, graph, fake, tmp_path, run_id=run_id, record_abandoned=True)
    reaper = make_worker(store, graph, FakeExecutor(), tmp_path, run_id=run_id)
    async with running(owner):
        launch = await fake.started("s0", deadline=DEADLINE)
        await store.started(graph, launch.claim, pid=4242)
        # The owner is frozen: its beats stop and its leases lapse; the reaper, beating all
        # along, records the step run lost (its failure trigger makes "fix" ready).
        for _ in range(3):
            clock.advance(LEASE / 2 - 0.1)
            await reaper._beat()
        assert await reaper.reap() == 1
        assert (await store.load_result(run_id)).step("s0").status is StepStatus.lost
        await owner._beat()  # it thaws, and hears its lease was taken
        await fake.wait_for(lambda: fake.cancelled == [launch], deadline=DEADLINE)
        await fake.started("fix", deadline=DEADLINE)
        fake.finish("fix")

    result = await store.load_result(run_id)
    s0 = result.step("s0")
    assert s0.status is StepStatus.lost
    assert s0.error is not None and s0.error.startswith("lost")
    assert result.step("fix").status is StepStatus.success
    assert result.ok


async def test_a_stale_claim_is_never_started(store: InMemoryStore, tmp_path: Path) -> None:
    """Fencing at the start: a claim taken from its worker before the step started (here
    requeued) is not started by it; whoever holds the step run now runs it, once."""
    graph = chain(1, process=True)
    run_id = await new_run(store, graph)
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    [stale] = await store.claim(worker=worker.id, limit=1, run_id=run_id)
    assert (await store.requeue(stale)).recorded
    async with running(worker):
        await fake.started("s0", deadline=DEADLINE)  # claimed again, under a new token
        worker._start(stale)  # the stale claim turns up late (a lost acknowledgement)

    result = await store.load_result(run_id)
    assert result.ok
    assert len(fake.launches) == 1
    assert fake.launches[0].claim.token != stale.token


async def test_a_stale_completion_is_refused_and_the_reapers_outcome_stays(
    store: InMemoryStore, clock: FakeClock
) -> None:
    graph = with_recovery()
    run_id = await new_run(store, graph)
    lease = timedelta(seconds=LEASE)
    [claim] = await store.claim(worker="frozen", limit=1, run_id=run_id, lease=lease)
    await store.started(graph, claim, pid=4242)
    clock.advance(LEASE + 1)
    [lapsed] = await store.lapsed_leases()
    reaped = await store.complete(
        graph, lapsed, status=StepStatus.lost, error="lost: test", only_if_lapsed=True
    )
    assert reaped.recorded
    late = await store.complete(graph, claim, status=StepStatus.success, result=1)
    assert not late.recorded
    s0 = (await store.load_result(run_id)).step("s0")
    assert (s0.status, s0.result, s0.error) == (StepStatus.lost, None, "lost: test")


async def test_a_completion_after_its_run_was_cancelled_is_not_recorded(
    store: InMemoryStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    graph = chain(2)
    run_id = await new_run(store, graph)
    fake = FakeExecutor()
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    caplog.set_level(logging.DEBUG, logger="aeventor")
    async with running(worker):
        await fake.started("s0", deadline=DEADLINE)
        await store.cancel_run(run_id, reason="cancelled")
        fake.finish("s0")  # before any heartbeat told the worker

    assert fake.cancelled == []
    assert any(getattr(r, "event", None) == "step.outcome_refused" for r in caplog.records)
    result = await store.load_result(run_id)
    assert result.step("s0").status is StepStatus.cancelled
    assert [s.step for s in result] == ["s0"]  # s1 never became ready
    assert ("e1", "0") not in await store.fired_events(run_id)


async def test_complete_of_a_cancelled_step_run_says_not_recorded(store: InMemoryStore) -> None:
    graph = chain(2)
    run_id = await new_run(store, graph)
    [claim] = await store.claim(worker="w", limit=1, run_id=run_id)
    await store.cancel_run(run_id, reason="cancelled")
    advance = await store.complete(graph, claim, status=StepStatus.success, result=1)
    assert not advance.recorded
    assert advance.run_status is RunStatus.cancelled
    assert (await store.load_result(run_id)).step("s0").result is None


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrency_limits_a_fan_out(store: InMemoryStore, tmp_path: Path) -> None:
    graph = fan_out(6)
    fake = FakeExecutor()
    worker = make_worker(store, graph, fake, tmp_path, run_id="fan", concurrency=2)
    # The run's first transaction claims up to the worker's capacity, as Eventor does.
    run_id = await new_run(store, graph, worker, run_id="fan")
    finished: set[int] = set()
    async with running(worker):
        while len(finished) < 6:
            await fake.wait_for(
                lambda: any(x.claim.id not in finished for x in fake.running), deadline=DEADLINE
            )
            assert len(fake.running) <= 2
            launch = next(x for x in fake.running if x.claim.id not in finished)
            finished.add(launch.claim.id)
            fake.finish(launch.claim.step)

    assert fake.peak == 2
    result = await store.load_result(run_id)
    assert result.ok
    assert len(result.steps) == 6


async def test_without_a_limit_claiming_waits_while_outcomes_wait_to_be_recorded(
    store: InMemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fan-out claimed faster than its step tasks begin and its outcomes are recorded is
    claimed RECORD_BACKLOG step runs ahead at most (not thousands of step tasks), and goes on
    once the store catches up: every step runs once."""
    from aeventor.dispatch import worker as worker_module

    monkeypatch.setattr(worker_module, "RECORD_BACKLOG", 4)
    monkeypatch.setattr(worker_module, "_UNLIMITED", 2)  # the claim batch
    graph = fan_out(20)
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(store, graph, fake, tmp_path, run_id="fan")
    run_id = await new_run(store, graph, worker, run_id="fan")
    held = asyncio.Event()

    def gated(real: Callable[..., Any]) -> Callable[..., Any]:
        async def wait_then(*args: Any, **kwargs: Any) -> Any:
            await held.wait()
            return await real(*args, **kwargs)

        return wait_then

    monkeypatch.setattr(store, "complete", gated(store.complete))
    monkeypatch.setattr(store, "complete_many", gated(store.complete_many))
    async with running(worker):
        await fake.wait_for(lambda: len(fake.results) >= 4, deadline=DEADLINE)
        for _ in range(100):  # let the claim loop go as far as it would
            await asyncio.sleep(0)
        # Four outcomes wait, and nothing more was claimed.
        assert len(fake.launches) == 4
        assert [s.status for s in (await store.load_result(run_id)).steps].count(
            StepStatus.active
        ) == 4
        held.set()

    result = await store.load_result(run_id)
    assert result.ok
    assert sorted(s.step for s in result.steps) == sorted(f"s{i}" for i in range(20))
    assert len(fake.launches) == 20


# -- trust ------------------------------------------------------------------------------------


async def _on_agent(store: InMemoryStore, graph: Graph, tmp_path: Path, run_id: str) -> Any:
    """Run ``run_id`` to its end on an agent-style worker of host ``h``; (result, executor)."""
    fake = FakeExecutor(outcome=succeed)
    worker = make_worker(
        store,
        graph,
        fake,
        tmp_path,
        hosts=["h"],
        programs=SignedPrograms(store, key=KEY, allow=["*"]),
    )
    stop = asyncio.Event()
    async with running(worker, stop):
        async with asyncio.timeout(DEADLINE):
            result = await store.wait_for_run(run_id)
        stop.set()
    return result, fake


@pytest.mark.parametrize("forged", ["program", "run"])
async def test_a_program_or_run_that_fails_verification_is_refused(
    store: InMemoryStore, tmp_path: Path, forged: str
) -> None:
    graph = fan_out(1, host="h")
    program = graph.program
    good = signing.program_signature(KEY, program)
    program_id = await store.register_program(
        program, signature="0" * 64 if forged == "program" else good
    )
    run_signature = signing.run_signature(
        KEY, run_id="r1", program_id=program_id, version=program.version
    )
    await store.create_run(
        graph,
        program_id=program_id,
        triggers=[("start", "0")],
        run_id="r1",
        mode="distributed",
        signature="0" * 64 if forged == "run" else run_signature,
    )
    result, fake = await _on_agent(store, graph, tmp_path, "r1")

    assert fake.launches == []
    assert result.status is RunStatus.failure
    s0 = result.step("s0")
    assert s0.status is StepStatus.failure
    assert s0.error is not None and "refused" in s0.error
    assert ("run" if forged == "run" else "program") in s0.error


async def test_a_signed_run_runs_on_its_hosts_agent(store: InMemoryStore, tmp_path: Path) -> None:
    graph = fan_out(2, host="h")
    await submit(store, graph.program, [("start", "0")], key=KEY, run_id="r2")
    result, fake = await _on_agent(store, graph, tmp_path, "r2")
    assert result.ok
    assert sorted(x.claim.step for x in fake.launches) == ["s0", "s1"]
