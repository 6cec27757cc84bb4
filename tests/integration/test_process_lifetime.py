"""Step processes never outlive their worker: each holds a lifeline (see ``_lifeline``).

A controller script runs a standalone program in a subprocess; the test SIGKILLs it while
its steps run and watches their process trees go. Real processes throughout, on a sqlite
store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.executors import _lifeline

from ..backends import backend_url
from .helpers import DEADLINE, pid_alive, session_members, wait_until
from .test_steps import steps_of, with_project_on_path

#: The controller's steps that start a grandchild: warm, fresh interpreter, command.
STEPS = ("func", "fresh", "cmd")
#: Seconds the steps' processes may take to go once their worker died: the watcher's grace
#: period, and slack for a loaded machine.
GONE_DEADLINE = _lifeline.GRACE + 4.0

CONTROLLER = """\
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aeventor as evr


def spawn_and_sleep(pid_file):
    child = subprocess.Popen(["sleep", "300"])
    Path(pid_file + ".tmp").write_text(f"{os.getpid()} {child.pid}")
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(300)


if __name__ == "__main__":
    store, workdir = sys.argv[1], Path(sys.argv[2])
    ev = evr.Eventor(name="lifetime", store=store, log_dir=workdir / "logs")
    # A warm step (the default: forked by the warm pool's zygote) and a fresh interpreter.
    ev.add_step("func", func=spawn_and_sleep, args=(str(workdir / "func.pids"),))
    ev.add_step(
        "fresh", func=spawn_and_sleep, args=(str(workdir / "fresh.pids"),), executor="process"
    )
    pids = workdir / "cmd.pids"
    script = f"sleep 300 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; sleep 300"
    ev.add_step("cmd", command=["sh", "-c", script])
    start = ev.add_event("start")
    ev.add_assoc(start, "func", "fresh", "cmd")
    ev.trigger_event(start)
    print(os.getpid(), flush=True)
    asyncio.run(ev.run())
"""


def _read_pids(path: Path) -> tuple[int, int] | None:
    try:
        leader, grandchild = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return int(leader), int(grandchild)


def _pipes(pid: int) -> dict[int, set[str]]:
    """The pipes process ``pid`` holds: inode -> the access modes of its ends ("r", "w")."""
    pipes: dict[int, set[str]] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return pipes
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if not target.startswith("pipe:["):
            continue
        flags = int(
            next(line for line in info.splitlines() if line.startswith("flags:")).split()[1], 8
        )
        mode = "w" if flags & os.O_ACCMODE == os.O_WRONLY else "r"
        pipes.setdefault(int(target[6:-1]), set()).add(mode)
    return pipes


def _session_pipes(session: int) -> dict[int, set[str]]:
    pipes: dict[int, set[str]] = {}
    for pid in session_members(session):
        for inode, modes in _pipes(pid).items():
            pipes.setdefault(inode, set()).update(modes)
    return pipes


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _kill_all(pids: set[int]) -> None:
    """Should the engine leave them behind, do not let them outlive the test."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_sigkilled_worker_takes_its_steps_and_grandchildren_along(tmp_path: Path) -> None:
    (tmp_path / "controller.py").write_text(CONTROLLER)
    err = await asyncio.to_thread(open, tmp_path / "controller.err", "wb")
    with err, backend_url("sqlite", tmp_path) as store:
        controller = await asyncio.create_subprocess_exec(
            sys.executable,
            str(tmp_path / "controller.py"),
            store,
            str(tmp_path),
            cwd=tmp_path,
            env=with_project_on_path(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
        seen: set[int] = set()
        sessions: dict[str, int] = {}
        grandchildren: dict[str, int] = {}
        try:
            await wait_until(
                lambda: all(_read_pids(tmp_path / f"{s}.pids") for s in STEPS),
                what="both steps' pid files",
            )
            for step in STEPS:
                pids = _read_pids(tmp_path / f"{step}.pids")
                assert pids is not None
                sessions[step] = pids[0]
                grandchildren[step] = pids[1]
                seen.update(pids)
            for step, leader in sessions.items():
                # The leader leads its session; its watcher is in it (forked at its start).
                await wait_until(
                    lambda leader=leader: len(session_members(leader)) >= 3,  # type: ignore[misc]
                    what=f"step {step}'s leader, grandchild and watcher",
                )
                assert grandchildren[step] in session_members(leader)
                seen.update(session_members(leader))
            # The warm step was forked by the controller's zygote, which must go too; the
            # fresh interpreter is the controller's own child.
            zygote = await asyncio.to_thread(_ppid, sessions["func"])
            assert zygote not in (controller.pid, None)
            assert await asyncio.to_thread(_ppid, sessions["fresh"]) == controller.pid
            seen.add(zygote)

            # Each lifeline's write end is the controller's alone; its read end reaches one
            # step's session, never another's.
            worker_w = {i for i, modes in _pipes(controller.pid).items() if "w" in modes}
            lifelines = {}
            for step in STEPS:
                pipes = _session_pipes(sessions[step])
                assert not {i for i, modes in pipes.items() if "w" in modes} & worker_w
                lifelines[step] = worker_w & {i for i, m in pipes.items() if "r" in m}
                assert lifelines[step], step
            for step in STEPS:
                for other in STEPS:
                    assert step == other or not lifelines[step] & lifelines[other]

            controller.kill()
            await controller.wait()
            killed = time.monotonic()

            await wait_until(
                lambda: (
                    not any(pid_alive(pid) for pid in seen)
                    and not any(session_members(leader) for leader in sessions.values())
                ),
                what="every step process and grandchild to be gone",
                deadline=GONE_DEADLINE,
            )
            elapsed = time.monotonic() - killed
        finally:
            if controller.returncode is None:
                controller.kill()
                await controller.wait()
            for leader in sessions.values():
                seen.update(session_members(leader))
            _kill_all(seen)

    # The steps' logs say why they ended.
    logs = [p.read_text() for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    assert sum("the worker that started this step is gone" in text for text in logs) == 3, logs
    # Both trees went at SIGTERM (no step here ignores it), not at the grace's SIGKILL.
    assert elapsed < _lifeline.GRACE + 1.0, elapsed


async def test_command_results_pids_and_logs_are_the_commands(tmp_path: Path) -> None:
    pid_file = tmp_path / "sh.pid"
    with backend_url("sqlite", tmp_path) as store:
        ev = evr.Eventor(name="prog", store=store, log_dir=tmp_path / "logs")
        ev.add_step(
            "ok",
            command=["sh", "-c", f"echo $$ > {pid_file}; echo out; echo err >&2; sleep 0.01"],
        )
        ev.add_step("exits_3", command=["sh", "-c", "exit 3"])
        ev.add_step("signalled", command=["sh", "-c", "kill -TERM $$"])
        ev.add_step("missing", command=["no-such-command-aeventor"])
        # An ignored SIGPIPE would make `yes` fail with EPIPE instead of dying quietly.
        ev.add_step("pipe", command=["sh", "-c", "yes | head -n 1"])
        start = ev.add_event("start")
        ev.add_assoc(start, "ok", "exits_3", "signalled", "missing", "pipe")
        ev.trigger_event(start)

        result = await ev.run()

    assert steps_of(result) == [
        ("exits_3", "0", "failure"),
        ("missing", "0", "failure"),
        ("ok", "0", "success"),
        ("pipe", "0", "success"),
        ("signalled", "0", "failure"),
    ]
    ok = result.step("ok")
    assert ok.result == 0
    # The recorded pid is the command's own ($$), not a wrapper's.
    assert ok.pid == int(pid_file.read_text())
    log_path = result.log_path(ok)
    assert log_path is not None
    assert log_path.read_text().splitlines() == ["out", "err"]
    exits = result.step("exits_3")
    assert (exits.result, exits.error) == (3, "command 'sh' exited with 3")
    signalled = result.step("signalled")
    assert signalled.result == -signal.SIGTERM
    assert signalled.error == f"command 'sh' exited with {-signal.SIGTERM}"
    missing = result.step("missing")
    assert missing.error is not None
    assert (
        "cannot start 'no-such-command-aeventor': [Errno 2] No such file or directory: "
        "'no-such-command-aeventor'"
    ) in missing.error
    pipe = result.step("pipe")
    log_path = result.log_path(pipe)
    assert log_path is not None
    assert log_path.read_text() == "y\n"
    # A step that ended leaves no watcher behind.
    await wait_until(lambda: session_members(ok.pid) == [], what="the ended step's watcher to exit")


async def test_step_left_running_by_a_finished_step_keeps_running(tmp_path: Path) -> None:
    """As before lifelines: a normal end does not kill what a step started in background."""
    pid_file = tmp_path / "daemon.pid"
    with backend_url("sqlite", tmp_path) as store:
        ev = evr.Eventor(name="prog", store=store, log_dir=tmp_path / "logs")
        script = f"sleep 300 >/dev/null 2>&1 & echo $! > {pid_file}"
        ev.add_step("bg", command=["sh", "-c", script])
        start = ev.add_event("start")
        ev.add_assoc(start, "bg")
        ev.trigger_event(start)
        result = await ev.run()
    daemon = int(pid_file.read_text())
    try:
        assert result, result.reason
        leader = result.step("bg").pid
        assert leader is not None
        # Only the daemon is left in the step's session: the watcher went, quietly.
        await wait_until(
            lambda: session_members(leader) == [daemon],
            what="the step's session to hold its daemon alone",
            deadline=DEADLINE,
        )
    finally:
        _kill_all({daemon})
