"""Durable delays: a delayed association's target is reached when it is due (on the store's
clock), exactly once, and a run waits for it; on every store, with the clock injected where
the store allows it, and with real processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.dispatch import Graph
from aeventor.dispatch.store import Store
from aeventor.program.model import RunStatus, StepStatus
from aeventor.testing import FakeClock, InMemoryStore

from ..waiting import wait_until

pytestmark = pytest.mark.timeout(60)

S = StepStatus.success


def delayed_program(delay: float) -> Graph:
    """go -> a; go, ``delay`` seconds later -> b and the event ``later`` -> c."""
    ev = evr.Eventor(name="delays", store=":memory:")
    ev.add_event("go")
    ev.add_event("later")
    for name in "abc":
        ev.add_step(name)
    ev.add_assoc("go", "a")
    ev.add_assoc("go", "b", "later", delay=delay)
    ev.add_assoc("later", "c")
    return Graph(ev.program)


async def drive(store: Store, graph: Graph, run_id: str) -> list[str]:
    ran = []
    while claims := await store.claim(worker="w", limit=10, run_id=run_id):
        for claim in claims:
            ran.append(claim.step)
            await store.complete(graph, claim, status=S)
    return ran


async def test_a_delay_is_reached_when_due_on_the_stores_clock() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    graph = delayed_program(10)
    program_id = await store.register_program(graph.program)
    run_id, advance = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    assert advance.due_in == 10
    assert await drive(store, graph, run_id) == ["a"]
    assert await store.run_status(run_id) is RunStatus.running  # the delay is pending
    assert await store.due_delays(run_id=run_id) == []
    assert await store.next_delay(run_id=run_id) == 10
    clock.advance(10)
    due = await store.due_delays(run_id=run_id)
    assert sorted(d.target for d in due) == ["b", "later"]
    for delay in due:
        assert (await store.mature(graph, delay)).recorded
        assert not (await store.mature(graph, delay)).recorded  # once
    assert sorted(await drive(store, graph, run_id)) == ["b", "c"]
    assert await store.run_status(run_id) is RunStatus.success
    assert await store.next_delay(run_id=run_id) is None


async def test_delays_on_a_sql_store(store_url: str) -> None:
    graph = delayed_program(3)
    async with open_store(store_url, program="delays") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "0")])
        # (Read at once: a loaded machine takes far less than the 3 s before they are due.)
        assert await db.due_delays(run_id=run_id) == []
        pending = await db.next_delay(run_id=run_id)
        assert pending is not None and 0 < pending <= 3
        assert await drive(db, graph, run_id) == ["a"]

        async def due() -> bool:
            return len(await db.due_delays(run_id=run_id)) == 2

        await wait_until(due, what="the delays to be due")
        for delay in await db.due_delays(run_id=run_id):
            assert (await db.mature(graph, delay)).recorded
            assert not (await db.mature(graph, delay)).recorded
        assert sorted(await drive(db, graph, run_id)) == ["b", "c"]
        assert await db.run_status(run_id) is RunStatus.success
        # A run that had delays is deleted with them (cleanup).
        assert await db.delete_runs([run_id]) == [run_id]


async def test_a_run_waits_for_its_delay(make_eventor: Callable[..., evr.Eventor]) -> None:
    ev = make_eventor("waits")
    ev.add_event("go")
    ev.add_step("first")
    ev.add_step("later")
    ev.add_assoc("go", "first")
    ev.add_assoc("go", "later", delay=1.0)
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert result.ok
    first, later = result.step("first"), result.step("later")
    assert later.created is not None and first.created is not None
    # Less a margin: the due time is set on the server's clock at its transaction's start
    # (Postgres' now()), ``created`` on the client's as the row is written; a loaded machine
    # was seen to take a quarter of a second between the two.
    assert (later.created - first.created).total_seconds() >= 1.0 - 0.5
