"""The read side's library on the in-memory store and pure data: ``queries.programs``, the
tree of a run (``build_tree``), the run's log file and the log normaliser of ``diff``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import aeventor as evr
from aeventor import queries
from aeventor.program.model import ProgramDef
from aeventor.records import StepRun
from aeventor.submission import submit
from aeventor.testing import InMemoryStore

KEY = b"k" * 32


def program(name: str, *steps: str) -> ProgramDef:
    ev = evr.Eventor(name=name, store=":memory:", mode="distributed")
    ev.add_event("go")
    for step in steps:
        ev.add_step(step, host="h1")
        ev.add_assoc("go", step)
    return ev.program


async def test_programs_lists_versions_runs_and_the_newest_run() -> None:
    store = InMemoryStore()
    v1, v2 = program("nightly", "a"), program("nightly", "a", "b")
    assert v1.version != v2.version
    await submit(store, v1, [("go", "0")], key=KEY, run_id="r1")
    await submit(store, v2, [("go", "0")], key=KEY, run_id="r2")
    await store.register_program(program("report", "x"))
    await store.cancel_run("r2", reason="enough")

    nightly, report = await queries.programs(store)
    assert (nightly.name, nightly.versions, nightly.latest_version, nightly.runs) == (
        "nightly",
        2,
        v2.version,
        2,
    )
    assert (nightly.last_run_id, nightly.last_status) == ("r2", evr.RunStatus.cancelled)
    assert nightly.last_run == (await evr.run_result(store, "r2")).created
    assert nightly.registered.tzinfo is not None
    assert (report.name, report.versions, report.runs) == ("report", 1, 0)
    assert (report.last_run_id, report.last_status, report.last_run) == (None, None, None)
    assert await queries.programs(InMemoryStore()) == []


def step_run(id_: int, step: str, sequence: str, status: str = "success", **kw: object) -> StepRun:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "id": id_,
        "run_id": "r",
        "step": step,
        "sequence": sequence,
        "recovery": 0,
        "attempt": 1,
        "status": evr.StepStatus(status),
        "host": None,
        "worker": None,
        "pid": None,
        "result": None,
        "error": None,
        "created": now,
        "started": now,
        "ended": now,
    }
    values.update(kw)
    return StepRun(**values)  # type: ignore[arg-type]


def etl() -> ProgramDef:
    ev = evr.Eventor(name="etl", store=":memory:")
    start, extracted, transformed = (ev.add_event(n) for n in ("start", "extracted", "more"))
    both = ev.add_event("both", expr=(extracted, transformed))
    alias = ev.add_event("alias")
    ev.add_step("extract", triggers={evr.StepStatus.success: (extracted,)})
    ev.add_step("transform", triggers={evr.StepStatus.success: (transformed,)})
    ev.add_step("load")
    ev.add_step("stray")
    ev.add_step("later")
    ev.add_assoc(start, "extract", "transform", alias)
    ev.add_assoc(both, "load")
    ev.add_assoc(alias, "later", delay=60)
    return ev.program


def shape(node: queries.EventNode | queries.StepNode) -> object:
    """A tree as nested tuples of names (a leaf: its name alone)."""
    if isinstance(node, queries.StepNode):
        name, children = f"{node.run.step}#{node.run.attempt}", [*map(shape, node.events)]
    else:
        name, children = node.event, [*map(shape, node.steps), *map(shape, node.events)]
    return (name, *children) if children else name


def test_the_tree_explains_each_event_and_step_run_once() -> None:
    fired = [
        ("start", "1"),
        ("alias", "1"),
        ("extracted", "1"),
        ("more", "1"),
        ("both", "1"),
        ("start", "2"),
        ("alias", "2"),
        ("start", "1"),  # a recovered generation fires its events again: shown once
    ]
    steps = [
        step_run(1, "extract", "1"),
        step_run(2, "transform", "1", "failure", ended=None),
        step_run(3, "transform", "1", attempt=2),
        step_run(4, "load", "1"),
        step_run(5, "extract", "2", "active", ended=None),
        step_run(6, "stray", "2", "skipped"),
        step_run(7, "transform", "3"),
        step_run(8, "later", "1"),
    ]
    one, two, three = queries.build_tree(etl(), fired, steps)
    assert (one.sequence, two.sequence, three.sequence) == ("1", "2", "3")
    # Derived: extracted under the step that fired it, both under the last of its events,
    # alias under the event associated with it; retries of one step stay together.
    assert [shape(e) for e in one.events] == [
        (
            "start",
            ("extract#1", "extracted"),
            "transform#1",
            ("transform#2", ("more", ("both", "load#1"))),
            ("alias", "later#1"),  # a delayed association's step run
        )
    ]
    assert one.unreached == ()
    assert [shape(e) for e in two.events] == [("start", "extract#1", "alias")]
    # Nothing recorded is hidden: step runs no fired event explains, sequences with none.
    assert [n.run.step for n in two.unreached] == ["stray"]
    assert three.events == () and [n.run.step for n in three.unreached] == ["transform"]


def test_normalise_log_takes_out_times_pids_run_ids_and_addresses() -> None:
    run_id = "0b72f3b58b50439ebc269c4fa1ef9c6b"
    text = (
        f"2026-12-03T13:40:24.123+00:00 INFO [pid=123] run {run_id} of program p started\n"
        "2026-12-03 13:40:24,123 INFO etl.step [pid=4567]: step load[1] started pid=4568\n"
        "<object at 0x7f3a2b1c0d90>\n"
    )
    assert queries.normalise_log(text).splitlines() == [
        "<time> INFO [pid=<pid>] run <run> of program p started",
        "<time> INFO etl.step [pid=<pid>]: step load[1] started pid=<pid>",
        "<object at 0x<addr>>",
    ]


async def test_log_file_of_a_distributed_run_names_its_hosts_and_log_dir() -> None:
    store = InMemoryStore()
    await submit(store, program("queued", "a"), [("go", "0")], key=KEY, run_id="r1")
    with pytest.raises(evr.ConfigurationError) as info:
        await queries.log_file(store, "r1")
    assert "distributed: its logs are on its agents' hosts (h1)" in str(info.value)
    assert "--log-dir" in str(info.value)
    log = await queries.log_file(store, "r1", "a", log_dir="/logs")
    assert str(log.path) == "/logs/queued/r1/a.0.log"
    assert (await queries.log_file(store, "r1", "a.0", log_dir="/logs")).path == log.path
    with pytest.raises(evr.ConfigurationError, match="no step run of 'zz'; its steps: a"):
        await queries.log_file(store, "r1", "zz", log_dir="/logs")
    with pytest.raises(evr.ConfigurationError, match="did not run for sequence '9'"):
        await queries.log_file(store, "r1", "a.9", log_dir="/logs")


async def test_run_details_show_a_pending_delay_under_its_event() -> None:
    ev = evr.Eventor(name="later", store=":memory:", mode="distributed")
    go = ev.add_event("go")
    ev.add_step("now", host="h1")
    ev.add_step("soon", host="h1")
    ev.add_assoc(go, "now")
    ev.add_assoc(go, "soon", delay=3600)
    store = InMemoryStore()
    await submit(store, ev.program, [("go", "1")], key=KEY, run_id="r1")

    details = await queries.run_details(store, "r1")
    (delay,) = details.delays
    assert (delay.event, delay.sequence, delay.kind, delay.target, delay.done) == (
        "go",
        "1",
        "step",
        "soon",
        None,
    )
    ((event,),) = [seq.events for seq in details.sequences]
    assert [s.run.step for s in event.steps] == ["now"]
    assert event.pending == (delay,)
