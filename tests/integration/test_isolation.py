"""What keeps steps and runs apart: per-step environments, step contexts, run ids."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores.base import Database
from aeventor.exceptions import AeventorError

from . import stepfuncs
from .helpers import rendezvous, steps_of

MakeEventor = Callable[..., evr.Eventor]

NAMES = ("alpha", "beta", "gamma")
SEQUENCES = ("1", "2", "3")


async def test_concurrent_subprocess_steps_each_see_their_own_environment(
    make_eventor: MakeEventor, tmp_path: Path
) -> None:
    meeting = tmp_path / "meeting"
    await asyncio.to_thread(meeting.mkdir)
    parties = len(NAMES) * len(SEQUENCES)
    environ_before = dict(os.environ)

    ev = make_eventor(name="envprog")
    start = ev.add_event("start")
    for name in NAMES:
        ev.add_step(name, func=stepfuncs.report_env, args=(str(meeting), parties))
        ev.add_assoc(start, name)
    for sequence in SEQUENCES:
        ev.trigger_event(start, sequence)

    result = await ev.run()

    assert result, result.reason
    assert len(result.steps) == parties
    pids = set()
    for step_run in result.steps:
        report = step_run.result
        expected = {
            "EVENTOR_RUN_ID": result.run_id,
            "EVENTOR_PROGRAM": "envprog",
            "EVENTOR_STEP_NAME": step_run.step,
            "EVENTOR_STEP_SEQUENCE": step_run.sequence,
            "EVENTOR_STEP_RECOVERY": "0",
            "EVENTOR_LOGGER_NAME": "envprog.step",
        }
        assert report["env"] == expected, step_run
        assert report["again"] == expected, step_run
        assert report["pid"] == step_run.pid
        pids.add(report["pid"])
    assert len(pids) == parties
    assert dict(os.environ) == environ_before


async def test_concurrent_inloop_steps_each_see_their_own_context(
    make_eventor: MakeEventor,
) -> None:
    parties = len(NAMES) * len(SEQUENCES)
    all_running = asyncio.Barrier(parties)
    environ_before = dict(os.environ)

    async def who_am_i() -> dict[str, object]:
        before = evr.current_step()
        await rendezvous(all_running, what="in-loop steps")
        after = evr.current_step()
        return {
            "same": after is before,
            "step": after.step,
            "sequence": after.sequence,
            "env_step": after.env["EVENTOR_STEP_NAME"],
            "env_sequence": after.env["EVENTOR_STEP_SEQUENCE"],
            "run_id": after.run_id,
            "environ": sorted(k for k in os.environ if k.startswith("EVENTOR_")),
        }

    ev = make_eventor()
    start = ev.add_event("start")
    for name in NAMES:
        ev.add_step(name, func=who_am_i)
        ev.add_assoc(start, name)
    for sequence in SEQUENCES:
        ev.trigger_event(start, sequence)

    result = await ev.run()

    assert result, result.reason
    assert len(result.steps) == parties
    for step_run in result.steps:
        assert step_run.result == {
            "same": True,
            "step": step_run.step,
            "sequence": step_run.sequence,
            "env_step": step_run.step,
            "env_sequence": step_run.sequence,
            "run_id": result.run_id,
            "environ": [],  # in-loop steps never write os.environ
        }
    assert dict(os.environ) == environ_before
    with pytest.raises(AeventorError, match="only available inside a step"):
        evr.current_step()


async def test_two_runs_of_one_program_in_one_store_stay_apart(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    """Two Eventors, same name and store, running at once: neither sees the other's events."""
    both_running = asyncio.Barrier(2)

    async def first() -> str:
        step = evr.current_step()
        await rendezvous(both_running, what="runs")
        await step.trigger("mid")
        return step.run_id

    async def noop() -> None:
        return None

    def build() -> evr.Eventor:
        ev = make_eventor(name="twin")
        for event in ("start", "mid", "only_in_one"):
            ev.add_event(event)
        # Holds in run one only, unless facts of one run leaked into the other.
        ev.add_event("special_ready", expr=("mid", "only_in_one"))
        ev.add_step("first", func=first)
        ev.add_step("second", func=noop)
        ev.add_step("special", func=noop)
        ev.add_assoc("start", "first")
        ev.add_assoc("mid", "second")
        ev.add_assoc("special_ready", "special")
        ev.trigger_event("start")
        return ev

    one, two = build(), build()
    one.trigger_event("only_in_one")
    async with asyncio.TaskGroup() as tg:
        run_one = tg.create_task(one.run())
        run_two = tg.create_task(two.run())
    result_one, result_two = run_one.result(), run_two.result()

    assert result_one and result_two
    assert result_one.run_id != result_two.run_id
    assert steps_of(result_one) == [
        ("first", "0", "success"),
        ("second", "0", "success"),
        ("special", "0", "success"),
    ]
    assert steps_of(result_two) == [("first", "0", "success"), ("second", "0", "success")]
    assert result_one.step("first").result == result_one.run_id
    assert result_two.step("first").result == result_two.run_id
    events_one = await store_db.fired_events(result_one.run_id)
    events_two = await store_db.fired_events(result_two.run_id)
    assert sorted(events_one) == [
        ("mid", "0"),
        ("only_in_one", "0"),
        ("special_ready", "0"),
        ("start", "0"),
    ]
    assert sorted(events_two) == [("mid", "0"), ("start", "0")]
