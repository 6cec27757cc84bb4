"""Pools and concurrency limits with real process steps, on every store.

Each step writes its own start and end time to a journal (``stepfuncs.occupy``); the limits are
checked from those records, not from what the engine says it did.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.records import Slots

from ..waiting import wait_until
from . import stepfuncs

pytestmark = pytest.mark.timeout(90)

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))

F = evr.StepStatus.failure
S = evr.StepStatus.success


Record = tuple[str, str, float]


def _read(path: Path) -> list[Record]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        what, label, at = line.split()
        records.append((what, label, float(at)))
    return sorted(records, key=lambda record: (record[2], record[0] == "start"))


async def journal(path: Path) -> list[Record]:
    """The ``(start|end, step.sequence, time)`` records of the steps, in time order."""
    return await asyncio.to_thread(_read, path)


def most_at_once(records: list[Record], labels: Callable[[str], bool] = lambda _: True) -> int:
    """The most step runs (of those ``labels`` accepts) running at one time."""
    running = most = 0
    for what, label, _ in records:
        if labels(label):
            running += 1 if what == "start" else -1
            most = max(most, running)
    return most


async def started(path: Path) -> list[str]:
    return [label for what, label, _ in await journal(path) if what == "start"]


async def ended(path: Path) -> list[str]:
    return [label for what, label, _ in await journal(path) if what == "end"]


async def until_started(path: Path, labels: Iterable[str]) -> None:
    wanted = set(labels)

    async def all_started() -> bool:
        return wanted <= set(await started(path))

    await wait_until(all_started, what=f"{sorted(wanted)} to start ({path})")


def occupy(path: Path, seconds: float = 0.0, release: Path | None = None) -> dict[str, object]:
    return {
        "journal": str(path),
        "seconds": seconds,
        "release": None if release is None else str(release),
    }


async def test_a_pool_of_two_never_has_three_holders(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log = tmp_path / "journal"
    ev = make_eventor("pool2")
    ev.add_pool("p", 2)
    ev.add_event("go")
    ev.add_step("s", stepfuncs.occupy, kwargs=occupy(log, 0.1), acquires=[("p", 1)])
    ev.add_assoc("go", "s")
    for sequence in range(10):
        ev.trigger_event("go", sequence)
    result = await asyncio.wait_for(ev.run(), 60)
    assert result.ok, result.reason
    assert [s.status for s in result.steps] == [S] * 10
    assert len(await ended(log)) == 10
    assert most_at_once(await journal(log)) <= 2
    assert await ev_slots(ev, result.run_id) == []  # every slot given back


async def ev_slots(ev: evr.Eventor, run_id: str) -> list[Slots]:
    """The run's slots, read through a connection of the test's own."""
    assert ev.store is not None
    async with open_store(ev.store, program="inspector") as store:
        return await store.run_slots(run_id)


async def test_max_concurrent_per_step_and_per_group(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log = tmp_path / "journal"
    ev = make_eventor("limits")
    ev.add_group("g", max_concurrent=1)
    ev.add_event("go")
    ev.add_step("s", stepfuncs.occupy, kwargs=occupy(log, 0.1), max_concurrent=2)
    ev.add_step("g1", stepfuncs.occupy, kwargs=occupy(log, 0.05), group="g")
    # The original's per-step config key.
    ev.add_step("g2", stepfuncs.occupy, kwargs=occupy(log, 0.05), group="g")
    ev.add_step("one", stepfuncs.occupy, kwargs=occupy(log, 0.05), config={"max_concurrent": 1})
    ev.add_assoc("go", "s", "g1", "g2", "one")
    for sequence in range(6):
        ev.trigger_event("go", sequence)
    result = await asyncio.wait_for(ev.run(), 60)
    assert result.ok, result.reason
    assert len(await ended(log)) == 24
    assert most_at_once(await journal(log), lambda label: label.startswith("s.")) <= 2
    assert most_at_once(await journal(log), lambda label: label.startswith("g")) <= 1
    assert most_at_once(await journal(log), lambda label: label.startswith("one.")) <= 1


async def test_a_step_needing_two_pools_takes_both_at_once_or_holds_none(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log, free_x, free_y = tmp_path / "journal", tmp_path / "free_x", tmp_path / "free_y"
    ev = make_eventor("both")
    ev.add_pool("a", 1)
    ev.add_pool("b", 1)
    ev.add_event("go")
    ev.add_event("then")
    ev.add_step(
        "x", stepfuncs.occupy, kwargs=occupy(log, release=free_x), acquires=[("a", 1)],
        triggers={evr.StepStatus.active: ("then",)},
    )  # fmt: skip
    ev.add_step("y", stepfuncs.occupy, kwargs=occupy(log, release=free_y), acquires=[("b", 1)])
    ev.add_step("ab", stepfuncs.occupy, kwargs=occupy(log), acquires=[("a", 1), ("b", 1)])
    ev.add_assoc("go", "x", "y")
    ev.add_assoc("then", "ab")
    ev.trigger_event("go")
    handle = ev.start()
    try:
        await until_started(log, ["x.0", "y.0"])
        run_id = handle.run_id

        async def ab_waits_holding_nothing() -> bool:
            slots = [s for s in await ev_slots(ev, run_id) if s.step == "ab"]
            return len(slots) == 2 and not any(s.held for s in slots)

        await wait_until(ab_waits_holding_nothing, what="ab to wait for a and b")
        shown = await asyncio.to_thread(
            subprocess.run,
            [AEVENTOR, "show", run_id, "--store", str(ev.store)],
            capture_output=True,
            text=True,
        )
        assert "ab[0] waits for 1 of program:" in shown.stdout, shown.stdout + shown.stderr
        assert "x[0] holds 1 of program:" in shown.stdout
        await asyncio.to_thread(free_x.touch)  # a is free, b is not: ab still holds nothing

        async def x_ended() -> bool:
            return "x.0" in await ended(log)

        await wait_until(x_ended, what="x to end")

        async def a_free() -> bool:
            slots = await ev_slots(ev, run_id)
            return not any(s.step == "x" for s in slots)

        await wait_until(a_free, what="x's slot of a to be given back")
        assert await ab_waits_holding_nothing()
        assert "ab.0" not in await started(log)
        await asyncio.to_thread(free_y.touch)
        result = await asyncio.wait_for(handle.wait(), 60)
    finally:
        await asyncio.to_thread(free_x.touch)
        await asyncio.to_thread(free_y.touch)
    assert result.ok, result.reason
    records = await journal(log)
    ab_start = next(at for what, label, at in records if (what, label) == ("start", "ab.0"))
    y_end = next(at for what, label, at in records if (what, label) == ("end", "y.0"))
    assert ab_start >= y_end


async def test_waiters_are_served_in_order_priority_first(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log, free = tmp_path / "journal", tmp_path / "free"
    ev = make_eventor("fifo")
    ev.add_pool("p", 1)
    ev.add_event("go")
    ev.add_event("next")
    ev.add_event("urgent")
    ev.add_step("first", stepfuncs.occupy, kwargs=occupy(log, release=free), acquires=[("p", 1)])
    ev.add_step("w", stepfuncs.occupy, kwargs=occupy(log), acquires=[("p", 1)])
    ev.add_step("u", stepfuncs.occupy, kwargs=occupy(log), acquires=[("p", 1)], priority=5)
    ev.add_assoc("go", "first")
    ev.add_assoc("next", "w")
    ev.add_assoc("urgent", "u")
    ev.trigger_event("go")
    handle = ev.start()
    try:
        await until_started(log, ["first.0"])
        # Waiters arrive one after the other; the urgent one last.
        for sequence in (4, 1, 3, 2):
            await handle.trigger_event("next", sequence)
        await handle.trigger_event("urgent", 9)
        await asyncio.to_thread(free.touch)
        result = await asyncio.wait_for(handle.wait(), 60)
    finally:
        await asyncio.to_thread(free.touch)
    assert result.ok, result.reason
    assert await started(log) == ["first.0", "u.9", "w.4", "w.1", "w.3", "w.2"]
    assert most_at_once(await journal(log)) == 1


async def test_local_and_cluster_pools_are_shared_by_runs(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log = tmp_path / "journal"

    def program(name: str) -> evr.Eventor:
        ev = make_eventor(name)
        ev.add_pool("gpu", 1, scope="local")
        ev.add_pool("licence", 2, scope="cluster")
        ev.add_pool("mine", 1)  # program scope: each run has its own
        ev.add_event("go")
        ev.add_step(
            "train", stepfuncs.occupy, kwargs=occupy(log, 0.1), acquires=[("gpu", 1)],
        )  # fmt: skip
        ev.add_step(
            "lic", stepfuncs.occupy, kwargs=occupy(log, 0.1),
            acquires=[("licence", 1), ("mine", 1)],
        )  # fmt: skip
        ev.add_assoc("go", "train", "lic")
        for sequence in range(3):
            ev.trigger_event("go", f"{name}{sequence}")
        return ev

    first, second = program("one"), program("two")
    results = await asyncio.wait_for(asyncio.gather(first.run(), second.run()), 60)
    assert all(r.ok for r in results), [r.reason for r in results]
    assert len(await ended(log)) == 12
    assert most_at_once(await journal(log), lambda label: label.startswith("train.")) <= 1
    assert most_at_once(await journal(log), lambda label: label.startswith("lic.")) <= 2
    # The program-scoped pool is each run's own: one holder per run at a time.
    for name in ("one", "two"):
        assert (
            most_at_once(await journal(log), lambda label, n=name: label.startswith(f"lic.{n}"))
            <= 1
        )


async def test_slots_come_back_when_steps_fail_or_are_cancelled(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log, never = tmp_path / "journal", tmp_path / "never"
    ev = make_eventor("giveback")
    ev.add_pool("p", 1)
    ev.add_event("go")
    ev.add_event("noted")
    ev.add_event("later")
    ev.add_step("bad", command=["false"], acquires=[("p", 1)], triggers={F: ("noted",)})
    ev.add_step(
        "stuck", stepfuncs.occupy, kwargs=occupy(log, release=never), acquires=[("p", 1)],
        triggers={F: ("noted",)},
    )  # fmt: skip
    ev.add_step("after", stepfuncs.occupy, kwargs=occupy(log), acquires=[("p", 1)])
    ev.add_assoc("go", "bad", "stuck")
    ev.add_assoc("later", "after")
    for sequence in range(3):
        ev.trigger_event("go", sequence)
    handle = ev.start()
    await until_started(log, ["stuck.0"])
    await handle.trigger_event("later", 0)
    assert "stuck.1" not in await started(log)  # the pool's one slot is stuck.0's
    await handle.cancel_step("stuck", 0)
    for sequence in (1, 2):
        await until_started(log, [f"stuck.{sequence}"])
        await handle.cancel_step("stuck", sequence)
    result = await asyncio.wait_for(handle.wait(), 60)
    assert result.ok, result.reason
    outcomes = sorted((s.step, s.sequence, s.status.value) for s in result.steps)
    assert outcomes == [
        ("after", "0", "success"),
        ("bad", "0", "failure"), ("bad", "1", "failure"), ("bad", "2", "failure"),
        ("stuck", "0", "cancelled"), ("stuck", "1", "cancelled"), ("stuck", "2", "cancelled"),
    ]  # fmt: skip
    # (Cancelled steps write no end: each started once the one before it was cancelled.)
    assert await started(log) == ["stuck.0", "stuck.1", "stuck.2", "after.0"]


async def test_slots_kept_by_the_run_until_a_later_step_releases_them(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log, free = tmp_path / "journal", tmp_path / "free"
    ev = make_eventor("handover")
    ev.add_pool("p", 1)
    ev.add_event("go")
    ev.add_event("taken")
    ev.add_event("hold_on")
    ev.add_step(
        "take", stepfuncs.occupy, kwargs=occupy(log), acquires=[("p", 1)], releases=[],
        triggers={S: ("taken",)},
    )  # fmt: skip
    ev.add_step(
        "give", stepfuncs.occupy, kwargs=occupy(log, release=free), releases=[("p", 1)],
    )  # fmt: skip
    ev.add_step("other", stepfuncs.occupy, kwargs=occupy(log), acquires=[("p", 1)])
    ev.add_assoc("go", "take")
    ev.add_assoc("taken", "give", "hold_on")
    ev.add_assoc("hold_on", "other")
    ev.trigger_event("go")
    handle = ev.start()
    try:
        await until_started(log, ["give.0"])
        run_id = handle.run_id

        async def kept_by_run() -> bool:
            slots = await ev_slots(ev, run_id)
            return any(s.step is None and s.held for s in slots) and any(
                s.step == "other" and not s.held for s in slots
            )

        await wait_until(kept_by_run, what="the run to keep take's slot while other waits")
        assert "other.0" not in await started(log)
        await asyncio.to_thread(free.touch)
        result = await asyncio.wait_for(handle.wait(), 60)
    finally:
        await asyncio.to_thread(free.touch)
    assert result.ok, result.reason
    events = [(what, label) for what, label, _ in await journal(log)]
    assert events.index(("start", "other.0")) > events.index(("end", "give.0"))
    assert await ev_slots(ev, result.run_id) == []


async def test_a_host_limit_is_shared_by_every_run_that_sets_it(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    log = tmp_path / "journal"

    def program(name: str) -> evr.Eventor:
        ev = make_eventor(name, max_concurrency_per_host=1)
        ev.add_event("go")
        ev.add_step("s", stepfuncs.occupy, kwargs=occupy(log, 0.05))
        ev.add_assoc("go", "s")
        for sequence in range(3):
            ev.trigger_event("go", f"{name}{sequence}")
        return ev

    results = await asyncio.wait_for(asyncio.gather(program("a").run(), program("b").run()), 60)
    assert all(r.ok for r in results), [r.reason for r in results]
    assert len(await ended(log)) == 6
    assert most_at_once(await journal(log)) == 1
