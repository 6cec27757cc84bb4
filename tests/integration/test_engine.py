"""The engine's logic on a real store: expressions, triggers, stopping, sequences, loops.

Steps here are in-loop (``async def``): the point is what fires and what runs, not processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import aeventor as evr
from aeventor.backends.stores import schema as _schema
from aeventor.backends.stores.base import Database
from aeventor.exceptions import ProgramDefinitionError

from .helpers import (
    count_rows,
    count_runs,
    fired,
    rendezvous,
    sequences_of,
    step_status,
    steps_of,
    wait_event,
    wait_until,
)

MakeEventor = Callable[..., evr.Eventor]
S = evr.StepStatus


async def noop() -> None:
    return None


async def boom() -> None:
    raise RuntimeError("boom")


# -- expressions -----------------------------------------------------------------------

# Which events each sequence fires, and for which sequences the derived event must fire.
TRIGGERED = {
    "1": ("a",),
    "2": ("b",),
    "3": ("c",),
    "4": ("a", "b"),
    "5": ("a", "c"),
    "6": ("b", "c"),
    "7": ("a", "b", "c"),
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        pytest.param(("a", "b"), ["4", "7"], id="a-and-b"),
        pytest.param(evr.and_("a", "b", "c"), ["7"], id="and_-of-three"),
        pytest.param(evr.or_("a", "b"), ["1", "2", "4", "5", "6", "7", "x1", "x2"], id="a-or-b"),
        pytest.param(("a", evr.or_("b", "c")), ["4", "5", "7"], id="a-and-(b-or-c)"),
        pytest.param(
            evr.or_(("a", "b"), "c"), ["3", "4", "5", "6", "7", "x2"], id="(a-and-b)-or-c"
        ),
    ],
)
async def test_expression_fires_per_sequence(
    make_eventor: MakeEventor, store_db: Database, expr: Any, expected: list[str]
) -> None:
    ev = make_eventor()
    for name in "abc":
        ev.add_event(name)
    derived = ev.add_event("derived", expr=expr)
    ev.add_step("on_derived", func=noop)
    ev.add_assoc(derived, "on_derived")
    for sequence, events in TRIGGERED.items():
        for event in events:
            ev.trigger_event(event, sequence)
    # Operands spread over two sequences never combine: a for x1, b and c for x2.
    ev.trigger_event("a", "x1")
    ev.trigger_event("b", "x2")
    ev.trigger_event("c", "x2")

    result = await ev.run()

    assert result, result.reason
    assert sequences_of(result, "on_derived") == expected
    events = await store_db.fired_events(result.run_id)
    assert fired(events, "derived") == expected  # once per sequence


async def test_derived_event_waits_for_steps_of_its_own_sequence(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    """Operands fired by steps at different times: the join runs after the last of them."""
    ev = make_eventor()
    start, only_a = ev.add_event("start"), ev.add_event("only_a")
    a, b, c = ev.add_event("a"), ev.add_event("b"), ev.add_event("c")
    joined = ev.add_event("joined", expr=(a, evr.or_(b, c)))
    ev.add_step("left", func=noop, triggers={S.success: a})
    ev.add_step("right", func=noop, triggers={S.success: (b,)})
    ev.add_step("join", func=noop)
    ev.add_assoc(start, "left", "right")
    ev.add_assoc(only_a, "left")
    ev.add_assoc(joined, "join")
    ev.trigger_event(start, 1)
    ev.trigger_event(only_a, 2)  # a fires for 2, b never does: no join for 2

    result = await ev.run()

    assert result, result.reason
    assert steps_of(result) == [
        ("join", "1", "success"),
        ("left", "1", "success"),
        ("left", "2", "success"),
        ("right", "1", "success"),
    ]
    join, left, right = (result.step(name, 1) for name in ("join", "left", "right"))
    assert join.started is not None and left.ended is not None and right.ended is not None
    assert join.started >= max(left.ended, right.ended)
    assert fired(await store_db.fired_events(result.run_id), "joined") == ["1"]


async def test_expression_may_name_events_defined_after_it(make_eventor: MakeEventor) -> None:
    ev = make_eventor()
    both = ev.add_event("both", expr=("later_a", "later_b"))
    ev.add_event("later_a")
    ev.add_event("later_b")
    ev.add_step("on_both", func=noop)
    ev.add_assoc(both, "on_both")
    ev.trigger_event("later_a")
    ev.trigger_event("later_b")

    result = await ev.run()

    assert result, result.reason
    assert steps_of(result) == [("on_both", "0", "success")]


async def test_expression_over_undefined_event_raises_before_anything_is_written(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    ev = make_eventor()
    ev.add_event("a")
    ev.add_event("derived", expr=("a", "missing"))
    ev.add_step("s", func=noop)
    ev.add_assoc("a", "s")
    ev.trigger_event("a")

    with pytest.raises(ProgramDefinitionError, match=r"undefined event 'missing'.*add_event"):
        await ev.run()
    with pytest.raises(ProgramDefinitionError, match="undefined event 'missing'"):
        ev.start()

    assert await count_runs(store_db) == 0
    assert await count_rows(store_db, _schema.program) == 0
    assert await count_rows(store_db, _schema.trigger) == 0


# -- triggers on failure and completion ------------------------------------------------


async def test_failure_and_complete_triggers(make_eventor: MakeEventor, store_db: Database) -> None:
    ev = make_eventor()
    start = ev.add_event("start")
    names = ("bad_ok", "bad_failed", "bad_done", "good_ok", "good_failed", "good_done")
    for name in names:
        ev.add_event(name)
        ev.add_step(f"after_{name}", func=noop)
        ev.add_assoc(name, f"after_{name}")
    ev.add_step(
        "bad",
        func=boom,
        triggers={S.success: "bad_ok", S.failure: "bad_failed", S.complete: "bad_done"},
    )
    ev.add_step(
        "good",
        func=noop,
        triggers={S.success: "good_ok", S.failure: "good_failed", S.complete: "good_done"},
    )
    ev.add_assoc(start, "bad", "good")
    ev.trigger_event(start)

    result = await ev.run()

    # The failure fired a failure trigger: it was handled, and the run succeeded.
    assert result, result.reason
    assert result.reason is None
    assert steps_of(result) == [
        ("after_bad_done", "0", "success"),
        ("after_bad_failed", "0", "success"),
        ("after_good_done", "0", "success"),
        ("after_good_ok", "0", "success"),
        ("bad", "0", "failure"),
        ("good", "0", "success"),
    ]
    events = {name for name, _ in await store_db.fired_events(result.run_id)}
    assert events == {"start", "bad_failed", "bad_done", "good_ok", "good_done"}


async def test_complete_trigger_alone_handles_a_failure(make_eventor: MakeEventor) -> None:
    ev = make_eventor()
    done = ev.add_event("done")
    ev.add_event("start")
    ev.add_step("bad", func=boom, triggers={S.complete: done})
    ev.add_step("cleanup", func=noop)
    ev.add_assoc("start", "bad")
    ev.add_assoc(done, "cleanup")
    ev.trigger_event("start")

    result = await ev.run()

    assert result, result.reason
    assert steps_of(result) == [("bad", "0", "failure"), ("cleanup", "0", "success")]


async def test_unhandled_failure_stops_the_run(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    """Running steps finish, nothing new starts (skipped rows), the result is falsy."""
    release = asyncio.Event()

    async def slow() -> str:
        await wait_event(release, what="the test to release the slow step")
        return "finished"

    ev = make_eventor()
    start, slow_done, late = ev.add_event("start"), ev.add_event("slow_done"), ev.add_event("late")
    ev.add_step("failing", func=boom)
    ev.add_step("slow", func=slow, triggers={S.success: slow_done})
    ev.add_step("after_slow", func=noop)
    ev.add_step("late_step", func=noop)
    ev.add_assoc(start, "failing", "slow")
    ev.add_assoc(slow_done, "after_slow")
    ev.add_assoc(late, "late_step")
    ev.trigger_event(start)

    handle = ev.start()

    async def failure_recorded() -> bool:
        return await step_status(store_db, handle.run_id, "failing") is S.failure

    await wait_until(failure_recorded, what="the failing step's failure to be recorded")
    assert handle.status is evr.RunStatus.running  # slow still runs
    await handle.trigger_event(late)  # a stopped run starts nothing new
    release.set()
    async with asyncio.timeout(30):
        result = await handle.wait()

    assert not result
    assert result.status is evr.RunStatus.failure
    assert handle.status is evr.RunStatus.failure
    assert result.reason is not None and "failing" in result.reason
    assert steps_of(result) == [
        ("after_slow", "0", "skipped"),
        ("failing", "0", "failure"),
        ("late_step", "0", "skipped"),
        ("slow", "0", "success"),
    ]
    assert result.step("slow").result == "finished"
    assert "RuntimeError: boom" in (result.step("failing").error or "")
    assert result.step("after_slow").started is None


# -- sequences -------------------------------------------------------------------------


async def test_two_sequences_run_side_by_side(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    both_running = asyncio.Barrier(2)

    async def first(seq: str) -> str:
        await rendezvous(both_running, what="sequences of step first")
        if seq == "2":
            raise RuntimeError("sequence 2 fails")
        return f"first {seq}"

    async def second() -> str:
        return f"second {evr.current_step().sequence}"

    ev = make_eventor()
    start, ok, failed = ev.add_event("start"), ev.add_event("ok"), ev.add_event("failed")
    ev.add_step(
        "first", func=first, sequence_arg_name="seq", triggers={S.success: ok, S.failure: failed}
    )
    ev.add_step("second", func=second)
    ev.add_step("recover", func=noop)
    ev.add_assoc(start, "first")
    ev.add_assoc(ok, "second")
    ev.add_assoc(failed, "recover")
    ev.trigger_event(start, 1)
    ev.trigger_event(start, 2)

    result = await ev.run()

    assert result, result.reason
    assert steps_of(result) == [
        ("first", "1", "success"),
        ("first", "2", "failure"),
        ("recover", "2", "success"),
        ("second", "1", "success"),
    ]
    assert result.step("first", 1).result == "first 1"
    assert result.step("second", 1).result == "second 1"
    events = await store_db.fired_events(result.run_id)
    assert sorted(events) == [
        ("failed", "2"),
        ("ok", "1"),
        ("start", "1"),
        ("start", "2"),
    ]


async def test_loop_by_retriggering_with_the_next_sequence(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    """A step re-fires its own event with sequence n+1 until a condition holds."""

    async def iterate() -> int:
        step = evr.current_step()
        n = int(step.sequence)
        if n * n < 20:
            await step.trigger("next", sequence=n + 1)
        else:
            await step.trigger("done")
        return n * n

    async def finish() -> str:
        return f"stopped at {evr.current_step().sequence}"

    ev = make_eventor()
    ev.add_event("next")
    ev.add_event("done")
    ev.add_step("iterate", func=iterate)
    ev.add_step("finish", func=finish)
    ev.add_assoc("next", "iterate")
    ev.add_assoc("done", "finish")
    ev.trigger_event("next", 0)

    result = await ev.run()

    assert result, result.reason
    assert sequences_of(result, "iterate") == ["0", "1", "2", "3", "4", "5"]
    assert [result.step("iterate", n).result for n in range(6)] == [0, 1, 4, 9, 16, 25]
    assert sequences_of(result, "finish") == ["5"]
    assert result.step("finish", 5).result == "stopped at 5"
    events = await store_db.fired_events(result.run_id)
    assert fired(events, "next") == ["0", "1", "2", "3", "4", "5"]
    assert fired(events, "done") == ["5"]
