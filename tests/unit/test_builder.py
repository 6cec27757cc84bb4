"""The program builder behind ``Eventor.add_*``: caching, and costs linear in the program.

The linearity tests count operations (comparisons, mapping reads), never time: a quadratic
regression multiplies the count by 16 when the program grows 4 times, a linear cost by 4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import aeventor as evr
from aeventor import submission
from aeventor.exceptions import ProgramDefinitionError
from aeventor.program import hosts as _hosts
from aeventor.program.builder import ProgramBuilder
from aeventor.program.model import ProgramDef

S = evr.StepStatus

#: Growth of the measured cost when the program grows 4 times: linear is 4 (plus
#: constants), quadratic is 16.
GROWTH_LIMIT = 6.0


# --- program caching --------------------------------------------------------------------


def test_program_is_built_once_per_change() -> None:
    ev = evr.Eventor(name="cached")
    ev.add_event("start")
    first = ev.program
    assert ev.program is first
    assert ev._builder.builds == 1
    ev.add_step("s")
    second = ev.program
    assert second is not first
    assert "s" in second.steps and "s" not in first.steps
    assert ev.program is second
    assert ev._builder.builds == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda ev: ev.add_event("other"),
        lambda ev: ev.add_step("other"),
        lambda ev: ev.add_group("other"),
        lambda ev: ev.add_assoc("start", "s2"),
    ],
    ids=["add_event", "add_step", "add_group", "add_assoc"],
)
def test_every_add_invalidates_the_program(change: Any) -> None:
    ev = evr.Eventor(name="cached")
    ev.add_event("start")
    ev.add_step("s")
    ev.add_step("s2")
    before = ev.program
    change(ev)
    assert ev.program is not before


def test_a_failed_add_keeps_the_program() -> None:
    ev = evr.Eventor(name="cached")
    ev.add_event("start")
    before = ev.program
    with pytest.raises(ProgramDefinitionError):
        ev.add_step("start")
    with pytest.raises(ProgramDefinitionError):
        ev.add_assoc("start", "nothing")
    assert ev.program is before


def test_a_failed_add_assoc_adds_none_of_its_targets() -> None:
    ev = evr.Eventor(name="atomic")
    ev.add_event("start")
    ev.add_step("a")
    with pytest.raises(ProgramDefinitionError, match="undefined step or event 'nothing'"):
        ev.add_assoc("start", "a", "nothing")
    assert "start" not in ev.program.assocs


def test_trigger_event_does_not_rebuild_the_program() -> None:
    ev = evr.Eventor(name="cached")
    ev.add_event("start")
    before = ev.program
    ev.trigger_event("start")
    assert ev.program is before


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("name", "renamed"), ("stop_on_exception", False), ("default_host", "h2")],
)
def test_the_program_follows_the_eventors_settings(attribute: str, value: object) -> None:
    ev = evr.Eventor(name="cached", mode="distributed", default_host="h1")
    ev.add_step("s")
    before = ev.program
    setattr(ev, attribute, value)
    after = ev.program
    assert after is not before
    assert after == ProgramBuilder.program(
        ev._builder,
        name=ev.name,
        stop_on_exception=ev.stop_on_exception,
        distributed=True,
        default_host=ev.default_host,
    )


def test_a_program_handed_out_does_not_change_with_later_definitions() -> None:
    ev = evr.Eventor(name="snapshot")
    ev.add_event("start")
    ev.add_step("a")
    ev.add_assoc("start", "a")
    program = ev.program
    ev.add_step("b")
    ev.add_assoc("start", "b")
    assert list(program.steps) == ["a"]
    assert program.assocs == {"start": (("step", "a"),)}


def test_distributed_program_has_every_host_assigned() -> None:
    ev = evr.Eventor(name="hosts", mode="distributed")
    start, done = ev.add_event("start"), ev.add_event("done")
    ev.add_step("a", host="h1", triggers={S.success: done})
    ev.add_step("b")
    ev.add_assoc(start, "a")
    ev.add_assoc(done, "b")
    assert {s.name: s.host for s in ev.program.steps.values()} == {"a": "h1", "b": "h1"}


def test_resolve_hosts_is_still_importable_from_submission() -> None:
    assert submission.resolve_hosts is _hosts.resolve_hosts


# --- add_assoc: linear in the fan-out ---------------------------------------------------


class CountingName(str):
    """A name that counts how often it is compared for equality."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountingName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def _fan_out_comparisons(n: int) -> int:
    builder = ProgramBuilder()
    builder.add_event("go")
    names = [CountingName(f"s{i}") for i in range(n)]
    for name in names:
        builder.add_step(name)
    CountingName.comparisons = 0
    # Handles make new (kind, name) tuples, so a list scan compares every pair of names.
    builder.add_assoc("go", *names)
    builder.add_assoc("go", *names[: n // 2])  # duplicates, dropped
    count = CountingName.comparisons
    assert list(builder.assocs["go"]) == [("step", name) for name in names]
    return count


def test_add_assoc_compares_names_a_bounded_number_of_times() -> None:
    # A duplicate check by list scan compares n²/2 pairs (8 million at n = 4,000); a dict
    # compares only on hash collisions.
    n = 4_000
    assert _fan_out_comparisons(n) <= n


# --- host assignment: linear in steps and edges -----------------------------------------


class CountingMapping(Mapping[str, Any]):
    """A read-only mapping that counts every key and value read from it."""

    def __init__(self, data: Mapping[str, Any], counter: list[int]) -> None:
        self._data = dict(data)
        self._counter = counter

    def __getitem__(self, key: str) -> Any:
        self._counter[0] += 1
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        for key in self._data:
            self._counter[0] += 1
            yield key

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._counter[0] += 1
        return key in self._data


def _reads(program: ProgramDef, operation: Any) -> int:
    counter = [0]
    counted = dataclasses.replace(
        program,
        events=CountingMapping(program.events, counter),
        steps=CountingMapping(program.steps, counter),
        assocs=CountingMapping(program.assocs, counter),
        groups=CountingMapping(program.groups, counter),
    )
    operation(counted)
    return counter[0]


def chain_last_first(n: int) -> ProgramDef:
    """s0 -> s1 -> ... -> s(n-1), defined from the last step back; only s0 has a host."""
    builder = ProgramBuilder()
    for i in range(n + 1):
        builder.add_event(f"e{i}")
    for i in reversed(range(n)):
        builder.add_step(f"s{i}", host="h1" if i == 0 else None, triggers={S.success: f"e{i + 1}"})
        builder.add_assoc(f"e{i}", f"s{i}")
    return builder.program(name="chain")


def fan_in_through_events(n: int) -> ProgramDef:
    """n steps all fire ``done``, which reaches the last step through a chain of n events."""
    builder = ProgramBuilder()
    builder.add_event("go")
    builder.add_event("done")
    for i in range(n):
        builder.add_event(f"relay{i}")
    builder.add_assoc("done", "relay0")
    for i in range(1, n):
        builder.add_assoc(f"relay{i - 1}", f"relay{i}")
    builder.add_step("last")
    builder.add_assoc(f"relay{n - 1}", "last")
    for i in range(n):
        builder.add_step(f"s{i}", host="h1", triggers={S.success: "done"})
    builder.add_assoc("go", *(f"s{i}" for i in range(n)))
    return builder.program(name="fan-in")


def fan_out(n: int) -> ProgramDef:
    builder = ProgramBuilder()
    builder.add_event("start")
    builder.add_event("go")
    builder.add_step("root", host="h1", triggers={S.success: "go"})
    builder.add_assoc("start", "root")
    for i in range(n):
        builder.add_step(f"s{i}")
    builder.add_assoc("go", *(f"s{i}" for i in range(n)))
    return builder.program(name="fan-out")


def _assign(program: ProgramDef) -> None:
    hosts = _hosts.assign_hosts(program, default_host=None)
    assert set(hosts.values()) == {"h1"}


@pytest.mark.parametrize("shape", [chain_last_first, fan_in_through_events, fan_out])
def test_assign_hosts_reads_the_program_linearly(shape: Any) -> None:
    small = _reads(shape(1_000), _assign)
    large = _reads(shape(4_000), _assign)
    assert large / small < GROWTH_LIMIT, (small, large)


@pytest.mark.parametrize("shape", [chain_last_first, fan_in_through_events, fan_out])
def test_predecessors_reads_the_program_linearly(shape: Any) -> None:
    small = _reads(shape(1_000), _hosts.predecessors)
    large = _reads(shape(4_000), _hosts.predecessors)
    assert large / small < GROWTH_LIMIT, (small, large)


def test_defining_a_large_program_reads_linearly() -> None:
    # Defining n steps and assocs, then building the program once: nothing rescans what
    # was defined before (each add_* is O(its own arguments)).
    def define(n: int) -> int:
        counter = [0]
        builder = ProgramBuilder()
        builder.events = _CountingDict(counter)  # type: ignore[assignment]
        builder.steps = _CountingDict(counter)  # type: ignore[assignment]
        builder.add_event("go")
        for i in range(n):
            builder.add_event(f"e{i}")
            builder.add_step(f"s{i}", triggers={S.success: f"e{i}"})
            builder.add_assoc("go", f"s{i}")
        builder.program(name="big")
        return counter[0]

    small, large = define(1_000), define(4_000)
    assert large / small < GROWTH_LIMIT, (small, large)


class _CountingDict(dict[str, Any]):
    """A dict that counts lookups and iteration (a rescan of it shows as n per call)."""

    def __init__(self, counter: list[int]) -> None:
        super().__init__()
        self._counter = counter

    def __contains__(self, key: object) -> bool:
        self._counter[0] += 1
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self._counter[0] += 1
            yield key
