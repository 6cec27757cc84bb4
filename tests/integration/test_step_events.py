"""Events fired from process steps: ``aeventor.current_step().trigger(...)`` in a step's own
process reaches its worker over the step's channel, with the in-loop semantics (the step's
sequence by default, any sequence given, an undefined event refused to the step)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr

from . import stepfuncs

pytestmark = pytest.mark.timeout(60)


async def test_a_process_step_fires_events_that_start_other_steps(
    make_eventor: Callable[..., evr.Eventor],
) -> None:
    ev = make_eventor("step_events")
    ev.add_event("go")
    ev.add_event("next")
    ev.add_event("async_next")
    ev.add_step("looper", stepfuncs.fire_events, args=["next", 3])
    ev.add_step("each", command=["true"])
    ev.add_step("async_firer", stepfuncs.fire_from_async, args=["async_next"], executor="process")
    ev.add_step("after_async", command=["true"])
    ev.add_assoc("go", "looper", "async_firer")
    ev.add_assoc("next", "each")
    ev.add_assoc("async_next", "after_async")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert result.ok, [(s.step, s.error) for s in result.steps]
    assert sorted(s.sequence for s in result.steps if s.step == "each") == ["0", "1", "2"]
    assert result.step("after_async").status is evr.StepStatus.success
    # The undefined event was refused to the step, which reported the message's length.
    assert result.step("looper").result > 0


def test_current_step_outside_a_step_says_where_it_works() -> None:
    with pytest.raises(evr.AeventorError, match="process step") as caught:
        evr.current_step()
    # Only command steps are sent to the variables: process steps on SSH hosts have a channel.
    message = str(caught.value)
    assert "on an SSH host" in message
    assert "command steps read the EVENTOR_* environment variables" in message


def test_a_step_whose_channel_path_is_gone_is_told_so(tmp_path: Path) -> None:
    """An SSH step's channel is a path on its host: nothing listening there is an error."""
    from aeventor.context import CHANNEL_PATH_ENV, _ChannelStep

    gone = tmp_path / "aeventor-gone.sock"
    with pytest.raises(evr.AeventorError, match="cannot reach the step's worker") as caught:
        _ChannelStep.from_environ({CHANNEL_PATH_ENV: str(gone), "EVENTOR_STEP_NAME": "s"})
    assert str(gone) in str(caught.value)
