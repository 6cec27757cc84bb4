"""The original eventor's per-step config keys that map: ``pass_logger_to_task`` (the step's
function gets ``logger=`` its step logger) and ``stop_on_exception`` (per step)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

import aeventor as evr
from aeventor.dispatch import Graph

from . import stepfuncs

pytestmark = pytest.mark.timeout(60)


async def inloop_log_through(name: str, *, logger: logging.Logger) -> str:
    logger.warning("hello from %s through %s", name, logger.name)
    return logger.name


async def test_pass_logger_to_task_in_process_and_in_loop_steps(
    make_eventor: Callable[..., evr.Eventor],
) -> None:
    ev = make_eventor("porting")
    ev.add_event("go")
    config = {"pass_logger_to_task": True}
    ev.add_step("proc", stepfuncs.log_through, args=["proc"], config=config)
    ev.add_step("loop", inloop_log_through, args=["loop"], config=config)
    ev.add_assoc("go", "proc", "loop")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert result.ok, [(s.step, s.error) for s in result.steps]
    assert result.step("proc").result == result.step("loop").result == "porting.step"
    assert result.log_dir is not None
    log_dir = result.log_dir
    text = await asyncio.to_thread(lambda: (log_dir / "proc.0.log").read_text())
    assert "hello from proc through porting.step" in text


async def test_stop_on_exception_per_step(make_eventor: Callable[..., evr.Eventor]) -> None:
    """A step with stop_on_exception False fails without stopping the run; the others go on."""
    ev = make_eventor("porting_stop")
    ev.add_event("go")
    ev.add_event("later")
    ev.add_step("tolerated", command=["false"], config={"stop_on_exception": False})
    ev.add_step("slow", command=["true"], triggers={evr.StepStatus.success: ("later",)})
    ev.add_step("after")
    ev.add_assoc("go", "tolerated", "slow")
    ev.add_assoc("later", "after")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert result.step("tolerated").status is evr.StepStatus.failure
    assert result.step("after").status is evr.StepStatus.success
    assert result.ok


def test_the_keys_are_part_of_the_definition() -> None:
    ev = evr.Eventor(name="keys", store=":memory:")
    ev.add_step("a", command=["true"], config={"stop_on_exception": False})
    ev.add_step("b", stepfuncs.log_through, config={"pass_logger_to_task": True})
    program = ev.program
    assert evr.ProgramDef.from_json(program.to_json()) == program
    assert Graph(program).step_outcome("a", evr.StepStatus.failure).stop_run is False
    assert Graph(program).step_outcome("b", evr.StepStatus.failure).stop_run is True
    with pytest.raises(evr.ProgramDefinitionError, match="give True or False"):
        ev.add_step("c", command=["true"], config={"stop_on_exception": "no"})
