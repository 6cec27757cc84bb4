"""Tests for the engine's pure state machine (aeventor.dispatch._state)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

import aeventor as evr
from aeventor.dispatch._state import (
    FirePlan,
    Graph,
    StepOutcome,
    check_transition,
    final_run_status,
)
from aeventor.program import expr as _expr
from aeventor.program.model import EventDef, ProgramDef, RunStatus, StepDef, StepStatus

S = StepStatus


def build(
    *,
    events: Iterable[str] = (),
    derived: Mapping[str, Any] | None = None,
    steps: Mapping[str, Mapping[StepStatus, Iterable[str]]] | Iterable[str] = (),
    assocs: Mapping[str, Iterable[str]] | None = None,
    stop_on_exception: bool = True,
) -> Graph:
    """A validated program's graph.

    ``derived`` maps an event to the expression it is derived from (as a user writes it);
    ``steps`` maps a step to its triggers (or lists steps without triggers); an assoc
    target is a step when a step has that name, else an event.
    """
    event_defs = {name: EventDef(name) for name in events}
    for name, expr in (derived or {}).items():
        event_defs[name] = EventDef(name, _expr.normalize(expr))
    step_triggers = steps if isinstance(steps, Mapping) else {name: {} for name in steps}
    step_defs = {
        name: StepDef(
            name=name,
            executor="process",
            triggers={status: tuple(fired) for status, fired in triggers.items()},
        )
        for name, triggers in step_triggers.items()
    }
    assoc_defs = {
        event: tuple(("step" if t in step_defs else "event", t) for t in targets)
        for event, targets in (assocs or {}).items()
    }
    program = ProgramDef(
        name="prog",
        events=event_defs,
        steps=step_defs,
        assocs=assoc_defs,
        stop_on_exception=stop_on_exception,
    )
    program.validate()
    return Graph(program)


def fire_each(graph: Graph, order: Iterable[str]) -> tuple[set[str], list[FirePlan]]:
    """Fire events one call at a time, as separate transactions would."""
    fired: set[str] = set()
    plans = []
    for event in order:
        plan = graph.fire(frozenset(fired), [event])
        fired.update(plan.events)
        plans.append(plan)
    return fired, plans


# --- fan-out -------------------------------------------------------------------------------


def test_an_event_fans_out_to_steps_in_order() -> None:
    graph = build(events=["a"], steps=["s1", "s2", "s3"], assocs={"a": ["s2", "s1", "s3"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a",), steps=("s2", "s1", "s3"))


def test_an_event_without_associations_fires_alone() -> None:
    graph = build(events=["a", "b"], steps=["s"], assocs={"b": ["s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a",), steps=())


def test_an_event_fans_out_to_events_and_their_steps() -> None:
    graph = build(
        events=["a", "b", "c"],
        steps=["s1", "s2"],
        assocs={"a": ["b", "c"], "b": ["s1"], "c": ["s2"]},
    )
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "b", "c"), steps=("s1", "s2"))


def test_a_chain_of_events_is_followed_to_the_end() -> None:
    names = [f"e{i}" for i in range(10)]
    assocs = {a: [b] for a, b in itertools.pairwise(names)}
    graph = build(events=names, steps=["last"], assocs={**assocs, "e9": ["last"]})
    assert graph.fire(set(), ["e0"]) == FirePlan(events=tuple(names), steps=("last",))


def test_firing_nothing_does_nothing() -> None:
    graph = build(events=["a"], steps=["s"], assocs={"a": ["s"]})
    assert graph.fire(set(), []) == FirePlan(events=(), steps=())


def test_several_new_events_fire_in_the_given_order() -> None:
    graph = build(events=["a", "b"], steps=["sa", "sb"], assocs={"a": ["sa"], "b": ["sb"]})
    assert graph.fire(set(), ["b", "a"]) == FirePlan(events=("b", "a"), steps=("sb", "sa"))


def test_a_step_reached_twice_is_made_ready_once() -> None:
    graph = build(events=["a", "b"], steps=["s"], assocs={"a": ["s", "b"], "b": ["s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "b"), steps=("s",))


def test_an_event_named_twice_fires_once() -> None:
    graph = build(events=["a"], steps=["s"], assocs={"a": ["s"]})
    assert graph.fire(set(), ["a", "a"]) == FirePlan(events=("a",), steps=("s",))


def test_a_cycle_of_events_terminates() -> None:
    graph = build(events=["a", "b"], steps=["s"], assocs={"a": ["b"], "b": ["a", "s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "b"), steps=("s",))


def test_fire_does_not_mutate_the_fired_set() -> None:
    graph = build(events=["a", "b"], assocs={"a": ["b"]})
    fired = {"x"}
    graph.fire(fired, ["a"])
    assert fired == {"x"}


# --- idempotence ---------------------------------------------------------------------------


def test_an_event_already_fired_is_not_refired() -> None:
    graph = build(events=["a", "b"], steps=["s"], assocs={"a": ["s", "b"]})
    assert graph.fire({"a", "b"}, ["a"]) == FirePlan(events=(), steps=())


def test_an_already_fired_downstream_event_is_not_refired() -> None:
    graph = build(
        events=["a", "b", "c"], steps=["s1", "s2"], assocs={"a": ["s1", "b"], "b": ["s2", "c"]}
    )
    assert graph.fire({"b"}, ["a"]) == FirePlan(events=("a",), steps=("s1",))


def test_firing_the_same_event_again_after_its_plan_is_a_no_op() -> None:
    graph = build(events=["a", "b"], steps=["s"], assocs={"a": ["b", "s"]})
    first = graph.fire(set(), ["a"])
    assert graph.fire(set(first.events), ["a"]) == FirePlan(events=(), steps=())


# --- ready triggers --------------------------------------------------------------------------


def test_ready_triggers_of_steps_made_ready_are_followed() -> None:
    graph = build(
        events=["a", "r", "r2"],
        steps={"s1": {S.ready: ["r"]}, "s2": {S.ready: ["r2"]}, "s3": {}},
        assocs={"a": ["s1"], "r": ["s2"], "r2": ["s3"]},
    )
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "r", "r2"), steps=("s1", "s2", "s3"))


def test_other_triggers_are_not_followed_when_a_step_is_made_ready() -> None:
    triggers = {S.active: ["x"], S.success: ["y"], S.failure: ["z"], S.complete: ["w"]}
    graph = build(events=["a", "x", "y", "z", "w"], steps={"s": triggers}, assocs={"a": ["s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a",), steps=("s",))


def test_a_ready_trigger_can_complete_a_derived_event() -> None:
    graph = build(
        events=["a", "b", "r"],
        derived={"d": ("b", "r")},
        steps={"s": {S.ready: ["r"]}, "t": {}},
        assocs={"a": ["s"], "d": ["t"]},
    )
    assert graph.fire({"b"}, ["a"]) == FirePlan(events=("a", "r", "d"), steps=("s", "t"))


def test_a_ready_trigger_firing_its_own_event_terminates() -> None:
    graph = build(events=["a"], steps={"s": {S.ready: ["a"]}}, assocs={"a": ["s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a",), steps=("s",))


# --- derived events ------------------------------------------------------------------------


def test_an_and_fires_only_when_its_last_operand_fires() -> None:
    graph = build(events=["a", "b"], derived={"d": ("a", "b")}, steps=["s"], assocs={"d": ["s"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a",), steps=())
    assert graph.fire({"a"}, ["b"]) == FirePlan(events=("b", "d"), steps=("s",))


def test_an_and_fires_when_its_operands_fire_together() -> None:
    graph = build(events=["a", "b"], derived={"d": ("a", "b")}, steps=["s"], assocs={"d": ["s"]})
    assert graph.fire(set(), ["a", "b"]) == FirePlan(events=("a", "b", "d"), steps=("s",))


def test_an_or_fires_on_its_first_operand_and_only_once() -> None:
    graph = build(
        events=["a", "b"], derived={"d": evr.or_("a", "b")}, steps=["s"], assocs={"d": ["s"]}
    )
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "d"), steps=("s",))
    assert graph.fire({"a", "d"}, ["b"]) == FirePlan(events=("b",), steps=())


def test_an_or_whose_operands_fire_together_fires_once() -> None:
    graph = build(
        events=["a", "b"], derived={"d": evr.or_("a", "b")}, steps=["s"], assocs={"d": ["s"]}
    )
    assert graph.fire(set(), ["a", "b"]) == FirePlan(events=("a", "b", "d"), steps=("s",))


def test_a_derived_event_already_fired_is_not_refired() -> None:
    graph = build(events=["a", "b"], derived={"d": ("a", "b")}, steps=["s"], assocs={"d": ["s"]})
    assert graph.fire({"a", "d"}, ["b"]) == FirePlan(events=("b",), steps=())


def test_a_derived_event_may_be_derived_from_derived_events() -> None:
    graph = build(
        events=["a", "b", "c"],
        derived={"d1": evr.or_("a", "b"), "d2": ("d1", "c")},
        steps=["s1", "s2"],
        assocs={"d1": ["s1"], "d2": ["s2"]},
    )
    assert graph.fire(set(), ["c"]) == FirePlan(events=("c",), steps=())
    assert graph.fire({"c"}, ["b"]) == FirePlan(events=("b", "d1", "d2"), steps=("s1", "s2"))


def test_a_derived_event_fans_out_to_events() -> None:
    graph = build(
        events=["a", "b", "x"],
        derived={"d": ("a", "b")},
        steps=["s"],
        assocs={"d": ["x"], "x": ["s"]},
    )
    assert graph.fire({"a"}, ["b"]) == FirePlan(events=("b", "d", "x"), steps=("s",))


def test_an_event_reached_through_fan_out_completes_a_derived_event() -> None:
    graph = build(events=["a", "b", "c"], derived={"d": ("b", "c")}, assocs={"a": ["b", "c"]})
    assert graph.fire(set(), ["a"]) == FirePlan(events=("a", "b", "c", "d"), steps=())


def test_a_join_shared_by_interleaved_runs_fires_at_each_runs_last_operand() -> None:
    """Each check of an AND starts where the last one (of any run) found an operand missing:
    only a hint, whatever order and however many runs share the program."""
    names = [f"e{i}" for i in range(12)]
    graph = build(events=names, derived={"d": tuple(names)}, steps=["s"], assocs={"d": ["s"]})
    rng = random.Random(7)
    for _ in range(30):
        orders = [rng.sample(names, len(names)) for _ in range(3)]
        fired: list[set[str]] = [set(), set(), set()]
        for step in range(len(names)):
            for run in rng.sample(range(3), 3):
                event = orders[run][step]
                plan = graph.fire(frozenset(fired[run]), [event])
                fired[run].update(plan.events)
                last = step == len(names) - 1
                assert ("d" in plan.events) is last, (run, step)
                assert plan.steps == (("s",) if last else ())


NESTED = {
    "and": ("a", "b", "c"),
    "or": evr.or_("a", "b", "c"),
    "and-of-or": ("a", evr.or_("b", "c")),
    "or-of-and": evr.or_(("a", "b"), "c"),
    "deep": evr.or_(("a", evr.or_("b", ("c", "a"))), ("b", "c")),
}


@pytest.mark.parametrize("expr", NESTED.values(), ids=NESTED.keys())
def test_a_derived_event_fires_exactly_when_its_expression_holds_and_once(expr: Any) -> None:
    graph = build(events=["a", "b", "c"], derived={"d": expr}, steps=["s"], assocs={"d": ["s"]})
    normalized = _expr.normalize(expr)
    for size in range(4):
        for order in itertools.permutations("abc", size):
            fired, plans = fire_each(graph, order)
            expected = 1 if _expr.holds(normalized, set(order)) else 0
            assert [e for p in plans for e in p.events].count("d") == expected, order
            assert [s for p in plans for s in p.steps].count("s") == expected, order
            # The step follows the event, in the same plan.
            for plan in plans:
                assert ("d" in plan.events) == ("s" in plan.steps)
            assert ("d" in fired) is bool(expected)


# --- facts_needed ------------------------------------------------------------------------


def test_facts_needed_covers_the_walk_and_expression_operands() -> None:
    graph = build(
        events=["a", "r", "x", "unrelated"],
        derived={"d": ("r", "x")},
        steps={"s": {S.ready: ["r"]}},
        assocs={"a": ["s"]},
    )
    facts = graph.facts_needed(["a"])
    assert {"a", "r", "d", "x"} <= facts
    assert "unrelated" not in facts


def test_facts_needed_includes_the_new_events_and_derived_dependents() -> None:
    graph = build(events=["a", "b"], derived={"d": evr.or_("a", "b")})
    assert graph.facts_needed(["a"]) >= {"a", "b", "d"}


def test_facts_needed_of_nothing_is_empty() -> None:
    graph = build(events=["a"])
    assert graph.facts_needed([]) == frozenset()


def test_facts_needed_is_the_union_over_events() -> None:
    graph = build(events=["a", "b", "x", "y"], assocs={"a": ["x"], "b": ["y"]})
    both = graph.facts_needed(["a", "b"])
    assert both == graph.facts_needed(["a"]) | graph.facts_needed(["b"])
    assert graph.facts_needed(["a", "b"]) == both  # asked again (cached): same answer


def test_facts_needed_ignores_success_triggers() -> None:
    graph = build(
        events=["a", "done", "other"],
        derived={"d": ("done", "other")},
        steps={"s": {S.success: ["done"]}},
        assocs={"a": ["s"]},
    )
    assert graph.facts_needed(["a"]).isdisjoint({"done", "d", "other"})


# --- random programs: facts_needed and fire against a reference --------------------------


def random_expr(rng: random.Random, names: list[str], depth: int = 0) -> Any:
    if depth >= 2 or rng.random() < 0.4:
        return rng.choice(names)
    operands = [random_expr(rng, names, depth + 1) for _ in range(rng.randint(1, 3))]
    return evr.or_(*operands) if rng.random() < 0.5 else tuple(operands)


def random_graph(rng: random.Random) -> Graph:
    events = [f"e{i}" for i in range(rng.randint(2, 7))]
    derived_names = [f"d{i}" for i in range(rng.randint(0, 3))]
    all_events = events + derived_names
    derived = {}
    for name in derived_names:
        others = [e for e in all_events if e != name]
        derived[name] = random_expr(rng, others)
    steps = {}
    for i in range(rng.randint(0, 4)):
        triggers = {}
        for status in (S.ready, S.active, S.success, S.failure, S.complete):
            if rng.random() < 0.3:
                triggers[status] = rng.sample(all_events, rng.randint(1, 2))
        steps[f"s{i}"] = triggers
    assocs = {}
    for event in all_events:
        if rng.random() < 0.6:
            targets = all_events + list(steps)
            assocs[event] = list(dict.fromkeys(rng.choices(targets, k=rng.randint(1, 3))))
    return build(events=events, derived=derived, steps=steps, assocs=assocs)


def reference_closure(graph: Graph, fired: set[str], new: Iterable[str]) -> set[str]:
    """Every event fired once ``new`` fires: a fixpoint, computed the slow way."""
    program = graph.program
    result = set(fired) | set(new)
    while True:
        grown = set(result)
        for event in result:
            for kind, target in program.assocs.get(event, ()):
                if kind == "event":
                    grown.add(target)
                else:
                    grown.update(program.steps[target].triggers.get(S.ready, ()))
        for event in program.events.values():
            if event.expr is not None and _expr.holds(event.expr, result):
                grown.add(event.name)
        if grown == result:
            return result
        result = grown


SEEDS = range(300)


@pytest.mark.parametrize("seed", SEEDS)
def test_fire_on_random_programs_matches_a_reference(seed: int) -> None:
    rng = random.Random(seed)
    graph = random_graph(rng)
    names = list(graph.program.events)
    fired: set[str] = set()
    for _ in range(4):
        new = rng.sample(names, rng.randint(1, 2))
        plan = graph.fire(frozenset(fired), new)
        expected = reference_closure(graph, fired, new) - fired
        assert set(plan.events) == expected
        assert len(plan.events) == len(set(plan.events))
        expected_steps = {
            target
            for event in plan.events
            for kind, target in graph.program.assocs.get(event, ())
            if kind == "step"
        }
        assert set(plan.steps) == expected_steps
        assert len(plan.steps) == len(set(plan.steps))
        fired |= set(plan.events)


@pytest.mark.parametrize("seed", SEEDS)
def test_fire_needs_only_the_facts_it_declares(seed: int) -> None:
    rng = random.Random(seed)
    graph = random_graph(rng)
    names = list(graph.program.events)
    fired: set[str] = set()
    for _ in range(4):
        new = rng.sample(names, rng.randint(1, 2))
        plan = graph.fire(frozenset(fired), new)
        needed = graph.facts_needed(new)
        assert graph.fire(frozenset(fired) & needed, new) == plan
        assert set(plan.events) <= needed
        fired |= set(plan.events)


# --- trigger_events and step_outcome -----------------------------------------------------


def triggered(triggers: Mapping[StepStatus, Iterable[str]], **kwargs: Any) -> Graph:
    events = sorted({e for fired in triggers.values() for e in fired})
    return build(events=events, steps={"s": triggers}, **kwargs)


@pytest.mark.parametrize("status", [S.success, S.failure])
def test_success_and_failure_also_fire_complete_triggers(status: StepStatus) -> None:
    graph = triggered({status: ["x"], S.complete: ["c"]})
    assert graph.trigger_events("s", status) == ("x", "c")


@pytest.mark.parametrize("status", [S.success, S.failure])
def test_complete_triggers_alone_fire_on_success_and_failure(status: StepStatus) -> None:
    graph = triggered({S.complete: ["c1", "c2"]})
    assert graph.trigger_events("s", status) == ("c1", "c2")


@pytest.mark.parametrize("status", [S.success, S.failure])
def test_trigger_events_are_deduplicated(status: StepStatus) -> None:
    graph = triggered({status: ["x", "y", "x"], S.complete: ["y", "z", "z"]})
    assert graph.trigger_events("s", status) == ("x", "y", "z")


def test_success_does_not_fire_failure_triggers_and_vice_versa() -> None:
    graph = triggered({S.success: ["ok"], S.failure: ["bad"]})
    assert graph.trigger_events("s", S.success) == ("ok",)
    assert graph.trigger_events("s", S.failure) == ("bad",)


@pytest.mark.parametrize("status", [S.ready, S.active])
def test_ready_and_active_fire_only_their_own_triggers(status: StepStatus) -> None:
    graph = triggered({status: ["own"], S.complete: ["c"], S.success: ["ok"]})
    assert graph.trigger_events("s", status) == ("own",)


def test_skipped_fires_nothing() -> None:
    every = {st: [f"on_{st.value}"] for st in (S.ready, S.active, S.success, S.failure)}
    graph = triggered({**every, S.complete: ["c"]})
    assert graph.trigger_events("s", S.skipped) == ()


def test_a_step_run_cancelled_on_its_own_fires_what_a_failure_fires() -> None:
    """(A run's cancel cancels its step runs without asking the graph: nothing fires.)"""
    every = {st: [f"on_{st.value}"] for st in (S.ready, S.active, S.success, S.failure)}
    graph = triggered({**every, S.complete: ["c"]})
    assert graph.trigger_events("s", S.cancelled) == ("on_failure", "c")
    assert graph.step_outcome("s", S.cancelled).stop_run is False  # handled


@pytest.mark.parametrize("status", list(StepStatus))
def test_a_step_without_triggers_fires_nothing(status: StepStatus) -> None:
    graph = build(steps=["s"])
    assert graph.trigger_events("s", status) == ()
    assert graph.step_outcome("s", status).events == ()


@pytest.mark.parametrize(
    ("triggers", "stop_on_exception", "stop_run"),
    [
        ({}, True, True),
        ({}, False, False),
        ({S.success: ["ok"]}, True, True),
        ({S.ready: ["r"], S.active: ["a"]}, True, True),
        ({S.failure: []}, True, True),
        ({S.failure: ["bad"]}, True, False),
        ({S.complete: ["c"]}, True, False),
        ({S.failure: ["bad"], S.complete: ["c"]}, True, False),
        ({S.failure: ["bad"]}, False, False),
    ],
    ids=[
        "unhandled",
        "unhandled-no-stop",
        "success-trigger-only",
        "ready-active-triggers-only",
        "empty-failure-trigger",
        "failure-trigger",
        "complete-trigger",
        "both",
        "handled-no-stop",
    ],
)
def test_a_failure_stops_the_run_only_when_unhandled_and_stop_on_exception(
    triggers: Mapping[StepStatus, list[str]], stop_on_exception: bool, stop_run: bool
) -> None:
    graph = triggered(triggers, stop_on_exception=stop_on_exception)
    outcome = graph.step_outcome("s", S.failure)
    assert outcome == StepOutcome(graph.trigger_events("s", S.failure), stop_run)


@pytest.mark.parametrize("status", [S.failure, S.lost, S.cancelled])
def test_a_lost_or_cancelled_step_run_fires_and_stops_as_a_failure(status: StepStatus) -> None:
    graph = triggered({S.failure: ["f"], S.complete: ["c"]})
    assert graph.step_outcome("s", status) == StepOutcome(("f", "c"), False)
    bare = build(steps=["s"], stop_on_exception=True)
    assert bare.step_outcome("s", status) == StepOutcome((), True)


@pytest.mark.parametrize(
    "status", [s for s in StepStatus if s not in (S.failure, S.lost, S.cancelled)]
)
def test_no_other_status_stops_the_run(status: StepStatus) -> None:
    graph = build(steps=["s"], stop_on_exception=True)
    assert graph.step_outcome("s", status) == StepOutcome((), False)


def test_step_outcome_carries_the_trigger_events() -> None:
    graph = triggered({S.success: ["ok"], S.complete: ["c", "ok"]})
    assert graph.step_outcome("s", S.success) == StepOutcome(("ok", "c"), False)


def test_plans_and_outcomes_are_frozen() -> None:
    plan, outcome = FirePlan((), ()), StepOutcome((), False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.events = ("a",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.stop_run = True  # type: ignore[misc]


# --- a program built through the public API --------------------------------------------------


def test_a_graph_of_an_eventor_program() -> None:
    ev = evr.Eventor(name="prog")
    start, ok, bad = ev.add_event("start"), ev.add_event("ok"), ev.add_event("bad")
    either = ev.add_event("either", expr=evr.or_(ok, bad))
    s1 = ev.add_step("s1", triggers={S.success: ok, S.failure: bad})
    s2 = ev.add_step("s2")
    ev.add_assoc(start, s1)
    ev.add_assoc(either, s2)
    graph = Graph(ev.program)
    assert graph.fire(set(), ["start"]) == FirePlan(events=("start",), steps=("s1",))
    assert graph.step_outcome("s1", S.failure) == StepOutcome(("bad",), False)
    assert graph.fire({"start"}, ["bad"]) == FirePlan(events=("bad", "either"), steps=("s2",))


# --- check_transition ------------------------------------------------------------------------

ALLOWED = {
    (S.ready, S.active),
    (S.ready, S.skipped),
    (S.ready, S.cancelled),
    (S.active, S.success),
    (S.active, S.failure),
    (S.active, S.cancelled),
    (S.active, S.lost),
    (S.active, S.ready),  # requeued: claimed, never started
    (S.waiting, S.ready),  # admitted: holds its slots
    (S.waiting, S.skipped),
    (S.waiting, S.cancelled),
}


@pytest.mark.parametrize(
    ("current", "new"),
    list(itertools.product(StepStatus, repeat=2)),
    ids=lambda s: s.value,
)
def test_check_transition(current: StepStatus, new: StepStatus) -> None:
    assert check_transition(current, new) is ((current, new) in ALLOWED)


# --- final_run_status ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pending", "stopped", "cancelled", "status"),
    [
        (0, False, False, RunStatus.success),
        (0, True, False, RunStatus.failure),
        (1, False, False, RunStatus.running),
        (1, True, False, RunStatus.running),
        (7, False, False, RunStatus.running),
        (7, True, False, RunStatus.running),
        (0, False, True, RunStatus.cancelled),
        (0, True, True, RunStatus.cancelled),
        (1, False, True, RunStatus.cancelled),
        (1, True, True, RunStatus.cancelled),
    ],
)
def test_final_run_status(pending: int, stopped: bool, cancelled: bool, status: RunStatus) -> None:
    assert final_run_status(pending=pending, stopped=stopped, cancelled=cancelled) is status


def test_final_run_status_takes_keywords_only() -> None:
    with pytest.raises(TypeError):
        final_run_status(0, False, False)  # type: ignore[misc]
