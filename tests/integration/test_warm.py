"""The warm process pool: ``warm`` function steps (the default for a plain function) are
forked by the executor's zygote, isolated from each other and from the zygote as fresh
processes are; ``executor="process"`` keeps a fresh interpreter. Real processes throughout,
on an in-memory store (the store is not what is tested here)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import aeventor as evr
from aeventor.backends.executors import _zygote, runner
from aeventor.backends.executors.local import LocalExecutor
from aeventor.dispatch.claims import Claim
from aeventor.dispatch.executor import StepLaunch
from aeventor.program.model import StepDef

from ..waiting import pid_alive, session_members, wait_until
from . import stepfuncs, warmfuncs
from .test_steps import PROJECT_ROOT, with_project_on_path

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

S = evr.StepStatus


def eventor(tmp_path: Path, name: str = "warm") -> evr.Eventor:
    ev = evr.Eventor(name=name, store=":memory:", log_dir=tmp_path / "logs")
    ev.add_event("go")
    return ev


async def run(ev: evr.Eventor) -> evr.RunResult:
    ev.trigger_event("go")
    return await asyncio.wait_for(ev.run(), 30)


def value(result: evr.RunResult, step: str) -> Any:
    run = result.step(step)
    assert run.status is S.success, (step, run.error)
    return run.result


def _read_log(result: evr.RunResult, step: str) -> str:
    path = result.log_path(result.step(step))
    return "" if path is None or not path.exists() else path.read_text()


async def log_of(result: evr.RunResult, step: str) -> str:
    return await asyncio.to_thread(_read_log, result, step)


async def gone(pid: int) -> None:
    await wait_until(lambda: not pid_alive(pid), what=f"process {pid} to be gone")


async def test_warm_steps_are_forked_by_one_zygote_and_process_steps_start_fresh(
    tmp_path: Path,
) -> None:
    ev = eventor(tmp_path)
    ev.add_step("w1", warmfuncs.whoami)
    ev.add_step("w2", warmfuncs.whoami, executor="warm")
    ev.add_step("fresh", warmfuncs.whoami, executor="process")
    ev.add_assoc("go", "w1", "w2", "fresh")
    result = await run(ev)
    w1, w2, fresh = (value(result, s) for s in ("w1", "w2", "fresh"))
    assert ev.program.steps["w1"].executor == "warm"
    # Both warm steps are children of the same zygote, not of this (the worker's) process.
    assert w1["ppid"] == w2["ppid"] != os.getpid()
    assert w1["pid"] != w2["pid"]
    # A fresh interpreter is the worker's own child, started as the step runner.
    assert fresh["ppid"] == os.getpid()
    assert fresh["argv"][:2] == ["-c", "--lifeline"]
    # Each leads a session of its own; the recorded pid is the step's.
    for name, who in (("w1", w1), ("w2", w2), ("fresh", fresh)):
        assert who["sid"] == who["pid"] == result.step(name).pid
    # The run's executor is closed: so is its zygote.
    await gone(w1["ppid"])


async def test_a_warm_step_changes_no_other_steps_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARM_INHERITED", "yes")
    monkeypatch.setenv("AEVENTOR_CLUSTER_KEY", "not-for-steps")
    ev = eventor(tmp_path)
    ev.add_event("changed")
    ev.add_step(
        "changer", warmfuncs.set_env, args=["WARM_LEAK", "leaked"], env={"MINE": "changer's"},
        triggers={S.success: ("changed",)},
    )  # fmt: skip
    ev.add_step("warm", warmfuncs.environ, env={"OWN": "warm's"})
    ev.add_step("fresh", warmfuncs.environ, env={"OWN": "warm's"}, executor="process")
    ev.add_assoc("go", "changer")
    ev.add_assoc("changed", "warm", "fresh")
    result = await run(ev)
    changer, warm, fresh = (value(result, s) for s in ("changer", "warm", "fresh"))
    assert "WARM_LEAK" not in warm and "MINE" not in warm
    assert warm["WARM_INHERITED"] == "yes" and warm["OWN"] == "warm's"
    assert "AEVENTOR_CLUSTER_KEY" not in warm
    assert warm["EVENTOR_STEP_NAME"] == "warm"
    # Exactly what a fresh process gets, but for its name and its channel's descriptor.
    mine = {"EVENTOR_STEP_NAME", "EVENTOR_CHANNEL_FD"}
    assert {k: v for k, v in warm.items() if k not in mine} == {
        k: v for k, v in fresh.items() if k not in mine
    }
    assert changer["ppid"] != os.getpid()


@pytest.mark.parametrize("how", ["ctypes", "kill"])
async def test_a_crashing_warm_step_fails_alone_and_the_zygote_forks_the_next(
    tmp_path: Path, how: str
) -> None:
    ev = eventor(tmp_path)
    ev.add_event("crash")
    ev.add_event("crashed")
    ev.add_step("before", warmfuncs.whoami, triggers={S.success: ("crash",)})
    ev.add_step("exits_3", warmfuncs.exit_with, args=[3], triggers={S.failure: ("crashed",)})
    ev.add_step("segfaults", warmfuncs.segfault, args=[how], triggers={S.failure: ("crashed",)})
    ev.add_step("after", warmfuncs.whoami)
    ev.add_assoc("go", "before")
    ev.add_assoc("crash", "exits_3", "segfaults")
    ev.add_assoc("crashed", "after")
    result = await run(ev)
    exited, segfaulted = result.step("exits_3"), result.step("segfaults")
    assert exited.status is segfaulted.status is S.failure
    assert "its process exited with 3 before reporting a result" in (exited.error or "")
    assert f"exited with {-signal.SIGSEGV} before" in (segfaulted.error or "")
    # The same zygote forked the step after the crashes.
    assert value(result, "after")["ppid"] == value(result, "before")["ppid"]


async def test_a_warm_step_that_ignores_sigterm_is_killed_at_its_timeout_with_its_child(
    tmp_path: Path,
) -> None:
    report = tmp_path / "stubborn.json"
    ev = eventor(tmp_path)
    ev.add_step("stubborn", stepfuncs.stubborn, kwargs={"report": str(report)}, timeout=1)
    ev.add_assoc("go", "stubborn")
    result = await run(ev)
    step = result.step("stubborn")
    assert step.status is S.failure
    assert "ran longer than its timeout of 1s" in (step.error or "")
    import json

    pids = json.loads(await asyncio.to_thread(report.read_text))
    for pid in (pids["pid"], pids["child"]):
        await gone(pid)


async def test_a_warm_steps_output_and_its_modules_import_output_go_to_its_log(
    tmp_path: Path,
) -> None:
    ev = eventor(tmp_path)
    ev.add_event("next")
    ev.add_step("logs", stepfuncs.log_and_print)
    ev.add_step("first", warmfuncs.whoami, triggers={S.success: ("next",)})
    ev.add_step("second", warmfuncs.whoami)
    ev.add_assoc("go", "logs", "first")
    ev.add_assoc("next", "second")
    result = await run(ev)
    assert value(result, "logs") == "logged"
    text = await log_of(result, "logs")
    assert "logged by the step" in text and "printed by the step\n" in text
    # The zygote imported warmfuncs for the first step, which got what the import printed;
    # the second was forked with the module imported.
    zygote = value(result, "first")["ppid"]
    assert await log_of(result, "first") == f"warmfuncs imported in {zygote}\n"
    assert value(result, "second")["ppid"] == zygote
    assert await log_of(result, "second") == ""


async def test_a_warm_step_fires_events_through_its_channel(tmp_path: Path) -> None:
    ev = eventor(tmp_path)
    ev.add_event("next")
    ev.add_step("looper", stepfuncs.fire_events, args=["next", 3])
    ev.add_step("async_firer", stepfuncs.fire_from_async, args=["next"], executor="warm")
    ev.add_step("each", command=["true"])
    ev.add_assoc("go", "looper", "async_firer")
    ev.add_assoc("next", "each")
    result = await run(ev)
    assert value(result, "looper") > 0  # the undefined event was refused to the step
    assert value(result, "async_firer") == "async_firer"
    assert sorted(s.sequence for s in result.steps if s.step == "each") == ["0", "1", "2"]


async def test_a_module_that_fails_to_import_fails_the_step_as_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    ev = eventor(tmp_path)
    refuse = {"WARMFUNCS_REFUSE": "1"}
    ev.add_step("warm", warmfuncs.whoami, env=refuse)
    ev.add_step("fresh", warmfuncs.whoami, env=refuse, executor="process")
    ev.add_assoc("go", "warm", "fresh")
    result = await run(ev)
    warm, fresh = result.step("warm"), result.step("fresh")
    assert warm.status is fresh.status is S.failure
    assert "RuntimeError: warmfuncs refuses to be imported here" in (warm.error or "")
    assert warm.error == fresh.error
    # The child imported it again (the zygote's failed attempt printed nowhere).
    assert (await log_of(result, "warm")).count("warmfuncs imported in") == 1


async def test_a_module_that_starts_threads_at_import_is_imported_in_each_step(
    tmp_path: Path,
) -> None:
    ev = eventor(tmp_path)
    ev.add_event("next")
    threads = {"WARMFUNCS_THREAD": "1"}
    ev.add_step("first", warmfuncs.whoami, env=threads, triggers={S.success: ("next",)})
    ev.add_step("second", warmfuncs.whoami, env=threads)
    ev.add_step("plain", stepfuncs.add, kwargs={"a": 1, "b": 2})
    ev.add_assoc("go", "first")
    ev.add_assoc("next", "second", "plain")
    result = await run(ev)
    first, second = value(result, "first"), value(result, "second")
    # The zygote that imported it retired; each step imported it in its own process.
    assert first["ppid"] == second["ppid"] != os.getpid()
    assert first["threads"] == second["threads"] == 2
    for step, who in (("first", first), ("second", second)):
        assert await log_of(result, step) == f"warmfuncs imported in {who['pid']}\n"
    assert value(result, "plain") == 3


async def test_a_killed_zygote_fails_its_running_step_and_is_replaced(tmp_path: Path) -> None:
    report, release = tmp_path / "report", tmp_path / "release"
    ev = eventor(tmp_path)
    ev.add_event("lost")
    ev.add_step(
        "holder", warmfuncs.report_and_wait, args=[str(report), str(release)],
        triggers={S.failure: ("lost",)},
    )  # fmt: skip
    ev.add_step("after", warmfuncs.whoami)
    ev.add_assoc("go", "holder")
    ev.add_assoc("lost", "after")
    ev.trigger_event("go")
    async with ev:
        handle = ev.start()
        await wait_until(lambda: asyncio.to_thread(report.exists), what="the holder to start")
        pid, zygote = map(int, (await asyncio.to_thread(report.read_text)).split())
        os.kill(zygote, signal.SIGKILL)
        result = await asyncio.wait_for(handle.wait(), 30)
    holder = result.step("holder")
    assert holder.status is S.failure
    assert f"the warm pool's zygote (pid {zygote}) exited" in (holder.error or "")
    await gone(pid)
    assert session_members(pid) == []
    assert value(result, "after")["ppid"] not in (zygote, os.getpid())


EDITED_MODULE = '''\
import os
import pathlib

VERSION = {version}


def edit_and_report() -> dict[str, int]:
    """Rewrite this module (the next step must see the new version), report this one."""
    path = pathlib.Path(__file__)
    path.write_text(path.read_text().replace("VERSION = 1\\n", "VERSION = 222\\n"))
    return {{"version": VERSION, "ppid": os.getppid()}}
'''


async def test_a_module_edited_on_disk_is_imported_again_by_a_new_zygote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "edited"
    await asyncio.to_thread(package.mkdir)
    module = package / "warm_edited_module.py"
    await asyncio.to_thread(module.write_text, EDITED_MODULE.format(version=1))
    monkeypatch.syspath_prepend(str(package))
    import importlib

    edited = importlib.import_module("warm_edited_module")
    ev = eventor(tmp_path)
    ev.add_event("next")
    ev.add_step("first", edited.edit_and_report, triggers={S.success: ("next",)})
    ev.add_step("second", edited.edit_and_report)
    ev.add_assoc("go", "first")
    ev.add_assoc("next", "second")
    try:
        result = await run(ev)
    finally:
        monkeypatch.delitem(sys.modules, "warm_edited_module")
    first, second = value(result, "first"), value(result, "second")
    assert (first["version"], second["version"]) == (1, 222)
    assert first["ppid"] != second["ppid"]


async def test_many_warm_steps_at_once_each_get_their_own_process(tmp_path: Path) -> None:
    ev = eventor(tmp_path)
    names = [f"w{i}" for i in range(40)]
    for name in names:
        ev.add_step(name, warmfuncs.whoami, env={"WHO": name})
    ev.add_assoc("go", *names)
    result = await run(ev)
    seen = [value(result, name) for name in names]
    assert len({who["pid"] for who in seen}) == len(names)
    assert len({who["ppid"] for who in seen}) == 1


async def test_an_import_that_hangs_holds_up_no_other_warm_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aeventor.backends.executors import _warm

    monkeypatch.setattr(_warm, "PRELOAD_LIMIT", 0.5)
    ev = eventor(tmp_path)
    ev.add_event("later")
    ev.add_step("hangs", warmfuncs.whoami, env={"WARMFUNCS_HANG": "300"}, timeout=4)
    # Asked of the zygote while it is stuck importing for "hangs".
    ev.add_step("other", stepfuncs.add, kwargs={"a": 1, "b": 2}, env={"PAD": "x"})
    ev.add_assoc("go", "hangs")
    ev.add_assoc("go", "later", delay=0.2)
    ev.add_assoc("later", "other")
    result = await run(ev)
    hangs, other = result.step("hangs"), result.step("other")
    assert hangs.status is S.failure
    assert "ran longer than its timeout of 4s" in (hangs.error or "")
    assert other.result == 3
    # The zygote gave up the import after 0.5 s, so "other" did not wait for the timeout.
    assert other.ended is not None and hangs.ended is not None
    assert other.ended < hangs.ended


@pytest.mark.parametrize("warm", [1, 2, 0])
async def test_the_executors_warm_pool_size(tmp_path: Path, warm: int) -> None:
    """``LocalExecutor(warm=N)`` runs N zygotes; ``warm=0`` runs warm steps fresh."""
    from aeventor.backends.executors.local import LocalExecutor
    from aeventor.dispatch.claims import Claim
    from aeventor.dispatch.executor import StepLaunch
    from aeventor.program.model import StepDef

    async def started(pid: int) -> None:
        pass

    executor = LocalExecutor(warm=warm)
    step = StepDef(name="who", executor="warm", target=f"{warmfuncs.__name__}:whoami")
    launches = [
        StepLaunch(
            claim=Claim(id=i, run_id="run-1", step="who", sequence=str(i), recovery=0, attempt=1),
            step=step,
            program="prog",
            env={"EVENTOR_LOGGER_NAME": "prog.step"},
            log_path=tmp_path / f"who.{i}.log",
            deterministic_logs=True,
            on_started=started,
        )
        for i in range(6)
    ]
    try:
        results = await asyncio.gather(*(executor.run(launch) for launch in launches))
    finally:
        await executor.aclose()
    assert all(r.ok for r in results), [r.error for r in results]
    parents = {r.value["ppid"] for r in results}
    if warm:
        assert os.getpid() not in parents
        assert 1 <= len(parents) <= warm
    else:
        assert parents == {os.getpid()}


def _launch(tmp_path: Path, i: int, marker: Path, fence: Any) -> StepLaunch:
    async def started(pid: int) -> None:
        raise AssertionError("a fenced launch reports its pid to its fence")

    step = StepDef(
        name="touch", executor="warm", target=f"{warmfuncs.__name__}:touch", args=(str(marker),)
    )
    return StepLaunch(
        claim=Claim(id=i, run_id="run-1", step="touch", sequence=str(i), recovery=0, attempt=1),
        step=step,
        program="prog",
        env={"EVENTOR_LOGGER_NAME": "prog.step"},
        log_path=tmp_path / f"touch.{i}.log",
        deterministic_logs=True,
        on_started=started,
        fence=fence,
    )


async def test_a_warm_step_runs_only_once_its_fence_let_it(tmp_path: Path) -> None:
    """The worker records a warm step's start (its real pid) while its process is held
    back; fenced out, the process ends having run nothing of the step."""
    executor = LocalExecutor()
    markers = [tmp_path / "out.0", tmp_path / "in.1"]
    fenced: list[int] = []

    async def fence(pid: int) -> bool:
        # The process exists, and has run nothing of the step yet.
        assert pid_alive(pid)
        assert not await asyncio.to_thread(markers[len(fenced)].exists)
        fenced.append(pid)
        return len(fenced) == 2

    try:
        assert executor.fences(_launch(tmp_path, 0, markers[0], fence).step)
        await executor.run(_launch(tmp_path, 0, markers[0], fence))
        await gone(fenced[0])
        result = await executor.run(_launch(tmp_path, 1, markers[1], fence))
    finally:
        await executor.aclose()
    assert not await asyncio.to_thread(markers[0].exists)
    # The pid the fence recorded is the step's own.
    assert result.ok and result.value == fenced[1]


GATED_CONTROLLER = """\
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[3])
from tests.integration import test_warm

from aeventor.backends.executors.local import LocalExecutor


async def main(workdir):
    executor = LocalExecutor()

    async def fence(pid):
        tmp = workdir / "pid.tmp"
        tmp.write_text(str(pid))
        os.replace(tmp, workdir / "pid")
        await asyncio.Event().wait()  # the worker's start never commits: it dies first

    await executor.run(test_warm._launch(workdir, 0, workdir / "ran", fence))


asyncio.run(main(Path(sys.argv[1])))
"""


async def test_a_sigkilled_worker_takes_its_held_back_warm_step_along(tmp_path: Path) -> None:
    """A worker that dies while its warm step's start is being recorded leaves the step run
    without a pid (a reaper requeues it): its held-back process must go without running it."""
    script = tmp_path / "controller.py"
    await asyncio.to_thread(script.write_text, GATED_CONTROLLER)
    controller = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(tmp_path),
        "unused",
        str(PROJECT_ROOT),
        cwd=tmp_path,
        env=with_project_on_path(),
        stdout=asyncio.subprocess.DEVNULL,
    )
    pid_file = tmp_path / "pid"
    try:
        await wait_until(
            lambda: asyncio.to_thread(pid_file.exists), what="the held-back step's pid"
        )
        pid = int(await asyncio.to_thread(pid_file.read_text))
        await wait_until(lambda: len(session_members(pid)) >= 2, what="its lifeline's watcher")
    finally:
        controller.kill()
        await controller.wait()
    await gone(pid)
    await wait_until(lambda: session_members(pid) == [], what=f"session {pid} to empty")
    assert not await asyncio.to_thread((tmp_path / "ran").exists)


async def test_warm_step_results_of_any_size_come_back_whole(tmp_path: Path) -> None:
    """A small result comes back through the zygote's result pipe, a larger one through
    the result file (read by the zygote, or, larger still, by the executor): all whole."""
    sizes = {
        "pipe": 600,
        "file": runner.PIPE_RESULT_MAX * 3,
        "large": _zygote.RESULT_INLINE * 3,
    }
    ev = eventor(tmp_path)
    for name, size in sizes.items():
        ev.add_step(name, warmfuncs.sized, args=[size])
        ev.add_assoc("go", name)
    result = await run(ev)
    for name, size in sizes.items():
        assert value(result, name) == warmfuncs.sized(size), name
