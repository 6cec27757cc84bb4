"""A start fenced by the executor (``StepLaunch.fence``, the warm pool's): one write records
the step's real pid while the claim is still the worker's, and nothing of the step runs
unless it did. On the in-memory store and a fake executor that fences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aeventor.dispatch import Graph
from aeventor.dispatch.claims import Advance, Claim
from aeventor.dispatch.executor import ExecResult, StepLaunch
from aeventor.program.model import StepDef, StepStatus
from aeventor.testing import FakeExecutor, InMemoryStore

from .test_worker import DEADLINE, chain, make_worker, new_run, running, succeed

#: The pid the fencing executor reports for every step.
PID = 4242


class FencingExecutor(FakeExecutor):
    """A fake executor that, as the warm pool, holds a step back until its fence says so."""

    def __init__(self) -> None:
        super().__init__(outcome=succeed)
        #: ``(token, fence's answer)`` of each launch.
        self.fenced: list[tuple[str | None, bool]] = []

    def fences(self, step: StepDef) -> bool:
        return True

    async def run(self, launch: StepLaunch) -> ExecResult:
        assert launch.fence is not None
        go = await launch.fence(PID)
        self.fenced.append((launch.claim.token, go))
        self._changes.changed()
        if not go:
            return ExecResult(ok=False, error="fenced out")

        async def already_started(pid: int) -> None:
            """(The fake reports a pid of its own to ``on_started``: the fence recorded it.)"""

        return await super().run(dataclasses.replace(launch, on_started=already_started))


class CountingStore(InMemoryStore):
    """Counts the start's writes: ``launching`` (pid 0) and ``started`` (with a pid)."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[int] = []

    async def launching(self, claim: Claim) -> bool:
        self.pids.append(0)
        return await super().launching(claim)

    async def started(self, graph: Graph, claim: Claim, *, pid: int | None = None) -> Advance:
        if pid is not None:
            self.pids.append(pid)
        return await super().started(graph, claim, pid=pid)


async def test_a_fenced_start_is_one_write_of_the_real_pid(tmp_path: Path) -> None:
    store = CountingStore()
    graph = chain(2, process=True)
    run_id = await new_run(store, graph)
    fake = FencingExecutor()
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    async with running(worker):
        pass

    result = await store.load_result(run_id)
    assert result.ok
    # No pid 0 first (``launching``): the one write is the fence's, with the real pid.
    assert store.pids == [PID, PID]
    assert [go for _, go in fake.fenced] == [True, True]
    assert all(result.step(s).pid == PID for s in ("s0", "s1"))


async def test_a_stale_claim_is_fenced_out_and_runs_nowhere_twice(tmp_path: Path) -> None:
    """A claim taken from its worker before its process was let go (here requeued) is
    fenced out: its process runs nothing, the worker records nothing; whoever holds the
    step run now runs it, once."""
    store = InMemoryStore()
    graph = chain(1, process=True)
    run_id = await new_run(store, graph)
    fake = FencingExecutor()
    worker = make_worker(store, graph, fake, tmp_path, run_id=run_id)
    [stale] = await store.claim(worker=worker.id, limit=1, run_id=run_id)
    assert (await store.requeue(stale)).recorded
    async with running(worker):
        await fake.started("s0", deadline=DEADLINE)  # claimed again, under a new token
        worker._start(stale)  # the stale claim turns up late (a lost acknowledgement)
        await fake.wait_for(lambda: len(fake.fenced) == 2, deadline=DEADLINE)

    result = await store.load_result(run_id)
    assert result.ok
    assert result.step("s0").status is StepStatus.success
    [(token, go)] = [f for f in fake.fenced if f[0] != stale.token]
    assert go and token is not None
    assert (stale.token, False) in fake.fenced
    # Only the fenced-in launch ran (the fake executor saw it); the stale one stopped at
    # its fence.
    assert [launch.claim.token for launch in fake.launches] == [
        token for token, go in fake.fenced if go
    ]
