"""A chain and a fan-in on every backend: the engine's basic contract."""

from __future__ import annotations

from collections.abc import Callable

import aeventor as evr


async def noop() -> str:
    return "done"


async def test_chain_and_fan_in(make_eventor: Callable[..., evr.Eventor]) -> None:
    ev = make_eventor()
    start = ev.add_event("start")
    left = ev.add_event("left")
    right = ev.add_event("right")
    both = ev.add_event("both", expr=(left, right))
    ev.add_step("a", func=noop, triggers={evr.StepStatus.success: (left,)})
    ev.add_step("b", func=noop, triggers={evr.StepStatus.success: (right,)})
    ev.add_step("c", func=noop)
    ev.add_assoc(start, "a", "b")
    ev.add_assoc(both, "c")
    ev.trigger_event(start, 1)
    result = await ev.run()
    assert result, result.reason
    assert sorted((s.step, s.sequence, s.status) for s in result.steps) == [
        ("a", "1", evr.StepStatus.success),
        ("b", "1", evr.StepStatus.success),
        ("c", "1", evr.StepStatus.success),
    ]
    assert result.step("c", 1).result == "done"
