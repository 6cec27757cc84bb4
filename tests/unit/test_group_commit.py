"""Group commit: several step runs' ends in one transaction, each with all it causes, the
run settled once; an outcome refused (its step run cancelled meanwhile) changes nothing."""

from __future__ import annotations

import aeventor as evr
from aeventor.dispatch import Graph
from aeventor.dispatch.claims import Taker
from aeventor.dispatch.transactions import Completion
from aeventor.program.model import RunStatus, StepStatus
from aeventor.testing import InMemoryStore

S = StepStatus.success
Eventor = evr.Eventor  # imported here, not in the event loop


def fan_out(*steps: str, then: str | None = None) -> Graph:
    ev = Eventor(name="batch", store=":memory:")
    ev.add_event("go")
    ev.add_event("all_done", tuple(f"{s}_done" for s in steps) if then else None)
    for step in steps:
        ev.add_event(f"{step}_done")
        ev.add_step(step, triggers={S: (f"{step}_done",)})
        ev.add_assoc("go", step)
    if then:
        ev.add_step(then)
        ev.add_assoc("all_done", then)
    return Graph(ev.program)


async def test_a_batch_records_each_end_and_what_it_causes() -> None:
    store = InMemoryStore()
    graph = fan_out("a", "b", "c", then="join")
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    claims = await store.claim(worker="w", limit=5, run_id=run_id)
    assert sorted(c.step for c in claims) == ["a", "b", "c"]
    advances = await store.complete_many([Completion(graph, c, S) for c in claims])
    assert len(advances) == 3 and all(a.recorded for a in advances)
    assert sum(a.ready for a in advances) == 1  # the AND event made the join ready
    [join] = await store.claim(worker="w", limit=5, run_id=run_id)
    [last] = await store.complete_many([Completion(graph, join, S)])
    assert last.run_status is RunStatus.success
    assert await store.run_status(run_id) is RunStatus.success


async def test_the_run_ends_once_its_last_completion_in_the_batch_is_recorded() -> None:
    store = InMemoryStore()
    graph = fan_out("a", "b")
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    claims = await store.claim(worker="w", limit=5, run_id=run_id)
    advances = await store.complete_many([Completion(graph, c, S) for c in claims])
    assert [a.run_status for a in advances] == [RunStatus.running, RunStatus.success]
    assert await store.run_status(run_id) is RunStatus.success


async def test_a_refused_last_outcome_still_lets_the_run_end() -> None:
    """b was cancelled meanwhile (its run stopped: no failure trigger); a's end, in the same
    batch as b's refused one, is the run's last: the run ends."""
    store = InMemoryStore()
    graph = fan_out("a", "b")
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    claims = {c.step: c for c in await store.claim(worker="w", limit=5, run_id=run_id)}
    cancelled = await store.cancel_step(graph, run_id, "b", "0", reason="test")
    assert cancelled.recorded and cancelled.run_status is RunStatus.running  # a still runs
    a, b = await store.complete_many([Completion(graph, claims[k], S) for k in ("a", "b")])
    assert a.recorded and not b.recorded
    assert await store.run_status(run_id) is RunStatus.failure
    assert RunStatus.failure in (a.run_status, b.run_status)


async def test_a_batch_claims_what_was_ready_with_the_budget_left() -> None:
    store = InMemoryStore()
    graph = fan_out("a", "b", "c", "d")
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    [a] = await store.claim(worker="w", limit=1, run_id=run_id)
    take = Taker(worker="w", budget=2, run_id=run_id, ready=True)
    [advance] = await store.complete_many([Completion(graph, a, S)], take=take)
    assert [c.step for c in advance.claims] == ["b", "c"]
    # Without ready=True, nothing that was ready already is taken.
    [b, c] = advance.claims
    [plain] = await store.complete_many(
        [Completion(graph, b, S)], take=Taker(worker="w", budget=5, run_id=run_id)
    )
    assert plain.claims == ()
    assert [x.step for x in await store.claim(worker="w", limit=5, run_id=run_id)] == ["d"]
    del c
