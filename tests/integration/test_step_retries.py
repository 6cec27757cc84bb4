"""Retries with real process steps on every store: each attempt is a step run of its own with
its own log; a failure the policy does not name is not retried; the failure triggers fire
once, after the last attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr

from . import stepfuncs

pytestmark = pytest.mark.timeout(60)

F = evr.StepStatus.failure


async def test_a_flaky_step_succeeds_at_its_third_attempt(
    make_eventor: Callable[..., evr.Eventor], tmp_path: Path
) -> None:
    ev = make_eventor("retried")
    ev.add_event("go")
    ev.add_event("failed")
    ev.add_step(
        "flaky", stepfuncs.fail_until,
        kwargs={"counter": str(tmp_path / "count"), "succeed_at": 3},
        retry=evr.Retry(attempts=3, backoff=0.05, on=("ConnectionError",)),
        triggers={F: ("failed",)},
    )  # fmt: skip
    ev.add_step("handler")
    ev.add_assoc("go", "flaky")
    ev.add_assoc("failed", "handler")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    assert result.ok, result.reason
    flaky = [s for s in result.steps if s.step == "flaky"]
    assert [(s.attempt, s.status.value) for s in flaky] == [
        (1, "failure"), (2, "failure"), (3, "success"),
    ]  # fmt: skip
    assert "ConnectionError: attempt 2 failed" in (flaky[1].error or "")
    assert flaky[2].started is not None and flaky[1].ended is not None
    assert (flaky[2].started - flaky[1].ended).total_seconds() >= 0.05  # its backoff
    assert "handler" not in {s.step for s in result.steps}  # no failure trigger fired
    assert result.log_dir is not None
    log_dir = result.log_dir
    logs = await asyncio.to_thread(lambda: {p.name: p.read_text() for p in log_dir.glob("flaky.*")})
    for name, attempt in (("flaky.0.log", 1), ("flaky.0.2.log", 2), ("flaky.0.3.log", 3)):
        assert f"attempt {attempt}" in logs[name], (name, logs)


async def test_failures_not_named_are_not_retried_and_the_last_one_fires(
    make_eventor: Callable[..., evr.Eventor],
) -> None:
    ev = make_eventor("not_retried")
    ev.add_event("go")
    ev.add_event("failed")
    ev.add_event("noted")  # handled, so that exit3's failure does not stop the run
    ev.add_step(
        "exit3", command=["sh", "-c", "exit 3"], retry={"attempts": 3, "backoff": 0, "on": [4]},
        triggers={F: ("noted",)},
    )  # fmt: skip
    ev.add_step(
        "always", command=["false"], retry=evr.Retry(attempts=2, backoff=0),
        triggers={F: ("failed",)},
    )  # fmt: skip
    ev.add_step("handler")
    ev.add_assoc("go", "exit3", "always")
    ev.add_assoc("failed", "handler")
    ev.trigger_event("go")
    result = await asyncio.wait_for(ev.run(), 30)
    attempts = sorted((s.step, s.attempt, s.status.value) for s in result.steps)
    assert attempts == [
        ("always", 1, "failure"), ("always", 2, "failure"), ("exit3", 1, "failure"),
        ("handler", 1, "success"),
    ]  # fmt: skip
    assert result.ok
