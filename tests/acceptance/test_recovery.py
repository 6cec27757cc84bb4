"""Recovering runs with real process steps, through the installed ``aeventor`` script and
``ev.run(recover=...)``, on sqlite and Postgres: a fixed step reruns with only what follows
it; a controller killed with SIGKILL is recovered at once; a live one is not; a changed
program is refused unless forced; two recoveries at once recover once; ``rerun``.

Which step processes ran is read from the file the steps append to as they start, not from
the store: the store could be wrong about what it never ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aeventor as evr
from tests.backends import backend_url

from ..waiting import pid_alive, wait_until, within

pytestmark = pytest.mark.timeout(120)

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))
PROGRAM = Path(__file__).with_name("recprog.py")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "runs.db")
        return
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The steps' directory, with a copy of the program script (run from there)."""
    directory = tmp_path / "state"
    directory.mkdir()
    shutil.copy(PROGRAM, directory / "recprog.py")
    return directory


def env(state: Path) -> dict[str, str]:
    return {**os.environ, "REC_STATE": str(state)}


def program(state: Path, store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(state / "recprog.py"), store, *args],
        capture_output=True, text=True, timeout=90, env=env(state), check=False,
    )  # fmt: skip


def cli(state: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AEVENTOR, *argv], capture_output=True, text=True, timeout=90, env=env(state),
        check=False, cwd=state,
    )  # fmt: skip


def ran(state: Path) -> list[str]:
    path = state / "ran.txt"
    return path.read_text().split() if path.exists() else []


def failed_run(state: Path, store: str) -> str:
    """A run in which b fails: a ran and succeeded, c and d never started."""
    (state / "b.fail").touch()
    done = program(state, store)
    assert done.returncode == 1, done.stderr
    assert sorted(ran(state)) == ["a", "b"]
    (state / "b.fail").unlink()  # the cause is fixed
    return done.stdout.strip()


@pytest.mark.parametrize("store", ["sqlite", "postgres", "mysql"], indirect=True)
def test_recover_reruns_the_failed_step_and_what_follows_only(state: Path, store: str) -> None:
    run_id = failed_run(state, store)
    shown = cli(state, "show", run_id[:8], "--store", store)
    assert shown.returncode == 1, shown.stderr

    done = cli(state, "recover", run_id[:8], "--store", store)
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} of recprog: recovery 1" in done.stdout
    assert "b[0] success" in done.stdout and f"run {run_id}: success" in done.stdout
    # a's process never started again; b ran again; c and d ran for the first time.
    assert sorted(ran(state)[:2]) == ["a", "b"]
    assert ran(state)[2:] == ["b", "c", "d"]

    result = asyncio.run(evr.run_result(store, run_id))
    assert result.ok and result.recovery == 1
    assert [(s.step, s.recovery, s.status.value) for s in result.steps][2:] == [
        ("b", 1, "success"), ("c", 1, "success"), ("d", 1, "success"),
    ]  # fmt: skip
    # The recovered generation's logs are beside the first one's.
    assert result.log_dir is not None
    assert {p.name for p in result.log_dir.iterdir()} >= {"b.0.log", "b.0.r1.log", "d.0.r1.log"}
    assert "recovery 1 started: running b[0]" in (result.log_dir / "program.log").read_text()

    again = cli(state, "recover", run_id[:8], "--store", store)
    assert again.returncode == 6, again.stdout
    assert "succeeded: nothing to recover" in again.stderr


def test_rerun_runs_one_step_and_what_follows_it(state: Path, store: str) -> None:
    done = program(state, store)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    (state / "ran.txt").unlink()

    rerun = cli(state, "rerun", run_id, "c", "--store", store, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert ran(state) == ["c", "d"]
    assert '"recovery": 1' in rerun.stdout

    unknown = cli(state, "rerun", run_id, "zz", "--store", store)
    assert unknown.returncode == 2
    assert "has no step 'zz'; its steps: a, b, c, d" in unknown.stderr


async def test_a_controller_killed_with_sigkill_is_recovered_at_once(
    state: Path, store: str
) -> None:
    (state / "b.wait").touch()
    controller = await asyncio.create_subprocess_exec(
        sys.executable, str(state / "recprog.py"), store, env=env(state),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_until((state / "b.started").exists, what="step b to start")
        b_pid = int((state / "b.started").read_text())
        # A live controller is not abandoned: recovery is refused, and says why.
        refused = await asyncio.to_thread(
            cli, state, "recover", _only_run(store, state), "--store", store
        )
        assert refused.returncode == 4, refused.stderr
        assert "still running" in refused.stderr and "alive: process" in refused.stderr
        controller.kill()  # SIGKILL: no drain, no final write
        await controller.wait()
    finally:
        if controller.returncode is None:
            controller.kill()
            await controller.wait()
    # The step dies with its controller (its lifeline).
    await wait_until(lambda: not pid_alive(b_pid), what="step b to die with its controller")
    (state / "b.wait").unlink()
    run_id = _only_run(store, state)
    assert (await evr.run_result(store, run_id)).status is evr.RunStatus.running
    # The controller ran on this host and its pid is gone: no waiting for its 120 s lease.
    began = time.monotonic()
    done = await within(
        asyncio.to_thread(cli, state, "recover", run_id, "--store", store),
        what="the recovery",
        deadline=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 60
    result = await evr.run_result(store, run_id)
    assert result.ok, result.reason
    statuses = [(s.step, s.recovery, s.status.value) for s in result.steps]
    assert ("a", 0, "success") in statuses and ("b", 0, "lost") in statuses
    assert [s for s in statuses if s[1] == 1] == [
        ("b", 1, "success"), ("c", 1, "success"), ("d", 1, "success"),
    ]  # fmt: skip
    assert ran(state).count("a") == 1 and ran(state).count("b") == 2


def _only_run(store: str, state: Path) -> str:
    runs = subprocess.run(
        [AEVENTOR, "runs", "--store", store, "--json"], capture_output=True, text=True,
        timeout=60, check=True, env=env(state),
    )  # fmt: skip
    [run] = json.loads(runs.stdout)
    return str(run["run_id"])


def test_a_changed_program_is_refused_unless_forced(state: Path, store: str) -> None:
    run_id = failed_run(state, store)
    # From the changed script (a step added): refused, nothing runs.
    refused = program(state, store, "--extra", f"--recover={run_id}")
    assert refused.returncode == 2, refused.stderr
    assert "changed since run" in refused.stderr and "force=True" in refused.stderr
    assert sorted(ran(state)) == ["a", "b"]
    assert asyncio.run(evr.run_result(store, run_id)).recovery == 0
    # Forced: the run goes on with the new definition (e has never run: it runs now).
    forced = program(state, store, "--extra", f"--recover={run_id}", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(ran(state)[2:]) == ["b", "c", "d"]  # e: not fired again (go was carried)


def test_the_command_line_refuses_a_run_of_an_older_version(state: Path, store: str) -> None:
    run_id = failed_run(state, store)
    newer = program(state, store, "--extra")  # registers the changed program
    assert newer.returncode == 0, newer.stderr
    refused = cli(state, "recover", run_id, "--store", store)
    assert refused.returncode == 2, refused.stderr
    assert "changed since run" in refused.stderr and "--force" in refused.stderr
    forced = cli(state, "recover", run_id, "--store", store, "--force")
    assert forced.returncode == 0, forced.stderr


def test_two_recoveries_at_once_recover_once(state: Path, store: str) -> None:
    run_id = failed_run(state, store)
    argv = [AEVENTOR, "recover", run_id, "--store", store]
    both = [
        subprocess.Popen(argv, env=env(state), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outcomes = []
    for process in both:
        _, err = process.communicate(timeout=90)
        outcomes.append((process.returncode, err.decode()))
    codes = sorted(code for code, _ in outcomes)
    # One recovered; the other found it recovered meanwhile, running, or already done.
    assert codes[0] == 0 and codes[1] in (4, 6), outcomes
    assert ran(state)[2:] == ["b", "c", "d"]
    assert asyncio.run(evr.run_result(store, run_id)).recovery == 1


def test_a_skipped_step_policy(state: Path, tmp_path: Path) -> None:
    """recovery='skip' keeps a failure: nothing to recover (in the library)."""
    store = str(tmp_path / "skip.db")
    ev = evr.Eventor(name="skipper", store=store, log_dir=tmp_path / "logs")
    ev.add_event("go")
    ev.add_step("flaky", command=["false"], recovery="skip")
    ev.add_assoc("go", "flaky")
    ev.trigger_event("go")
    result = ev.run_sync()
    assert not result
    with pytest.raises(evr.NothingToRecover, match=r"flaky\[0\].*recovery='skip'"):
        asyncio.run(evr.recover(store, result.run_id))


async def _recovering(state: Path, store: str, run_id: str) -> asyncio.subprocess.Process:
    """``aeventor recover`` started with b waiting; returns once b started."""
    (state / "b.wait").touch()
    process = await asyncio.create_subprocess_exec(
        AEVENTOR, "recover", run_id, "--store", store, env=env(state), cwd=state,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    await wait_until((state / "b.started").exists, what="step b to start again")
    return process


async def test_a_killed_recovery_is_recovered_again(state: Path, store: str) -> None:
    run_id = await asyncio.to_thread(failed_run, state, store)
    recovering = await _recovering(state, store, run_id)
    b_pid = int((state / "b.started").read_text())
    recovering.kill()
    await recovering.communicate()
    await wait_until(lambda: not pid_alive(b_pid), what="step b to die with its controller")
    (state / "b.wait").unlink()
    done = await within(
        asyncio.to_thread(cli, state, "recover", run_id, "--store", store), what="recovery 2"
    )
    assert done.returncode == 0, done.stderr
    result = await evr.run_result(store, run_id)
    assert result.ok and result.recovery == 2
    assert [(s.step, s.recovery, s.status.value) for s in result.steps if s.step == "b"] == [
        ("b", 0, "failure"), ("b", 1, "lost"), ("b", 2, "success"),
    ]  # fmt: skip
    assert ran(state).count("a") == 1 and ran(state).count("c") == 1


async def test_sigterm_drains_a_recovery_and_nothing_is_lost(state: Path, store: str) -> None:
    run_id = await asyncio.to_thread(failed_run, state, store)
    recovering = await _recovering(state, store, run_id)
    recovering.send_signal(signal.SIGTERM)
    # The running step gets its grace period: released, it finishes and is recorded.
    (state / "release").touch()
    _, err = await within(recovering.communicate(), what="the drained recovery")
    # Drained, then it dies of the SIGTERM, as a process without aeventor would have.
    assert recovering.returncode == -signal.SIGTERM, err.decode()
    result = await evr.run_result(store, run_id)
    assert result.status is evr.RunStatus.cancelled
    assert result.step("b").status is evr.StepStatus.success
    # Recovering again goes on from there: c and d, and b is not run a third time.
    (state / "b.wait").unlink()
    done = await within(
        asyncio.to_thread(cli, state, "recover", run_id, "--store", store), what="recovery 2"
    )
    assert done.returncode == 0, done.stderr
    assert ran(state)[2:] == ["b", "c", "d"]


def test_a_recovered_runs_deterministic_log_keeps_the_first_generation(tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()

    def build() -> evr.Eventor:
        ev = evr.Eventor(
            name="detrec", store=str(tmp_path / "runs.db"), log_dir=tmp_path / "logs",
            deterministic_logs=True,
        )  # fmt: skip
        ev.add_event("go")
        ev.add_step("check", command=["sh", "-c", f"test ! -e {flag}"])
        ev.add_assoc("go", "check")
        ev.trigger_event("go")
        return ev

    first = build().run_sync()
    assert not first
    flag.unlink()
    again = asyncio.run(build().run(recover=first.run_id))
    assert again.ok and again.log_dir is not None
    text = (again.log_dir / "program.log").read_text()
    assert first.run_id not in text
    assert text.index("step check[0] failure") < text.index("run ended: failure")
    assert text.index("run ended: failure") < text.index("recovery 1 started: running check[0]")
    assert text.index("step check[0] recovery 1 success") < text.rindex("run ended: success")
    assert text.count("event go[0] fired") == 1


DELAYED = """
import sys
import aeventor as evr

ev = evr.Eventor(name="delayed", store=sys.argv[1], log_dir=sys.argv[2] + "/logs")
ev.add_event("go")
ev.add_step("first", command=["sh", "-c", "echo first >> " + sys.argv[2] + "/ran.txt"])
ev.add_step("later", command=["sh", "-c", "echo later >> " + sys.argv[2] + "/ran.txt"])
ev.add_assoc("go", "first")
ev.add_assoc("go", "later", delay=float(sys.argv[3]))
ev.trigger_event("go")
if __name__ == "__main__":
    print(ev.run_sync().run_id)
"""


async def killed_before_its_delay(state: Path, store: str, delay: str) -> str:
    """Run the DELAYED program and SIGKILL its controller once its first step succeeded
    (before the delay is due); return the run's id."""
    script = state / "delayed.py"
    script.write_text(DELAYED)
    controller = await asyncio.create_subprocess_exec(
        sys.executable, str(script), store, str(state), delay, env=env(state),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_until(lambda: ran(state) == ["first"], what="the first step")
        run_id = await asyncio.to_thread(_only_run, store, state)

        async def first_recorded() -> bool:
            result = await evr.run_result(store, run_id)
            return any(s.step == "first" and s.status.value == "success" for s in result.steps)

        await wait_until(first_recorded, what="the first step's success")
    finally:
        controller.kill()
        await controller.communicate()
    return run_id


async def test_a_delay_survives_its_controllers_death(state: Path, store: str) -> None:
    run_id = await killed_before_its_delay(state, store, "4")
    assert ran(state) == ["first"]  # killed before the delay was due
    done = await within(
        asyncio.to_thread(cli, state, "recover", run_id, "--store", store), what="the recovery"
    )
    assert done.returncode == 0, done.stderr
    assert ran(state) == ["first", "later"]
    result = await evr.run_result(store, run_id)
    assert result.ok and result.recovery == 1
    first, later = result.step("first"), result.step("later")
    assert (later.created - first.created).total_seconds() >= 4 - 0.1


INLOOP = """
import os
import sys
import aeventor as evr

async def check(flag: str) -> str:
    if os.path.exists(flag):
        raise RuntimeError("still broken")
    return "fine"

ev = evr.Eventor(name="inl", store=sys.argv[1], log_dir=sys.argv[2] + "/logs")
ev.add_event("go")
ev.add_step("check", check, args=[sys.argv[2] + "/broken"])
ev.add_assoc("go", "check")
ev.trigger_event("go")

if __name__ == "__main__":
    print(ev.run_sync().run_id)
"""


def test_the_command_line_recovers_in_loop_steps_of_a_script(state: Path, tmp_path: Path) -> None:
    """In-loop steps defined in the user's script run in the step runner, found by path."""
    store = str(tmp_path / "inl.db")
    (state / "inl.py").write_text(INLOOP)
    (state / "broken").touch()
    first = subprocess.run(
        [sys.executable, str(state / "inl.py"), store, str(state)], capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    run_id = first.stdout.strip()
    (state / "broken").unlink()
    done = cli(state, "recover", run_id, "--store", store)
    assert done.returncode == 0, done.stderr
    result = asyncio.run(evr.run_result(store, run_id))
    assert result.ok and result.step("check").result == "fine"


async def test_continue_acts_on_what_is_due_and_returns(state: Path, store: str) -> None:
    """The original's RunMode.continue: a run whose controller died with a delay pending is
    continued when the delay is due, from a command that returns (as from cron)."""
    run_id = await killed_before_its_delay(state, store, "3")
    early = await asyncio.to_thread(cli, state, "continue", run_id, "--store", store)
    assert early.returncode == 4, early.stderr  # nothing due yet: the run goes on
    assert "continued" in early.stdout and ran(state) == ["first"]

    async def due() -> bool:
        return (await evr.run_result(store, run_id)).created.timestamp() + 3 < time.time()

    await wait_until(due, what="the delay to be due", deadline=10)
    done = await asyncio.to_thread(cli, state, "continue", run_id, "--store", store)
    assert done.returncode == 0, done.stderr
    assert ran(state) == ["first", "later"]
    result = await evr.run_result(store, run_id)
    assert result.ok and result.recovery == 0
    ended = await asyncio.to_thread(cli, state, "continue", run_id, "--store", store)
    assert ended.returncode == 6 and "nothing to continue" in ended.stderr
