"""The recovery transaction on every store (in-memory, sqlite, Postgres, MariaDB): what a new
recovery generation carries over, runs again and keeps; reruns; refusals; two recoveries at
once. Step runs are claimed and completed by hand, so each scenario says exactly what ran."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.dispatch import Graph
from aeventor.dispatch.store import Store
from aeventor.exceptions import NoResult, NothingToRecover, RunStillRunning
from aeventor.program.model import RunStatus, StepStatus
from aeventor.testing import InMemoryStore

S = StepStatus.success


def program(*, b_recovery: str | None = None) -> Graph:
    """go -> a, b; b's success -> c; a's and c's success (derived ``both``) -> d."""
    ev = evr.Eventor(name="recovery", store=":memory:")
    ev.add_event("go")
    for event in ("a_ok", "b_ok", "c_ok"):
        ev.add_event(event)
    ev.add_event("both", expr=("a_ok", "c_ok"))
    ev.add_step("a", triggers={S: ("a_ok",)})
    ev.add_step("b", triggers={S: ("b_ok",)}, recovery=b_recovery)
    ev.add_step("c", triggers={S: ("c_ok",)})
    ev.add_step("d")
    ev.add_assoc("go", "a", "b")
    ev.add_assoc("b_ok", "c")
    ev.add_assoc("both", "d")
    return Graph(ev.program)


async def start(store: Store, graph: Graph) -> str:
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    return run_id


async def drive(
    store: Store, graph: Graph, run_id: str, outcomes: dict[str, StepStatus] | None = None
) -> list[str]:
    """Claim and complete the run's step runs until none is ready; return the steps run."""
    outcomes = outcomes or {}
    ran: list[str] = []
    while claims := await store.claim(worker="w", limit=10, run_id=run_id):
        for claim in claims:
            ran.append(claim.step)
            await store.complete(graph, claim, status=outcomes.get(claim.step, S))
    return ran


async def ran_in(store: Store, run_id: str, recovery: int) -> list[tuple[str, str]]:
    result = await store.load_result(run_id)
    return [(s.step, s.status.value) for s in result.steps if s.recovery == recovery]


async def recover_reruns_only_what_did_not_succeed(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    assert sorted(await drive(store, graph, run_id, {"b": StepStatus.failure})) == ["a", "b"]
    assert await store.run_status(run_id) is RunStatus.failure

    recovery = await store.recover(graph, run_id, generation=0)
    assert (recovery.recovery, recovery.rerun, recovery.superseded) == (1, (("b", "0"),), 0)
    assert await store.run_status(run_id) is RunStatus.running
    # a succeeded and is kept; b reruns; c follows, and d (a_ok carried, c_ok new).
    assert await drive(store, graph, run_id) == ["b", "c", "d"]
    result = await store.load_result(run_id)
    assert (result.status, result.recovery, result.reason) == (RunStatus.success, 1, None)
    assert await ran_in(store, run_id, 0) == [("a", "success"), ("b", "failure")]
    # Each event once, though every generation carries those fired before it.
    fired = await store.fired_events(run_id)
    assert len(fired) == len(set(fired)) == 5


async def rerun_runs_the_step_and_what_follows_it(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    await drive(store, graph, run_id)
    assert await store.run_status(run_id) is RunStatus.success

    recovery = await store.recover(graph, run_id, generation=0, rerun=("c", "0"))
    assert recovery.rerun == (("c", "0"),)
    assert await drive(store, graph, run_id) == ["c", "d"]
    assert await store.run_status(run_id) is RunStatus.success

    with pytest.raises(NoResult, match=r"no step run zz\[0\].*a\[0\]"):
        await store.recover(graph, run_id, generation=1, rerun=("zz", "0"))


async def a_succeeded_run_has_nothing_to_recover(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    await drive(store, graph, run_id)
    with pytest.raises(NothingToRecover, match="succeeded"):
        await store.recover(graph, run_id, generation=0)
    assert (await store.load_result(run_id)).recovery == 0


async def a_skip_policy_keeps_the_failure(store: Store) -> None:
    graph = program(b_recovery="skip")
    run_id = await start(store, graph)
    await drive(store, graph, run_id, {"b": StepStatus.failure})
    with pytest.raises(NothingToRecover, match=r"b\[0\].*recovery='skip'"):
        await store.recover(graph, run_id, generation=0)
    assert await store.run_status(run_id) is RunStatus.failure


async def two_recoveries_at_once_recover_once(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    await drive(store, graph, run_id, {"b": StepStatus.failure})
    await store.recover(graph, run_id, generation=0)
    # The second read the run at generation 0 too, before the first committed.
    with pytest.raises(RunStillRunning, match="recovered meanwhile"):
        await store.recover(graph, run_id, generation=0)
    assert await drive(store, graph, run_id) == ["b", "c", "d"]


async def a_live_holder_refuses_and_a_dead_ones_work_is_superseded(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    [held] = await store.claim(worker="dead-worker", limit=1, run_id=run_id)
    with pytest.raises(RunStillRunning, match="dead-worker"):
        await store.recover(graph, run_id, generation=0)

    recovery = await store.recover(graph, run_id, generation=0, dead={"dead-worker"})
    assert recovery.superseded == 2  # the held one lost, the other ready one cancelled
    assert sorted(recovery.rerun) == [("a", "0"), ("b", "0")]
    other = ({"a", "b"} - {held.step}).pop()
    assert sorted(await ran_in(store, run_id, 0)) == sorted(
        [(held.step, "lost"), (other, "cancelled")]
    )
    # The dead worker's late completion changes nothing.
    late = await store.complete(graph, held, status=S)
    assert not late.recorded
    assert sorted(await drive(store, graph, run_id)) == ["a", "b", "c", "d"]
    assert await store.run_status(run_id) is RunStatus.success


async def a_step_that_succeeded_is_not_run_again_by_another_event(store: Store) -> None:
    """``s`` is associated with two events; the first fired it (it succeeded), the second
    only fires after recovery: s is kept, not run a second time."""
    ev = evr.Eventor(name="twice", store=":memory:")
    ev.add_event("go")
    ev.add_event("up_ok")
    ev.add_step("up", triggers={S: ("up_ok",)})
    ev.add_step("s")
    ev.add_assoc("go", "up", "s")
    ev.add_assoc("up_ok", "s")
    graph = Graph(ev.program)
    run_id = await start(store, graph)
    assert sorted(await drive(store, graph, run_id, {"up": StepStatus.failure})) == ["s", "up"]
    await store.recover(graph, run_id, generation=0)
    assert await drive(store, graph, run_id) == ["up"]
    assert await store.run_status(run_id) is RunStatus.success


async def a_cancelled_step_stops_the_run_and_recovery_reruns_it(store: Store) -> None:
    graph = program()
    run_id = await start(store, graph)
    claims = await store.claim(worker="w", limit=10, run_id=run_id)
    assert sorted(c.step for c in claims) == ["a", "b"]
    cancelled = await store.cancel_step(graph, run_id, "a", "0", reason="by hand")
    assert cancelled.recorded and cancelled.run_status is RunStatus.running  # b still runs
    again = await store.cancel_step(graph, run_id, "a", "0", reason="twice")
    assert not again.recorded
    [b] = [c for c in claims if c.step == "b"]
    ended = await store.complete(graph, b, status=S)
    assert ended.run_status is RunStatus.failure  # stopped by the unhandled cancel: no c
    result = await store.load_result(run_id)
    assert "step a[0] was cancelled (by hand)" in (result.reason or "")
    assert result.step("a").error == "by hand"
    # b's success fired b_ok in the stopped run: c was recorded skipped. Both run again.
    recovery = await store.recover(graph, run_id, generation=0)
    assert recovery.rerun == (("a", "0"), ("c", "0"))
    assert await drive(store, graph, run_id) == ["a", "c", "d"]
    assert await store.run_status(run_id) is RunStatus.success


SCENARIOS: list[Callable[[Store], Awaitable[None]]] = [
    recover_reruns_only_what_did_not_succeed,
    rerun_runs_the_step_and_what_follows_it,
    a_succeeded_run_has_nothing_to_recover,
    a_skip_policy_keeps_the_failure,
    two_recoveries_at_once_recover_once,
    a_live_holder_refuses_and_a_dead_ones_work_is_superseded,
    a_step_that_succeeded_is_not_run_again_by_another_event,
    a_cancelled_step_stops_the_run_and_recovery_reruns_it,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_in_memory(scenario: Callable[[Store], Awaitable[None]]) -> None:
    await scenario(InMemoryStore())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_on_sql(scenario: Callable[[Store], Awaitable[None]], store_url: str) -> None:
    async with open_store(store_url, program="recovery") as db:
        await scenario(db)


async def test_a_recovery_whose_acknowledgement_was_lost_is_recognised() -> None:
    store = InMemoryStore()
    graph = program()
    run_id = await start(store, graph)
    await drive(store, graph, run_id, {"b": StepStatus.failure})
    store.lose_acknowledgements(1)
    recovery = await store.recover(graph, run_id, generation=0)
    assert recovery.recovery == 1
    assert await drive(store, graph, run_id) == ["b", "c", "d"]
