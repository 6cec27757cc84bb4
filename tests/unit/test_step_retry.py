"""Retries of failed steps: the policy (which failures, how long between attempts), the
transaction (the next attempt waits out its backoff on the store's clock; failure triggers
fire after the last attempt only), and the worker (it wakes when the backoff is over), with
time injected, never slept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.dispatch import Graph
from aeventor.dispatch.executor import ExecResult, StepLaunch
from aeventor.dispatch.trust import OwnProgram
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.program.model import RunStatus, StepStatus
from aeventor.testing import FakeClock, FakeExecutor, InMemoryStore

F = StepStatus.failure


# -- the policy -------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    retry = evr.Retry(attempts=6, backoff=2, cap=10, jitter=0.5)
    assert [retry.delay(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]
    assert retry.delay(1, draw=1.0) == 1.0  # at most half of it taken off
    assert evr.Retry(backoff=3, exponential=False).delay(4) == 3


def test_which_failures_are_retried() -> None:
    retry = evr.Retry(attempts=2, on=(3, "TimeoutError", "mymod.Busy", "lost"))

    def retried(status: StepStatus = F, *, code: int | None = None, error: str = "") -> bool:
        return retry.retries(1, status, exit_code=code, error=error)

    assert retried(code=3) and not retried(code=4)
    assert retried(error="Traceback ...\nTimeoutError: too slow")
    assert retried(error="mymod.Busy: later")
    assert not retried(error="RuntimeError: boom")
    assert retried(StepStatus.lost)
    assert not retry.retries(2, F, exit_code=3, error=None)  # the last attempt
    assert not retry.retries(1, StepStatus.success, exit_code=None, error=None)
    assert evr.Retry().retries(1, F, exit_code=None, error="anything")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, r"attempts=0\): give 1 or more"),
        ({"attempts": 1.5}, r"attempts=1.5\): give a whole number"),
        ({"backoff": -1}, r"backoff=-1\): give seconds"),
        ({"jitter": 2}, r"jitter=2\): give a fraction"),
        ({"on": [1.5]}, r"on=\[1.5\]\): give exit codes"),
    ],
)
def test_bad_policies_say_what_to_give(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(evr.ProgramDefinitionError, match=message):
        evr.Retry(**kwargs)  # type: ignore[arg-type]


def test_a_step_takes_a_policy_or_a_dict_of_one() -> None:
    ev = evr.Eventor(name="retries", store=":memory:")
    ev.add_step("a", command=["true"], retry=evr.Retry(attempts=2))
    ev.add_step("b", command=["true"], config={"retry": {"attempts": 4, "on": [1]}})
    assert ev.program.steps["b"].retry == evr.Retry(attempts=4, on=(1,))
    again = evr.ProgramDef.from_json(ev.program.to_json())
    assert again.steps["a"].retry == evr.Retry(attempts=2) and again == ev.program
    with pytest.raises(evr.ProgramDefinitionError, match="its keys are attempts"):
        ev.add_step("c", command=["true"], retry={"tries": 2})
    with pytest.raises(evr.ProgramDefinitionError, match=r"give aeventor\.Retry"):
        ev.add_step("d", command=["true"], retry=3)  # type: ignore[arg-type]


# -- the transaction and the worker -----------------------------------------------------------


def flaky_program(attempts: int = 3) -> Graph:
    ev = evr.Eventor(name="flaky", store=":memory:")
    ev.add_event("go")
    ev.add_event("failed")
    ev.add_step(
        "flaky", command=["false"], retry=evr.Retry(attempts=attempts, backoff=10),
        triggers={F: ("failed",)},
    )  # fmt: skip
    ev.add_step("handler")
    ev.add_assoc("go", "flaky")
    ev.add_assoc("failed", "handler")
    return Graph(ev.program)


async def test_the_next_attempt_waits_out_its_backoff_on_the_stores_clock() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    graph = flaky_program(attempts=2)
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    [first] = await store.claim(worker="w", limit=5, run_id=run_id)
    advance = await store.complete(graph, first, status=F, error="no", retry_after=10)
    assert advance.due_in == 10 and advance.ready == 0
    assert await store.claim(worker="w", limit=5, run_id=run_id) == []
    clock.advance(9.9)
    assert await store.claim(worker="w", limit=5, run_id=run_id) == []
    clock.advance(0.1)
    [second] = await store.claim(worker="w", limit=5, run_id=run_id)
    assert (second.step, second.attempt) == ("flaky", 2)
    # The last attempt: no retry whatever the caller asks; the failure trigger fires.
    last = await store.complete(graph, second, status=F, error="no", retry_after=10)
    assert last.due_in is None and last.ready == 1
    result = await store.load_result(run_id)
    assert [(s.step, s.attempt, s.status.value) for s in result.steps] == [
        ("flaky", 1, "failure"), ("flaky", 2, "failure"), ("handler", 1, "ready"),
    ]  # fmt: skip


async def test_the_worker_retries_when_the_backoff_is_over(tmp_path: Path) -> None:
    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    graph = flaky_program(attempts=3)
    fails = {1, 2}

    def outcome(launch: StepLaunch) -> ExecResult | None:
        if launch.step.name != "flaky":
            return ExecResult(ok=True)
        if launch.claim.attempt in fails:
            return ExecResult(ok=False, value=1, error="command 'false' exited with 1")
        return ExecResult(ok=True, value=0)

    fake = FakeExecutor(outcome=outcome)
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(graph, program_id=program_id, triggers=[("go", "0")])
    worker = Worker(
        store=store, scope=Scope(run_id=run_id), config=WorkerConfig(log_dir=tmp_path),
        programs=OwnProgram(graph), route=lambda step: (fake, step),
        monotonic=clock.monotonic, random=lambda: 0.0,
    )  # fmt: skip

    def attempts() -> int:
        return len(fake.launches)

    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(worker.run())
        for expected, backoff in ((1, 10), (2, 20)):
            await store.wait_until(lambda expected=expected: attempts() == expected)
            # Wait until the failure is recorded, then let the backoff pass, on the store's
            # clock and the worker's, and tell the worker (as a NOTIFY or its poll would).
            await store.wait_until(
                lambda expected=expected: len(store.step_runs(run_id)) == expected + 1
            )
            clock.advance(backoff)
            store.notifier.notify(run_id)
    result = await store.load_result(run_id)
    assert [(s.attempt, s.status.value) for s in result.steps] == [
        (1, "failure"), (2, "failure"), (3, "success"),
    ]  # fmt: skip
    assert result.ok and result.status is RunStatus.success


async def test_following_a_step_log_moves_on_to_its_next_attempt(tmp_path: Path) -> None:
    from aeventor import queries
    from aeventor.records import run_log_dir, step_log_path

    clock = FakeClock()
    store = InMemoryStore(clock=clock)
    graph = flaky_program(attempts=2)
    program_id = await store.register_program(graph.program)
    run_id, _ = await store.create_run(
        graph, program_id=program_id, triggers=[("go", "0")], log_dir=str(tmp_path)
    )
    run_dir = run_log_dir(tmp_path, "flaky", run_id)

    def write(attempt: int, text: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        step_log_path(run_dir, "flaky", "0", attempt).write_text(text)

    await asyncio.to_thread(write, 1, "first try\n")
    [first] = await store.claim(worker="w", limit=5, run_id=run_id)
    log = await queries.log_file(store, run_id, "flaky")
    seen: list[str] = []

    async def follow() -> None:
        async for text in queries.follow_log(store, log, poll=0.01):
            seen.append(text)

    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(follow())
        await store.complete(graph, first, status=F, error="no", retry_after=1)
        await asyncio.to_thread(write, 2, "second try\n")
        clock.advance(1)
        [second] = await store.claim(worker="w", limit=5, run_id=run_id)
        await store.complete(graph, second, status=StepStatus.success)
    text = "".join(seen)
    assert text.index("first try") < text.index("flaky.0.2.log") < text.index("second try")
