"""The pure part of pools and limits: who is admitted, in which order, and what each step
run of a program asks for."""

from __future__ import annotations

import pytest

import aeventor as evr
from aeventor.dispatch.pools import LOCAL_HOST, Request, Waiter, admit, requests, templates
from aeventor.program.model import ProgramDef


def waiter(id_: int, **needs: tuple[int, int]) -> Waiter:
    return Waiter(id_, needs)


def test_a_waiter_takes_everything_it_needs_or_nothing() -> None:
    # a has 1 free slot, b none: the step needing both gets neither.
    assert admit([waiter(1, a=(1, 2), b=(1, 1))], {"a": 1, "b": 1}) == []
    assert admit([waiter(1, a=(1, 2), b=(1, 1))], {"a": 1}) == [1]


def test_waiters_are_served_in_order_and_a_later_one_never_overtakes() -> None:
    waiters = [waiter(1, p=(2, 2)), waiter(2, p=(1, 2)), waiter(3, q=(1, 1))]
    # One slot of p is free: the first waiter needs two, so the second (needing one) must
    # not take it and starve the first; a waiter of another pool goes on.
    assert admit(waiters, {"p": 1}) == [3]
    assert admit(waiters, {}) == [1, 3]


def test_a_blocked_waiter_blocks_every_pool_it_needs() -> None:
    waiters = [waiter(1, a=(1, 1), b=(1, 1)), waiter(2, b=(1, 1))]
    assert admit(waiters, {"a": 1}) == []  # b is free, but the first waiter waits for it too


def test_several_waiters_fill_a_pool_up_to_its_size() -> None:
    waiters = [waiter(i, p=(1, 3)) for i in range(1, 6)]
    assert admit(waiters, {"p": 1}) == [1, 2]


def test_a_waiter_needing_pools_not_locked_is_not_admitted() -> None:
    incomplete = Waiter(1, {"p": (1, 1), "elsewhere": (1, 1)}, complete=False)
    assert admit([incomplete, waiter(2, p=(1, 1))], {}) == []


def program() -> ProgramDef:
    ev = evr.Eventor(name="pools", store=":memory:", max_concurrency_per_host=4)
    ev.add_pool("db", 3)
    ev.add_pool("gpu", 1, scope="local")
    ev.add_pool("licence", 2, scope="cluster")
    ev.add_group("g", max_concurrent=2)
    ev.add_event("go")
    ev.add_step("s", acquires=[("db", 2), ("licence", 1)], max_concurrent=5, group="g")
    ev.add_step("t", acquires=[("gpu", 1)], host="h1")
    ev.add_assoc("go", "s", "t")
    return ev.program


def test_each_step_run_asks_for_its_pools_and_limits() -> None:
    found = templates(program())
    assert requests(found["s"], run_id="r1", host=None) == (
        Request("program:r1:db", 2, 3),
        Request("cluster:licence", 1, 2),
        Request("step:r1:s", 1, 5),
        Request("group:r1:g", 1, 2),
        Request(f"host:{LOCAL_HOST}", 1, 4),
    )
    assert requests(found["t"], run_id="r1", host="h1") == (
        Request("local:h1:gpu", 1, 1),
        Request("host:h1", 1, 4),
    )


def test_a_program_without_pools_or_limits_asks_for_nothing() -> None:
    ev = evr.Eventor(name="plain", store=":memory:", max_concurrency=3)  # standalone
    ev.add_event("go")
    ev.add_step("s")
    ev.add_assoc("go", "s")
    assert templates(ev.program) == {}


def test_a_distributed_run_limit_is_a_pool_of_the_run() -> None:
    ev = evr.Eventor(name="dist", store=":memory:", mode="distributed", max_concurrency=3)
    ev.add_event("go")
    ev.add_step("s", host="h1")
    ev.add_assoc("go", "s")
    found = templates(ev.program)
    assert requests(found["s"], run_id="r1", host="h1") == (Request("run:r1", 1, 3),)


def test_pools_and_limits_survive_the_stored_definition() -> None:
    definition = program()
    again = ProgramDef.from_json(definition.to_json())
    assert again == definition
    assert again.version == definition.version


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ev: ev.add_step("x", acquires=[("nope", 1)]), "undefined pool 'nope'"),
        (lambda ev: ev.add_step("x", acquires=[("db", 4)]), "4 slots of pool 'db', which has 3"),
        (lambda ev: ev.add_step("x", acquires=[("db", 0)]), "give a whole number of 1 or more"),
        (lambda ev: ev.add_step("x", acquires="db"), "list of (pool, slots) pairs"),
        (lambda ev: ev.add_step("x", releases=[("nope", 1)]), "undefined pool 'nope'"),
        (lambda ev: ev.add_step("x", max_concurrent=0), "max_concurrent=0"),
        (lambda ev: ev.add_step("x", priority="high"), "priority='high'"),
        (lambda ev: ev.add_group("h", max_concurrent=-1), "max_concurrent=-1"),
        (lambda ev: ev.add_pool("db", 1), "already defined"),
        (lambda ev: ev.add_pool("q", 1, scope="node"), "scope='node'"),
        (lambda ev: ev.add_pool("q", 1.5), "size=1.5"),
    ],
)
def test_bad_pools_and_limits_name_the_fix(call: object, message: str) -> None:
    ev = evr.Eventor(name="bad", store=":memory:")
    ev.add_pool("db", 3)
    with pytest.raises(
        evr.ProgramDefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        call(ev)  # type: ignore[operator]


def test_a_bad_host_limit_is_refused() -> None:
    with pytest.raises(evr.ProgramDefinitionError, match="max_concurrency_per_host=0"):
        evr.Eventor(name="bad", store=":memory:", max_concurrency_per_host=0)


def test_the_schema_head_the_fast_open_checks_is_alembics_head() -> None:
    from aeventor.backends.stores.migrations import head_revision
    from aeventor.backends.stores.schema import HEAD_REVISION

    assert head_revision() == HEAD_REVISION
