"""Pools across processes and hosts: a cluster pool shared by runs on two agents never has more
holders than slots, and a slot whose holder was killed with SIGKILL comes back (standalone
controllers and agents alike). The steps' own journal says what ran when."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aeventor as evr
from tests.backends import backend_url
from tests.integration import stepfuncs
from tests.integration.test_pools import ended, journal, most_at_once, started, until_started

from .agents import ALLOW, CLUSTER_KEY, Agents, wait_until, within

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
STEPS = (*ALLOW, "tests.integration.stepfuncs")


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'runs.db'}"
        return
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=["postgres", "mysql"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


async def start_controller(
    store: str, tmp_path: Path, name: str, *, release: Path | None = None
) -> asyncio.subprocess.Process:
    argv = [store, str(tmp_path / "logs"), str(tmp_path / "journal"), name]
    if release is not None:
        argv.append(str(release))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.acceptance.poolprog", *argv,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def test_a_slot_held_by_a_killed_controller_comes_back(
    any_store: str, tmp_path: Path
) -> None:
    """Run ``a`` holds the cluster pool's one slot when its controller is SIGKILLed; run ``b``,
    waiting for it in another process, gets it once ``a``'s lease (2 s) lapsed."""
    log = tmp_path / "journal"
    first = await start_controller(any_store, tmp_path, "a", release=tmp_path / "never")
    try:
        await until_started(log, ["hold.a"])
        second = await start_controller(any_store, tmp_path, "b")
        try:

            async def b_waits() -> bool:
                listed = await evr.runs(any_store, program="pool_b")
                if not listed:
                    return False
                found = await evr.run_result(any_store, listed[0].run_id)
                return [s.status for s in found.steps] == [evr.StepStatus.waiting]

            await wait_until(b_waits, what="run b's step to wait for the slot")
            killed_at = time.time()
            first.send_signal(signal.SIGKILL)
            await first.wait()
            out, _ = await within(second.communicate(), what="run b to end")
            assert second.returncode == 0, out.decode()
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    records = await journal(log)
    b_start = next(at for what, label, at in records if (what, label) == ("start", "hold.b"))
    assert b_start > killed_at
    assert "hold.a" not in await ended(log)
    b = await evr.run_result(any_store, out.decode().split()[-1])
    assert b.ok, b.reason


async def test_a_cluster_pool_is_shared_by_runs_on_two_hosts(
    shared_store: str, agents: Agents, tmp_path: Path
) -> None:
    """A cluster pool of 2, taken by the steps of two runs whose steps run on two agents
    (hosts h1 and h2): never 3 holders at once, counted from the steps' own records."""
    await agents.start(shared_store, "h1", allow=STEPS)
    await agents.start(shared_store, "h2", allow=STEPS)
    log = tmp_path / "journal"

    def program(name: str, host: str) -> evr.Eventor:
        ev = evr.Eventor(name=name, store=shared_store, mode="distributed", cluster_key=CLUSTER_KEY)
        ev.add_pool("licence", 2, scope="cluster")
        ev.add_event("go")
        ev.add_step(
            "work", stepfuncs.occupy, host=host, acquires=[("licence", 1)],
            kwargs={"journal": str(log), "seconds": 0.2},
        )  # fmt: skip
        ev.add_assoc("go", "work")
        for sequence in range(5):
            ev.trigger_event("go", f"{host}x{sequence}")
        return ev

    results = await within(
        asyncio.gather(program("left", "h1").run(), program("right", "h2").run()),
        what="both runs",
    )
    assert all(r.ok for r in results), [r.reason for r in results]
    assert len(await ended(log)) == 10
    assert most_at_once(await journal(log)) <= 2
    hosts = {label.split(".")[1][:2] for label in await started(log)}
    assert hosts == {"h1", "h2"}


async def test_a_distributed_runs_limit_holds_across_its_agents(
    shared_store: str, agents: Agents, tmp_path: Path
) -> None:
    """``max_concurrency=2`` of a distributed run: at most 2 of its steps at once, whichever of
    its two agents runs them."""
    await agents.start(shared_store, "h1", allow=STEPS)
    await agents.start(shared_store, "h2", allow=STEPS)
    log = tmp_path / "journal"
    ev = evr.Eventor(
        name="limited", store=shared_store, mode="distributed", cluster_key=CLUSTER_KEY,
        max_concurrency=2,
    )  # fmt: skip
    ev.add_event("go")
    for host in ("h1", "h2"):
        ev.add_step(
            f"on_{host}", stepfuncs.occupy, host=host, kwargs={"journal": str(log), "seconds": 0.2}
        )
        ev.add_assoc("go", f"on_{host}")
    for sequence in range(4):
        ev.trigger_event("go", sequence)
    result = await within(ev.run(), what="the run")
    assert result.ok, result.reason
    assert len(await ended(log)) == 8
    assert most_at_once(await journal(log)) <= 2


@pytest.mark.postgres
async def test_a_slot_held_on_a_killed_agent_comes_back(
    pg_store: str, agents: Agents, tmp_path: Path
) -> None:
    """The agent of h1 is SIGKILLed while its step holds the cluster pool's one slot; the step
    of another run, on h2, waiting for it, runs once the dead agent's lease lapsed."""
    doomed = await agents.start(pg_store, "h1", allow=STEPS)
    await agents.start(pg_store, "h2", allow=STEPS)
    log = tmp_path / "journal"

    def program(name: str, host: str, release: Path | None) -> evr.Eventor:
        ev = evr.Eventor(name=name, store=pg_store, mode="distributed", cluster_key=CLUSTER_KEY)
        ev.add_pool("licence", 1, scope="cluster")
        ev.add_event("go")
        ev.add_event("lost")
        ev.add_step(
            "hold", stepfuncs.occupy, host=host, acquires=[("licence", 1)],
            kwargs={"journal": str(log), "release": None if release is None else str(release)},
            triggers={evr.StepStatus.failure: ("lost",)},
        )  # fmt: skip
        ev.add_assoc("go", "hold")
        ev.trigger_event("go", host)
        return ev

    first = program("first", "h1", tmp_path / "never").start()
    await until_started(log, ["hold.h1"])
    second = program("second", "h2", None).start()

    async def second_waits() -> bool:
        try:
            found = await evr.run_result(pg_store, second.run_id)
        except evr.AeventorError:  # not submitted yet
            return False
        return [s.status for s in found.steps] == [evr.StepStatus.waiting]

    await wait_until(second_waits, what="the second run's step to wait for the slot")
    killed_at = time.time()
    os.kill(doomed.pid, signal.SIGKILL)
    await doomed.proc.wait()
    result = await within(second.wait(), what="the second run")
    assert result.ok, result.reason
    records = await journal(log)
    start = next(at for what, label, at in records if (what, label) == ("start", "hold.h2"))
    assert start > killed_at
    # The dead agent's step run is recorded lost by the live agent's reaper.
    lost = await within(first.wait(), what="the first run")
    assert lost.step("hold", "h1").status is evr.StepStatus.lost
