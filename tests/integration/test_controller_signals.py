"""A standalone controller (a process in ``await ev.run()``) stopped by SIGTERM or SIGKILL:
SIGTERM drains (grace, then terminate) and records the run cancelled before the process dies
of the signal; after SIGKILL its leases lapse, so any process can tell, and a reaper records
the lost step runs."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.dispatch.trust import SignedPrograms
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.testing import FakeExecutor

from .helpers import DEADLINE, pid_alive, wait_until
from .test_steps import with_project_on_path

CONTROLLER = """\
import asyncio
import sys
from pathlib import Path

import aeventor as evr

if __name__ == "__main__":
    store, workdir = sys.argv[1], Path(sys.argv[2])
    ev = evr.Eventor(name="signals", store=store, log_dir=workdir / "logs", lease=2, grace=1)
    pid_file = workdir / "long.pid"
    ev.add_step("long", command=["sh", "-c", f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 300"])
    ev.add_step("after")
    start = ev.add_event("start")
    done = ev.add_event("done")
    ev.add_assoc(start, "long")
    ev.add_assoc(done, "after")
    ev.trigger_event(start)
    asyncio.run(ev.run())
"""


async def _start_controller(tmp_path: Path, store: str) -> asyncio.subprocess.Process:
    await asyncio.to_thread((tmp_path / "controller.py").write_text, CONTROLLER)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "controller.py"),
        store,
        str(tmp_path),
        cwd=tmp_path,
        env=with_project_on_path(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


async def _pid(path: Path) -> int | None:
    return await asyncio.to_thread(_read_pid, path)


async def test_sigterm_drains_and_records_the_run_cancelled(tmp_path: Path, store_url: str) -> None:
    store = store_url
    if True:  # one level, as the SIGKILL test
        controller = await _start_controller(tmp_path, store)
        try:
            await wait_until(lambda: _has_pid(tmp_path / "long.pid"), what="the step")
            step_pid = await _pid(tmp_path / "long.pid")
            assert step_pid is not None
            controller.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                code = await controller.wait()
        finally:
            if controller.returncode is None:
                controller.kill()
                await controller.wait()
        # It died of the signal, as it would have without aeventor, once it had recorded.
        assert code == -signal.SIGTERM
        await wait_until(lambda: not pid_alive(step_pid), what="the step process to go", deadline=5)
        async with open_store(store, program="check") as db:
            (run,) = await db.list_runs()
            result = await db.load_result(run.run_id)
        assert result.status is evr.RunStatus.cancelled, result
        assert result.reason is not None and "SIGTERM" in result.reason
        assert [(s.step, s.status) for s in result.steps] == [("long", evr.StepStatus.cancelled)]


async def test_sigkilled_controller_leaves_leases_that_lapse_and_are_reaped(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "killed.db")
    if True:
        controller = await _start_controller(tmp_path, store)
        try:
            await wait_until(lambda: _has_pid(tmp_path / "long.pid"), what="the step")
            controller.kill()
            await controller.wait()
        finally:
            if controller.returncode is None:
                controller.kill()
                await controller.wait()
        async with open_store(store, program="check") as db:
            # Nobody renews the lease any more: within its 2 s it lapses, for anyone to see.
            await wait_until(
                lambda: _lapsed(db), what="the dead controller's lease to lapse", deadline=10
            )
            # A reaper that has been beating for longer than a lease (it judges nobody
            # lost before: see test_worker's outage test).
            elapsed = [0.0]
            reaper = Worker(
                store=db,
                scope=Scope(hosts=()),
                config=WorkerConfig(reap=True, log_dir=tmp_path / "reaper"),
                programs=SignedPrograms(db, key=b"k" * 32, allow=()),
                route=lambda step: (FakeExecutor(), step),
                monotonic=lambda: elapsed[0],
            )
            elapsed[0] = reaper.config.lease
            await reaper._beat()  # and its last beat is recent
            assert await reaper.reap() == 1
            (run,) = await db.list_runs()
            result = await db.load_result(run.run_id)
        assert result.status is evr.RunStatus.failure, result
        long = result.step("long")
        assert long.status is evr.StepStatus.lost
        assert long.error is not None and long.error.startswith("lost")


async def _lapsed(db: object) -> bool:
    return bool(await db.lapsed_leases())  # type: ignore[attr-defined]


async def _has_pid(path: Path) -> bool:
    return await _pid(path) is not None
