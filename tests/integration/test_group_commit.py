"""Group commit on every SQL store: a batch of step runs' ends is a few statements (one
UPDATE per distinct outcome, the fired events in one INSERT), yet each step run gets its own
outcome, a refused one changes nothing, and a join fires once its last operand is recorded."""

from __future__ import annotations

import pytest

import aeventor as evr
from aeventor.backends.stores import base, open_store
from aeventor.dispatch import Graph
from aeventor.dispatch.claims import Taker
from aeventor.dispatch.transactions import Completion
from aeventor.program.model import RunStatus, StepStatus

from ..unit.test_group_commit import fan_out

S, F = StepStatus.success, StepStatus.failure
Eventor = evr.Eventor  # imported here, not in the event loop


async def test_each_step_run_of_a_batch_gets_its_own_outcome(store_url: str) -> None:
    graph = fan_out("a", "b", "c", "d", "e", then="join")
    async with open_store(store_url, program="batch") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        claims = {c.step: c for c in await db.claim(worker="w", limit=9, run_id=run_id)}
        assert sorted(claims) == ["a", "b", "c", "d", "e"]
        # e is cancelled meanwhile: its outcome, in the batch, is refused.
        await db.cancel_step(graph, run_id, "e", "0", reason="test")
        outcomes = [
            Completion(graph, claims["a"], S, 1),
            Completion(graph, claims["b"], S, 1),
            Completion(graph, claims["c"], S, {"k": "v"}),
            Completion(graph, claims["d"], F, None, "boom"),
            Completion(graph, claims["e"], S, 2),
        ]
        advances = await db.complete_many(outcomes)
        assert [a.recorded for a in advances] == [True, True, True, True, False]
        result = await db.load_result(run_id)
        assert result.status is RunStatus.failure  # d failed, and no trigger handles it
        by_step = {s.step: s for s in result.steps}
        assert {k: (s.status, s.result, s.error) for k, s in by_step.items()} == {
            "a": (S, 1, None),
            "b": (S, 1, None),
            "c": (S, {"k": "v"}, None),
            "d": (F, None, "boom"),
            "e": (StepStatus.cancelled, None, by_step["e"].error),
        }
        assert all(by_step[k].ended is not None for k in "abcd")
        fired = {event for event, _ in await db.fired_events(run_id)}
        assert {"a_done", "b_done", "c_done"} <= fired
        assert not {"d_done", "e_done", "all_done"} & fired


@pytest.mark.parametrize("in_limit", [200, 5], ids=["read-by-name", "read-whole-sequence"])
async def test_a_join_fires_in_the_batch_that_records_its_last_operand(
    store_url: str, in_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its operands' state is read by name, or (more than FIRED_IN_LIMIT of them) as all the
    sequence fired: the same answer."""
    monkeypatch.setattr(base, "FIRED_IN_LIMIT", in_limit)
    steps = [f"s{i}" for i in range(30)]
    graph = fan_out(*steps, then="join")
    async with open_store(store_url, program="batch") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        claims = await db.claim(worker="w", limit=100, run_id=run_id)
        assert len(claims) == 30
        # Two batches, the operands in an order unlike their definition's.
        first, second = claims[::2], claims[1::2]
        advances = await db.complete_many([Completion(graph, c, S) for c in reversed(first)])
        assert sum(a.ready for a in advances) == 0
        assert "all_done" not in {e for e, _ in await db.fired_events(run_id)}
        advances = await db.complete_many([Completion(graph, c, S) for c in second])
        assert sum(a.ready for a in advances) == 1
        fired = [e for e, _ in await db.fired_events(run_id)]
        assert sorted(fired) == sorted(["go", "all_done", *(f"{s}_done" for s in steps)])
        [join] = await db.claim(worker="w", limit=5, run_id=run_id)
        assert join.step == "join"
        [last] = await db.complete_many([Completion(graph, join, S)])
        assert last.run_status is RunStatus.success


async def test_an_event_that_fired_before_fires_nothing_again(store_url: str) -> None:
    """Postgres and sqlite record a chain's event and learn whether it had fired in one
    INSERT ... RETURNING: one that had (from outside, here) makes nothing ready twice."""
    ev = Eventor(name="again", store=":memory:")
    ev.add_event("go")
    ev.add_event("e")
    ev.add_step("a", triggers={S: ("e",)})
    ev.add_step("b")
    ev.add_assoc("go", "a")
    ev.add_assoc("e", "b")
    graph = Graph(ev.program)
    async with open_store(store_url, program="again") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        [a] = await db.claim(worker="w", limit=5, run_id=run_id)
        fired = await db.trigger(graph, run_id=run_id, event="e", sequence="0")
        assert fired.ready == 1  # b
        again = await db.complete(graph, a, status=S)
        assert again.recorded and again.ready == 0 and not again.claims
        [b] = await db.claim(worker="w", limit=5, run_id=run_id)
        assert b.step == "b" and not await db.claim(worker="w", limit=5, run_id=run_id)
        assert [e for e, _ in await db.fired_events(run_id)].count("e") == 1


async def test_a_batch_fills_the_room_it_frees_with_ready_step_runs(store_url: str) -> None:
    """With ``Taker(ready=True)``, the transaction that records a batch also claims step
    runs that were ready already (its budget's worth, in id order): one transaction per
    round of a worker, not a claim's and a completion's."""
    graph = fan_out(*(f"s{i}" for i in range(6)))
    async with open_store(store_url, program="batch") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        first = await db.claim(worker="w", limit=2, run_id=run_id)
        take = Taker(worker="w", budget=3, run_id=run_id, ready=True)
        advances = await db.complete_many([Completion(graph, c, S) for c in first], take=take)
        taken = [c for a in advances for c in a.claims]
        assert [c.step for c in taken] == ["s2", "s3", "s4"]
        assert {c.token for c in taken} == {take.token}
        # They are ours: their outcomes are recorded, and the run ends with the last one.
        last = await db.claim(worker="w", limit=5, run_id=run_id)
        assert [c.step for c in last] == ["s5"]
        done = await db.complete_many([Completion(graph, c, S) for c in [*taken, *last]])
        assert all(a.recorded for a in done) and done[-1].run_status is RunStatus.success


async def test_one_outcome_ends_its_step_run_and_reads_its_run_in_one_go(store_url: str) -> None:
    """Postgres ends a step run and locks its run in one UPDATE ... FROM; an outcome that is
    no longer the claimer's (cancelled meanwhile) is refused all the same."""
    graph = fan_out("a", "b")
    async with open_store(store_url, program="batch") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        claims = {c.step: c for c in await db.claim(worker="w", limit=5, run_id=run_id)}
        await db.cancel_step(graph, run_id, "b", "0", reason="test")
        refused = await db.complete(graph, claims["b"], status=S, result=7)
        assert not refused.recorded and refused.run_status is RunStatus.running
        done = await db.complete(graph, claims["a"], status=S, result=8)
        assert done.recorded and done.run_status is RunStatus.failure  # b was cancelled
        steps = {s.step: s for s in (await db.load_result(run_id)).steps}
        assert (steps["a"].status, steps["a"].result) == (S, 8)
        assert steps["b"].status is StepStatus.cancelled and steps["b"].result is None
