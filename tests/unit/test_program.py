"""Tests for programs as data (aeventor.program.model), the Eventor definition API and store URLs."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

import aeventor as evr
from aeventor.backends.stores import resolve_url
from aeventor.dispatch import Graph
from aeventor.exceptions import (
    ConfigurationError,
    ProgramDefinitionError,
    SerializationError,
    StoreConfigError,
)
from aeventor.program.expr import And, Or
from aeventor.program.model import EventDef, ProgramDef, StepDef, StepStatus, check_json

S = StepStatus


def module_level_step(x: int = 0) -> int:
    return x


async def module_level_async_step() -> None:
    return None


def new_eventor(**kwargs: Any) -> evr.Eventor:
    kwargs.setdefault("name", "prog")
    return evr.Eventor(**kwargs)


def full_eventor(name: str = "prog", **kwargs: Any) -> evr.Eventor:
    """A program using every kind of definition: derived events, all step kinds, assocs."""
    ev = new_eventor(name=name, **kwargs)
    start, ok, bad = ev.add_event("start"), ev.add_event("ok"), ev.add_event("bad")
    ev.add_event("either", expr=evr.or_(ok, (bad, start)))
    work = ev.add_step(
        "work",
        module_level_step,
        args=[1],
        kwargs={"k": {"nested": [1, 2.5, None, True]}},
        triggers={S.success: ok, "failure": [bad], S.complete: ("ok",)},
        host="node1",
        sequence_arg_name="seq",
    )
    ev.add_step("inloop", module_level_async_step, triggers={S.ready: "bad"})
    ev.add_step("cmd", command=["echo", "hi"])
    ev.add_step("noop")
    ev.add_assoc(start, work, "cmd", "either")
    ev.add_assoc("either", "noop", "inloop")
    return ev


def raises_definition_error(func: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(ProgramDefinitionError) as info:
        func()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    return message


# --- ProgramDef as JSON and its version ------------------------------------------------------


def test_program_json_round_trip() -> None:
    program = full_eventor().program
    data = json.loads(json.dumps(program.to_json()))
    restored = ProgramDef.from_json(data)
    assert restored == program
    assert restored.version == program.version
    assert restored.to_json() == program.to_json()


def test_program_json_round_trip_keeps_step_details() -> None:
    restored = ProgramDef.from_json(json.loads(json.dumps(full_eventor().program.to_json())))
    work = restored.steps["work"]
    assert work.target == f"{__name__}:module_level_step"
    assert work.executor == "warm"  # the default for a plain function
    assert work.args == (1,)
    assert work.kwargs == {"k": {"nested": [1, 2.5, None, True]}}
    assert work.triggers == {S.success: ("ok",), S.failure: ("bad",), S.complete: ("ok",)}
    assert work.host == "node1"
    assert work.sequence_arg_name == "seq"
    assert restored.steps["cmd"].argv == ("echo", "hi")
    assert restored.steps["inloop"].executor == "inloop"
    assert restored.events["either"].expr == Or(("ok", And(("bad", "start"))))
    assert restored.assocs["start"] == (("step", "work"), ("step", "cmd"), ("event", "either"))


def test_an_empty_program_round_trips() -> None:
    program = new_eventor(stop_on_exception=False).program
    restored = ProgramDef.from_json(json.loads(json.dumps(program.to_json())))
    assert restored == program
    assert restored.stop_on_exception is False


def test_canonical_json_is_the_sorted_compact_dump_of_to_json() -> None:
    """canonical_json is built a few hundred steps at a time: the same text as dumping the
    whole to_json(), for a program with every kind of field and for a wide one."""
    wide = new_eventor()
    wide.add_event("gö")
    for i in range(700):
        wide.add_event(f"e{i}")
        wide.add_step(f"s{i}", triggers={S.success: (f"e{i}",)})
        wide.add_assoc("gö" if i == 0 else f"e{i - 1}", f"s{i}")
    wide.add_assoc("gö", *(f"s{i}" for i in range(1, 700, 3)))
    for program in (full_eventor().program, wide.program, new_eventor().program):
        dumped = json.dumps(program.to_json(), sort_keys=True, separators=(",", ":"))
        assert program.canonical_json() == dumped
        assert program.version == hashlib.sha256(dumped.encode()).hexdigest()[:32]


def test_version_is_a_stable_hex_digest() -> None:
    version = full_eventor().program.version
    assert len(version) == 32
    assert int(version, 16) >= 0
    assert full_eventor().program.version == version


def test_the_same_definition_has_the_same_version_whatever_the_order_of_definition() -> None:
    first = new_eventor()
    first.add_event("a")
    first.add_event("b")
    first.add_step("s1")
    first.add_step("s2")
    first.add_assoc("a", "s1")
    first.add_assoc("b", "s2")
    second = new_eventor()
    second.add_step("s2")
    second.add_event("b")
    second.add_step("s1")
    second.add_event("a")
    second.add_assoc("b", "s2")
    second.add_assoc("a", "s1")
    assert first.program.version == second.program.version


def _change_name(ev: evr.Eventor) -> evr.Eventor:
    return full_eventor(name="other")


def _change_stop(ev: evr.Eventor) -> evr.Eventor:
    return full_eventor(stop_on_exception=False)


def _add_event(ev: evr.Eventor) -> evr.Eventor:
    ev.add_event("extra")
    return ev


def _add_step(ev: evr.Eventor) -> evr.Eventor:
    ev.add_step("extra")
    return ev


def _add_assoc(ev: evr.Eventor) -> evr.Eventor:
    ev.add_assoc("ok", "cmd")
    return ev


def _step_variant(**overrides: Any) -> Callable[[evr.Eventor], evr.Eventor]:
    def change(ev: evr.Eventor) -> evr.Eventor:
        ev = new_eventor()
        ev.add_event("e")
        ev.add_event("f")
        spec: dict[str, Any] = {
            "func": module_level_step,
            "args": [1],
            "kwargs": {"k": 1},
            "triggers": {S.success: "e"},
            "host": None,
            "sequence_arg_name": None,
        }
        spec.update(overrides)
        ev.add_step("s", **spec)
        return ev

    return change


VARIANTS: dict[str, Callable[[evr.Eventor], evr.Eventor]] = {
    "program name": _change_name,
    "stop_on_exception": _change_stop,
    "an event": _add_event,
    "a step": _add_step,
    "an assoc": _add_assoc,
}

STEP_VARIANTS: dict[str, dict[str, Any]] = {
    "func": {"func": module_level_async_step, "args": [], "kwargs": {}},
    "args": {"args": [2]},
    "arg type": {"args": ["1"]},
    "kwargs": {"kwargs": {"k": 2}},
    "kwargs key": {"kwargs": {"j": 1}},
    "trigger status": {"triggers": {S.failure: "e"}},
    "trigger event": {"triggers": {S.success: "f"}},
    "host": {"host": "node2"},
    "sequence_arg_name": {"sequence_arg_name": "seq"},
    "command": {"func": None, "args": [], "kwargs": {}, "command": ["true"]},
    "no-op": {"func": None, "args": [], "kwargs": {}},
}


@pytest.mark.parametrize("change", VARIANTS.values(), ids=VARIANTS.keys())
def test_any_change_alters_the_version(change: Callable[[evr.Eventor], evr.Eventor]) -> None:
    base = full_eventor().program.version
    assert change(full_eventor()).program.version != base


def test_a_changed_expression_alters_the_version() -> None:
    def program(expr: Any) -> ProgramDef:
        ev = new_eventor()
        ev.add_event("a")
        ev.add_event("b")
        ev.add_event("d", expr=expr)
        return ev.program

    versions = {
        program(("a", "b")).version,
        program(evr.or_("a", "b")).version,
        program("a").version,
        program(("a",)).version,
    }
    assert len(versions) == 4


@pytest.mark.parametrize("overrides", STEP_VARIANTS.values(), ids=STEP_VARIANTS.keys())
def test_any_change_to_a_step_alters_the_version(overrides: dict[str, Any]) -> None:
    base = _step_variant()(new_eventor()).program.version
    assert _step_variant(**overrides)(new_eventor()).program.version != base


def test_validate_accepts_a_well_formed_program() -> None:
    full_eventor().program.validate()


# --- ProgramDef.validate on definitions built by hand -----------------------------------------


def program_def(**kwargs: Any) -> ProgramDef:
    kwargs.setdefault("name", "prog")
    kwargs.setdefault("events", {"a": EventDef("a")})
    kwargs.setdefault("steps", {"s": StepDef("s", executor="process")})
    kwargs.setdefault("assocs", {})
    return ProgramDef(**kwargs)


def test_validate_rejects_an_expression_over_an_undefined_event() -> None:
    events = {"a": EventDef("a"), "d": EventDef("d", And(("a", "ghost")))}
    program = program_def(events=events)
    raises_definition_error(program.validate, "'d'", "'ghost'", "ev.add_event('ghost')")


def test_validate_rejects_a_self_referencing_expression() -> None:
    events = {"a": EventDef("a"), "d": EventDef("d", Or(("a", "d")))}
    raises_definition_error(program_def(events=events).validate, "'d'", "refers to itself")


def test_validate_rejects_an_assoc_from_an_undefined_event() -> None:
    program = program_def(assocs={"ghost": (("step", "s"),)})
    raises_definition_error(program.validate, "'ghost'", "ev.add_event('ghost')")


@pytest.mark.parametrize("kind", ["step", "event"])
def test_validate_rejects_an_assoc_to_an_undefined_target(kind: str) -> None:
    program = program_def(assocs={"a": ((kind, "ghost"),)})
    raises_definition_error(program.validate, f"undefined {kind} 'ghost'", f"ev.add_{kind}(")


def test_validate_rejects_a_trigger_naming_an_undefined_event() -> None:
    steps = {"s": StepDef("s", executor="process", triggers={S.success: ("ghost",)})}
    raises_definition_error(
        program_def(steps=steps).validate, "'s'", "triggers[success]", "'ghost'"
    )


# --- Eventor: names --------------------------------------------------------------------------

BAD_NAMES = ["", " a", "a ", "x" * 201, 5, None]
BAD_NAME_IDS = ["empty", "leading-space", "trailing-space", "too-long", "int", "None"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=BAD_NAME_IDS)
def test_a_bad_event_name_is_rejected(name: Any) -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_event(name), "event name", "non-empty string")


@pytest.mark.parametrize("name", BAD_NAMES, ids=BAD_NAME_IDS)
def test_a_bad_step_name_is_rejected(name: Any) -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step(name), "step name", "non-empty string")


@pytest.mark.parametrize("name", ["", " prog", "x" * 201], ids=["empty", "space", "too-long"])
def test_a_bad_program_name_is_rejected(name: str) -> None:
    raises_definition_error(lambda: evr.Eventor(name=name), "program name")


def test_a_name_of_the_maximum_length_is_accepted() -> None:
    ev = new_eventor()
    ev.add_event("x" * 200)
    assert "x" * 200 in ev.program.events


def test_an_empty_host_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step("s", host=""), "host")


def test_an_empty_sequence_is_rejected() -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(lambda: ev.trigger_event("a", sequence=""), "sequence")


def test_trigger_event_rejects_an_undefined_event() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.trigger_event("ghost"), "trigger_event", "'ghost'")


def test_a_duplicate_event_name_is_rejected() -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(lambda: ev.add_event("a"), "event 'a'", "already used by an event")


def test_a_duplicate_step_name_is_rejected() -> None:
    ev = new_eventor()
    ev.add_step("s")
    raises_definition_error(lambda: ev.add_step("s"), "step 's'", "already used by a step")


def test_a_step_may_not_take_an_event_name() -> None:
    ev = new_eventor()
    ev.add_event("x")
    raises_definition_error(lambda: ev.add_step("x"), "step 'x'", "already used by an event")


def test_an_event_may_not_take_a_step_name() -> None:
    ev = new_eventor()
    ev.add_step("x")
    raises_definition_error(lambda: ev.add_event("x"), "event 'x'", "already used by a step")


# --- Eventor: expressions --------------------------------------------------------------------


def test_add_event_stores_the_normalized_expression() -> None:
    ev = new_eventor()
    a, b = ev.add_event("a"), ev.add_event("b")
    ev.add_event("c")
    derived = ev.add_event("d", expr=(a, evr.or_(b, "c")))
    expected = And(("a", Or(("b", "c"))))
    assert derived.expr == expected
    assert ev.program.events["d"] == EventDef("d", expected)


def test_an_expression_over_an_undefined_event_is_reported_by_program() -> None:
    ev = new_eventor()
    ev.add_event("a")
    ev.add_event("d", expr=("a", "later"))  # may be defined afterwards
    raises_definition_error(lambda: ev.program, "'d'", "'later'", "ev.add_event('later')")
    ev.add_event("later")
    assert ev.program.events["d"].expr == And(("a", "later"))


def test_a_self_referencing_expression_is_reported_by_program() -> None:
    ev = new_eventor()
    ev.add_event("a")
    ev.add_event("d", expr=("a", "d"))
    raises_definition_error(lambda: ev.program, "'d'", "refers to itself")


def test_a_malformed_expression_is_rejected_by_add_event() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_event("d", expr=()), "empty tuple")


# --- Eventor: add_assoc ----------------------------------------------------------------------


def test_add_assoc_rejects_an_undefined_event() -> None:
    ev = new_eventor()
    ev.add_step("s")
    raises_definition_error(
        lambda: ev.add_assoc("ghost", "s"), "add_assoc", "'ghost'", "ev.add_event('ghost')"
    )


def test_add_assoc_rejects_a_step_as_the_event() -> None:
    ev = new_eventor()
    s = ev.add_step("s")
    raises_definition_error(lambda: ev.add_assoc(s, "s"), "add_assoc", "undefined event 's'")


def test_add_assoc_rejects_an_undefined_target() -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(
        lambda: ev.add_assoc("a", "ghost"), "add_assoc('a'", "'ghost'", "ev.add_step('ghost'"
    )


def test_add_assoc_rejects_a_target_that_is_not_a_step_or_event() -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(lambda: ev.add_assoc("a", 3), "add_assoc('a'", "3")  # type: ignore[arg-type]


def test_add_assoc_needs_a_target() -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(lambda: ev.add_assoc("a"), "at least one")


@pytest.mark.parametrize("delay", [-1, float("inf"), "5", True])
def test_add_assoc_rejects_a_bad_delay(delay: object) -> None:
    ev = new_eventor()
    ev.add_event("a")
    ev.add_step("s")
    raises_definition_error(
        lambda: ev.add_assoc("a", "s", delay=delay),  # type: ignore[arg-type]
        "delay=",
        "give the seconds",
    )


def test_a_delayed_assoc_is_part_of_the_definition_and_of_the_plan() -> None:
    ev = new_eventor()
    ev.add_event("a")
    ev.add_event("later")
    ev.add_step("s")
    ev.add_step("t")
    ev.add_assoc("a", "s")
    ev.add_assoc("a", "t", "later", delay=2.5)
    program = ev.program
    assert program.assocs == {"a": (("step", "s"),)}
    assert program.delays == {"a": (("step", "t", 2.5), ("event", "later", 2.5))}
    assert evr.ProgramDef.from_json(program.to_json()) == program
    plan = Graph(program).fire(set(), ["a"])
    assert plan.steps == ("s",)
    assert plan.delays == (("a", "step", "t", 2.5), ("a", "event", "later", 2.5))
    # A program without delays keeps its definition (and its version) as before.
    assert "delays" not in new_eventor().program.to_json()


def test_add_assoc_resolves_names_and_objects_and_deduplicates() -> None:
    ev = new_eventor()
    a, b = ev.add_event("a"), ev.add_event("b")
    s = ev.add_step("s")
    ev.add_assoc(a, s, "b", "s", b)
    ev.add_assoc("a", "s")
    assert ev.program.assocs == {"a": (("step", "s"), ("event", "b"))}


# --- Eventor: triggers -----------------------------------------------------------------------


def test_triggers_accept_statuses_names_events_and_lists() -> None:
    ev = new_eventor()
    a = ev.add_event("a")
    ev.add_event("b")
    ev.add_step("s", triggers={"ready": a, S.success: "b", S.complete: [a, "b", "a"]})
    assert ev.program.steps["s"].triggers == {
        S.ready: ("a",),
        S.success: ("b",),
        S.complete: ("a", "b"),
    }


def test_a_trigger_naming_an_undefined_event_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", triggers={S.success: "ghost"}),
        "step 's'",
        "triggers[success]",
        "'ghost'",
        "ev.add_event('ghost')",
    )


@pytest.mark.parametrize("key", ["done", "SUCCESS", S.skipped, S.cancelled, 1, None], ids=repr)
def test_a_bad_trigger_status_key_is_rejected(key: Any) -> None:
    ev = new_eventor()
    ev.add_event("a")
    raises_definition_error(
        lambda: ev.add_step("s", triggers={key: "a"}),
        "step 's'",
        repr(key),
        "StepStatus.ready, active, success, failure or complete",
    )


def test_a_trigger_value_that_is_not_an_event_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step("s", triggers={S.success: [3]}), "3")


def test_a_trigger_value_that_is_not_iterable_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step("s", triggers={S.success: 3}), "step 's'")


# --- Eventor: functions and executors --------------------------------------------------------


def test_a_module_level_function_runs_as_a_warm_process_step() -> None:
    ev = new_eventor()
    ev.add_step("s", module_level_step, args=(1,))
    ev.add_step("fresh", module_level_step, executor="process")
    step = ev.program.steps["s"]
    assert (step.executor, step.target, step.local_only) == (
        "warm",
        f"{__name__}:module_level_step",
        False,
    )
    assert ev.program.steps["fresh"].executor == "process"


def test_a_warm_step_must_be_importable() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", lambda: None, executor="warm"), "cannot be imported by path"
    )


def test_a_module_level_async_function_runs_in_the_loop() -> None:
    ev = new_eventor()
    ev.add_step("s", module_level_async_step)
    step = ev.program.steps["s"]
    assert (step.executor, step.local_only) == ("inloop", False)


def test_a_lambda_cannot_be_a_process_step() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", lambda: None), "step 's'", "<lambda>", "module level"
    )


def test_a_nested_function_cannot_be_a_process_step() -> None:
    def nested() -> None:
        return None

    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", nested), "step 's'", "<locals>", "cannot be imported by path"
    )


def test_a_partial_cannot_be_a_process_step() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", functools.partial(module_level_step, 1)), "step 's'"
    )


def test_a_nested_async_function_is_allowed_in_the_loop() -> None:
    async def nested() -> None:
        return None

    ev = new_eventor()
    ev.add_step("s", nested)
    step = ev.program.steps["s"]
    assert (step.executor, step.local_only) == ("inloop", True)
    assert step.target is not None and "<locals>" in step.target


def test_a_nested_async_function_cannot_be_a_process_step() -> None:
    async def nested() -> None:
        return None

    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", nested, executor="process"), "cannot be imported by path"
    )


@pytest.mark.parametrize(
    "spelling",
    [
        {"executor": "inloop"},
        {"config": {"task_construct": "invoke"}},
        {"config": {"executor": "inloop"}},
    ],
    ids=["executor", "task_construct", "config-executor"],
)
def test_a_sync_function_cannot_run_in_the_loop(spelling: dict[str, Any]) -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", module_level_step, **spelling),
        "step 's'",
        "needs an async def",
        "module_level_step",
    )


@pytest.mark.parametrize("executor", ["thread", "command", "invoke"])
def test_an_unknown_executor_for_a_function_is_rejected(executor: str) -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", module_level_step, executor=executor),
        "step 's'",
        repr(executor),
        "'process', 'inloop'",
    )


@pytest.mark.parametrize("executor", ["thread", "command"])
def test_an_unknown_executor_for_a_no_op_step_is_rejected(executor: str) -> None:
    # A no-op step has nothing to run, but a misspelt or impossible executor is still a
    # mistake in the definition (and would be stored and hashed into the version).
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step("s", executor=executor), "step 's'", executor)


def test_config_spells_executor_and_sequence_arg_name() -> None:
    ev = new_eventor()
    ev.add_step("p", module_level_step, config={"task_construct": "process"})
    ev.add_step("i", module_level_async_step, config={"task_construct": "invoke"})
    ev.add_step("q", module_level_step, config={"sequence_arg_name": "seq"})
    steps = ev.program.steps
    assert steps["p"].executor == "process"
    assert steps["i"].executor == "inloop"
    assert steps["q"].sequence_arg_name == "seq"


def test_an_unknown_config_key_is_rejected_listing_the_known_keys() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", config={"max_concurency": 2}),
        "step 's'",
        "max_concurency",
        "'executor'",
        "'sequence_arg_name'",
        "'task_construct'",
    )


def test_an_unknown_task_construct_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", module_level_step, config={"task_construct": "thread"}),
        "task_construct='thread'",
        "'process' or 'invoke'",
    )


def test_a_func_that_is_not_callable_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", "pkg.mod:func"),  # type: ignore[arg-type]
        "step 's'",
        "callable",
    )


def test_args_without_a_func_are_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(lambda: ev.add_step("s", args=[1]), "step 's'", "no func")
    raises_definition_error(lambda: ev.add_step("t", kwargs={"a": 1}), "step 't'", "no func")


# --- Eventor: commands -----------------------------------------------------------------------


def test_a_command_step() -> None:
    ev = new_eventor()
    ev.add_step("s", command=["ls", "-l"])
    step = ev.program.steps["s"]
    assert (step.executor, step.argv, step.target) == ("command", ("ls", "-l"), None)


def test_a_command_together_with_a_func_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", module_level_step, command=["true"]),
        "step 's'",
        "either func or command",
    )


@pytest.mark.parametrize(
    "command", ["ls -l", [], ["ls", 3], ("ls", Path("x"))], ids=["str", "empty", "int", "path"]
)
def test_a_command_that_is_not_an_argv_is_rejected(command: Any) -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", command=command),
        "step 's'",
        "non-empty list of strings",
        "['sh', '-c', 'line']",
    )


def test_a_command_with_args_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", command=["ls"], args=["-l"]), "step 's'", "put them in the argv"
    )


def test_a_command_with_another_executor_is_rejected() -> None:
    ev = new_eventor()
    raises_definition_error(
        lambda: ev.add_step("s", command=["ls"], executor="process"),
        "step 's'",
        "executor 'command'",
    )


# --- Eventor: arguments as JSON --------------------------------------------------------------

NOT_JSON = {
    "object": object(),
    "path": Path("data.csv"),
    "bytes": b"x",
    "set": {1},
    "nan": float("nan"),
    "inf": float("inf"),
    "nested-path": {"files": [Path("a")]},
}


@pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
def test_args_that_json_cannot_carry_are_rejected(value: Any) -> None:
    ev = new_eventor()
    with pytest.raises(SerializationError) as info:
        ev.add_step("s", module_level_step, args=[value])
    message = str(info.value)
    assert "step 's': args" in message
    assert "a Path to str" in message


@pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
def test_kwargs_that_json_cannot_carry_are_rejected(value: Any) -> None:
    ev = new_eventor()
    with pytest.raises(SerializationError, match="step 's': kwargs"):
        ev.add_step("s", module_level_step, kwargs={"x": value})


def test_args_with_non_string_dict_keys_are_rejected() -> None:
    # JSON would silently turn {1: "a"} into {"1": "a"}: the step would get other data.
    ev = new_eventor()
    with pytest.raises(SerializationError, match="string keys"):
        ev.add_step("s", module_level_step, args=[{1: "a"}])


def test_kwargs_with_non_string_keys_are_rejected() -> None:
    ev = new_eventor()
    with pytest.raises(ConfigurationError, match="keys must be strings"):
        ev.add_step("s", module_level_step, kwargs={1: "a"})  # type: ignore[dict-item]


def test_check_json_returns_values_json_can_carry() -> None:
    value = {"a": [1, 2.5, "x", None, True, {"b": []}]}
    assert check_json(value, what="thing") is value


def test_check_json_names_what_it_checks() -> None:
    with pytest.raises(SerializationError, match=r"^my value cannot be carried as JSON"):
        check_json(object(), what="my value")


# --- Eventor: constructor --------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1])
def test_max_concurrency_below_one_is_rejected(value: int) -> None:
    with pytest.raises(ConfigurationError, match=f"max_concurrency={value}") as info:
        new_eventor(max_concurrency=value)
    assert "at least 1" in str(info.value)


def test_max_concurrency_one_is_accepted() -> None:
    assert new_eventor(max_concurrency=1).max_concurrency == 1


@pytest.mark.parametrize("value", ["LOUD", "", "info level"])
def test_an_invalid_logging_level_is_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError, match="logging_level") as info:
        new_eventor(logging_level=value)
    assert "logging.DEBUG" in str(info.value)


@pytest.mark.parametrize(
    ("value", "level"),
    [(None, logging.INFO), ("debug", logging.DEBUG), ("WARNING", logging.WARNING), (5, 5)],
)
def test_valid_logging_levels(value: Any, level: int) -> None:
    assert new_eventor(logging_level=value).level == level


# --- resolve_url ---------------------------------------------------------------------------

SECRET = "s3cretPW"


def assert_hidden(exc: BaseException, *secrets: str) -> None:
    text = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in text


def test_memory_store() -> None:
    url = resolve_url(":memory:", program="prog")
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", ":memory:")


def test_default_store_is_a_file_named_after_the_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = resolve_url(None, program="prog")
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", str(Path.cwd() / "prog.run.db"))


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_a_sqlite_file_path(tmp_path: Path, as_path: bool) -> None:
    path = tmp_path / "runs.db"
    url = resolve_url(path if as_path else str(path), program="prog")
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", str(path.resolve()))


def test_a_relative_sqlite_path_is_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = resolve_url("runs.db", program="prog")
    assert url.database == str((Path.cwd() / "runs.db").resolve())


@pytest.mark.parametrize("form", ["path", "str", "url"])
def test_a_path_in_a_missing_directory_names_the_directory(tmp_path: Path, form: str) -> None:
    missing = tmp_path / "missing"
    path = missing / "runs.db"
    store = {"path": path, "str": str(path), "url": f"sqlite+aiosqlite:///{path}"}[form]
    with pytest.raises(StoreConfigError) as info:
        resolve_url(store, program="prog")
    assert str(missing.resolve()) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize(
    ("store", "drivername"),
    [
        (f"postgresql://u:{SECRET}@h/db", "postgresql+asyncpg"),
        (f"postgresql+psycopg2://u:{SECRET}@h/db", "postgresql+asyncpg"),
        (f"postgresql+asyncpg://u:{SECRET}@h/db", "postgresql+asyncpg"),
        (f"mysql+mysqldb://u:{SECRET}@h/db", "mysql+aiomysql"),
        (f"mysql://u:{SECRET}@h/db", "mysql+aiomysql"),
        (f"mysql+asyncmy://u:{SECRET}@h/db", "mysql+asyncmy"),
        (f"mariadb://u:{SECRET}@h/db", "mariadb+aiomysql"),
    ],
)
def test_server_urls_get_an_async_driver(store: str, drivername: str) -> None:
    url = resolve_url(store, program="prog")
    assert url.drivername == drivername
    assert (url.username, url.password, url.host, url.database) == ("u", SECRET, "h", "db")


def test_a_url_object_is_accepted() -> None:
    url = resolve_url(URL.create("postgresql", host="h", database="db"), program="prog")
    assert url.drivername == "postgresql+asyncpg"


def test_a_sqlite_memory_url() -> None:
    url = resolve_url("sqlite:///:memory:", program="prog")
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", ":memory:")


@pytest.mark.parametrize(
    "store", [f"oracle://u:{SECRET}@h/db", f"mssql+pyodbc://u:{SECRET}@h/db"], ids=repr
)
def test_an_unsupported_dialect_is_rejected_without_the_password(store: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        resolve_url(store, program="prog")
    message = str(info.value)
    assert "does not support" in message
    assert "sqlite, postgresql or mysql/mariadb" in message
    assert_hidden(info.value, SECRET)


def test_a_store_of_another_type_is_rejected() -> None:
    with pytest.raises(StoreConfigError, match="int object"):
        resolve_url(42, program="prog")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("store", "secrets"),
    [
        (f"postgres ql://u:{SECRET}@h/db", [SECRET]),
        (f"://u:{SECRET}@h/db", [SECRET]),
        (f"pg!://u:{SECRET}@h/db", [SECRET]),
        ("pg!://u:s3cr/etPW@h/db", ["s3cr/etPW", "etPW"]),
        ("pg!://u:top@s3cretPW@h/db", ["top@s3cretPW", "s3cretPW"]),
        (f"postgresql://u:{SECRET}@h:54x2/db", [SECRET]),
        (f"postgresql://u:{SECRET}@[::1/db", [SECRET]),
    ],
    ids=["space", "no-dialect", "bad-dialect", "slash", "at-sign", "bad-port", "bad-ipv6"],
)
def test_a_malformed_url_is_rejected_without_the_password(store: str, secrets: list[str]) -> None:
    with pytest.raises(StoreConfigError) as info:
        resolve_url(store, program="prog")
    assert "is not a database URL" in str(info.value)
    assert_hidden(info.value, *secrets)
