"""The three kinds of step (subprocess function, command, in-loop) and what they leave behind.

Subprocess steps import their function by path: from :mod:`.stepfuncs`, or from a user's
``__main__`` script, which these tests write to a temporary directory and run as a real
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aeventor as evr
from aeventor.backends.stores.base import Database

from . import stepfuncs
from .helpers import DEADLINE, count_runs, steps_of

MakeEventor = Callable[..., evr.Eventor]
S = evr.StepStatus


def one_shot(ev: evr.Eventor, *steps: str) -> None:
    """Associate ``steps`` with a ``start`` event fired for sequence 0."""
    start = ev.add_event("start")
    ev.add_assoc(start, *steps)
    ev.trigger_event(start)


# -- return values, errors, timestamps -------------------------------------------------


async def test_subprocess_function_steps_return_values(make_eventor: MakeEventor) -> None:
    ev = make_eventor()
    ev.add_step("add", func=stepfuncs.add, args=(2, 3))
    ev.add_step("greet", func=stepfuncs.greet, args=("world",), kwargs={"punctuation": "!"})
    ev.add_step("seq", func=stepfuncs.echo_sequence, sequence_arg_name="seq")
    ev.add_step("async_in_process", func=stepfuncs.async_double, args=(21,), executor="process")
    ev.add_step("noop")
    one_shot(ev, "add", "greet", "seq", "async_in_process", "noop")

    result = await ev.run()

    assert result, result.reason
    assert {s.step: s.result for s in result.steps} == {
        "add": 5,
        "greet": "hello world!",
        "seq": "sequence 0",
        "async_in_process": 42,
        "noop": None,
    }
    for step_run in result.steps:
        assert step_run.status is S.success
        assert step_run.error is None
        assert step_run.started is not None and step_run.ended is not None
        assert step_run.created <= step_run.started <= step_run.ended
        if step_run.step != "noop":
            # Ran in a process of its own, whose pid the store recorded.
            assert step_run.pid is not None and step_run.pid != os.getpid()


async def test_inloop_step_returns_value_in_this_process(make_eventor: MakeEventor) -> None:
    async def where(x: int, *, y: int) -> dict[str, int]:
        return {"pid": os.getpid(), "sum": x + y}

    ev = make_eventor()
    ev.add_step("where", func=where, args=(1,), kwargs={"y": 2})
    one_shot(ev, "where")

    result = await ev.run()

    assert result, result.reason
    step_run = result.step("where")
    assert step_run.result == {"pid": os.getpid(), "sum": 3}
    assert step_run.started is not None and step_run.ended is not None
    assert step_run.started <= step_run.ended


async def _raise_in_loop(message: str) -> None:
    raise ValueError(message)


async def _return_set_in_loop() -> set[int]:
    return {1, 2}


@pytest.mark.parametrize(
    ("fail", "bad_value"),
    [
        pytest.param(stepfuncs.fail, stepfuncs.return_set, id="subprocess"),
        pytest.param(_raise_in_loop, _return_set_in_loop, id="inloop"),
    ],
)
async def test_errors_and_non_json_results_are_readable(
    make_eventor: MakeEventor, fail: Any, bad_value: Any
) -> None:
    ev = make_eventor()
    handled = ev.add_event("handled")
    ev.add_step("raises", func=fail, args=("it broke",), triggers={S.failure: handled})
    ev.add_step("bad_value", func=bad_value, triggers={S.failure: handled})
    one_shot(ev, "raises", "bad_value")

    result = await ev.run()

    assert result, result.reason  # both failures fired a failure trigger
    raises = result.step("raises")
    assert raises.status is S.failure
    assert raises.result is None
    assert raises.error is not None
    assert "Traceback" in raises.error
    assert raises.error.rstrip().endswith("ValueError: it broke")
    assert raises.ended is not None
    bad = result.step("bad_value")
    assert bad.status is S.failure
    assert bad.result is None
    assert bad.error is not None
    assert "SerializationError" in bad.error
    assert "set" in bad.error and "JSON" in bad.error


async def test_unhandled_subprocess_failure_fails_the_run(make_eventor: MakeEventor) -> None:
    ev = make_eventor()
    ev.add_step("raises", func=stepfuncs.fail, args=("no handler",))
    one_shot(ev, "raises")

    result = await ev.run()

    assert not result
    assert result.status is evr.RunStatus.failure
    assert result.reason is not None and "raises" in result.reason
    assert "ValueError: no handler" in (result.step("raises").error or "")


# -- command steps ---------------------------------------------------------------------


async def test_command_steps_exit_codes_and_output(make_eventor: MakeEventor) -> None:
    ev = make_eventor()
    handled = ev.add_event("handled")
    ev.add_step(
        "ok",
        command=[
            "sh",
            "-c",
            'echo "out $EVENTOR_STEP_NAME"; echo "err $EVENTOR_STEP_SEQUENCE" >&2',
        ],
    )
    ev.add_step("exits_3", command=["sh", "-c", "exit 3"], triggers={S.failure: handled})
    ev.add_step(
        "missing",
        command=["/nonexistent/aeventor-test-binary"],
        triggers={S.failure: handled},
    )
    one_shot(ev, "ok", "exits_3", "missing")

    result = await ev.run()

    assert result, result.reason
    assert steps_of(result) == [
        ("exits_3", "0", "failure"),
        ("missing", "0", "failure"),
        ("ok", "0", "success"),
    ]
    ok = result.step("ok")
    assert ok.result == 0
    log_path = result.log_path(ok)
    assert log_path is not None
    assert (await asyncio.to_thread(log_path.read_text)).splitlines() == ["out ok", "err 0"]
    exits = result.step("exits_3")
    assert exits.result == 3
    assert exits.error is not None and "exited with 3" in exits.error
    missing = result.step("missing")
    assert missing.error is not None and "cannot start" in missing.error


async def test_subprocess_output_and_logging_go_to_the_step_log(
    make_eventor: MakeEventor,
) -> None:
    ev = make_eventor(name="logprog")
    ev.add_step("talk", func=stepfuncs.log_and_print)
    one_shot(ev, "talk")

    result = await ev.run()

    assert result, result.reason
    log_path = result.log_path(result.step("talk"))
    assert log_path is not None
    text = await asyncio.to_thread(log_path.read_text)
    assert "printed by the step" in text
    assert re.search(r"INFO logprog\.step.*: logged by the step", text), text


# -- deterministic logs ----------------------------------------------------------------

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}:\d{2}")
PID = re.compile(r"pid\W*\d+", re.IGNORECASE)


def _log_files(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(run_dir.iterdir())}


async def test_deterministic_logs_diff_equal(make_eventor: MakeEventor, tmp_path: Path) -> None:
    async def last() -> str:
        return "in loop"

    def build(*, deterministic: bool) -> evr.Eventor:
        ev = make_eventor(name="det", deterministic_logs=deterministic, log_dir=tmp_path / "logs")
        to_b, to_c = ev.add_event("to_b"), ev.add_event("to_c")
        ev.add_step("a", func=stepfuncs.log_and_print, triggers={S.success: to_b})
        ev.add_step("b", command=["sh", "-c", "echo from the shell"], triggers={S.success: to_c})
        ev.add_step("c", func=last)
        ev.add_assoc(to_b, "b")
        ev.add_assoc(to_c, "c")
        one_shot(ev, "a")
        return ev

    results = [await build(deterministic=True).run() for _ in range(2)]
    plain = await build(deterministic=False).run()

    assert all(results) and plain
    pids = {str(s.pid) for r in [*results, plain] for s in r.steps if s.pid} | {str(os.getpid())}
    logs = []
    for result in results:
        assert result.log_dir is not None
        files = await asyncio.to_thread(_log_files, result.log_dir)
        assert set(files) == {"program.log", "a.0.log", "b.0.log"}
        for name, text in files.items():
            assert not TIMESTAMP.search(text), f"{name}: {text}"
            assert not PID.search(text), f"{name}: {text}"
            for pid in pids:
                assert not re.search(rf"\b{pid}\b", text), f"{name} shows pid {pid}: {text}"
            assert result.run_id not in text, f"{name} shows the run id: {text}"
        logs.append(files)
    assert logs[0] == logs[1]
    assert "logged by the step" in logs[0]["a.0.log"]
    assert "step c[0] success" in logs[0]["program.log"]

    # The same program without deterministic_logs does stamp its lines: the checks above bite.
    assert plain.log_dir is not None
    plain_files = await asyncio.to_thread(_log_files, plain.log_dir)
    assert TIMESTAMP.search(plain_files["program.log"])
    assert PID.search(plain_files["program.log"])
    assert TIMESTAMP.search(plain_files["a.0.log"])


# -- functions of a user's __main__ script ---------------------------------------------

SCRIPT_HEAD = """\
import asyncio
import json
import os
import sys

import aeventor as evr

STORE, LOG_DIR = sys.argv[1], sys.argv[2]

# A safety net of the test, not of the engine: should a step's process fail to stop at the
# run call, it would start the program again, and its step would, without end.
DEPTH = int(os.environ.get("AEVENTOR_TEST_SCRIPT_DEPTH", "0")) + 1
os.environ["AEVENTOR_TEST_SCRIPT_DEPTH"] = str(DEPTH)
if DEPTH > 2:
    sys.exit("a step's process ran this script's run call")


def summary(result):
    return json.dumps({
        "run_id": result.run_id,
        "status": result.status.value,
        "steps": {s.step: [s.status.value, s.result, s.error] for s in result.steps},
    })

"""

GUARDED = (
    SCRIPT_HEAD
    + """
def work(x):
    # Module-level code of this script ran in the step's process, under another name.
    return {"doubled": 2 * x, "module": __name__, "pid": os.getpid()}


if __name__ == "__main__":
    ev = evr.Eventor(name="guarded", store=STORE, log_dir=LOG_DIR)
    start = ev.add_event("start")
    ev.add_step("work", func=work, args=(21,))
    ev.add_assoc(start, "work")
    ev.trigger_event(start, 1)
    result = ev.run_sync()
    print(summary(result))
    print("pid", os.getpid())
    sys.exit(0 if result else 1)
"""
)

UNGUARDED_ABOVE = (
    SCRIPT_HEAD
    + """
def work(x):
    return {"doubled": 2 * x, "module": __name__}


async def main():
    ev = evr.Eventor(name="unguarded", store=STORE, log_dir=LOG_DIR)
    start = ev.add_event("start")
    ev.add_step("work", func=work, args=(21,))
    ev.add_assoc(start, "work")
    ev.trigger_event(start)
    print(summary(await ev.run()))


asyncio.run(main())
"""
)

# Python runs a script top-down, so the program can only use a function defined below an
# unguarded run call in a later run call. The step's process stops at the first one.
UNGUARDED_BELOW = (
    SCRIPT_HEAD
    + """
async def main(step_func):
    ev = evr.Eventor(name="unguarded", store=STORE, log_dir=LOG_DIR)
    start = ev.add_event("start")
    if step_func is not None:
        ev.add_step("work", func=step_func, args=(21,))
        ev.add_assoc(start, "work")
    ev.trigger_event(start)
    print(summary(await ev.run()))


asyncio.run(main(None))


def work(x):
    return 2 * x


asyncio.run(main(work))
"""
)


# Resolved at import, not in the event loop.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def with_project_on_path() -> dict[str, str]:
    """This process's environment, importing aeventor from this checkout (not site-packages)."""
    root = str(PROJECT_ROOT)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join((root, path))}


async def run_script(tmp_path: Path, text: str, store_url: str) -> tuple[int, list[str], str]:
    """Run ``text`` as a script in ``tmp_path``; return its exit code, stdout lines, stderr."""
    script = tmp_path / "user_script.py"
    await asyncio.to_thread(script.write_text, text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        store_url,
        str(tmp_path / "logs"),
        cwd=tmp_path,
        env=with_project_on_path(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


async def test_guarded_main_script_function_step_and_run_sync(
    tmp_path: Path, store_url: str, store_db: Database
) -> None:
    code, out, err = await run_script(tmp_path, GUARDED, store_url)

    assert code == 0, err
    summary = json.loads(out[0])
    assert summary["status"] == "success"
    status, value, error = summary["steps"]["work"]
    assert (status, error) == ("success", None)
    assert value["doubled"] == 42
    assert value["module"] != "__main__"  # loaded by path under another name
    assert value["pid"] != int(out[1].split()[1])  # in the step's own process
    assert await count_runs(store_db) == 1  # the guarded block did not run again


async def test_unguarded_script_with_function_above_the_run_call_works(
    tmp_path: Path, store_url: str, store_db: Database
) -> None:
    code, out, err = await run_script(tmp_path, UNGUARDED_ABOVE, store_url)

    assert code == 0, err
    summary = json.loads(out[-1])
    assert summary["status"] == "success", summary
    assert summary["steps"]["work"][:2] == [
        "success",
        {"doubled": 42, "module": "__aeventor_main__"},
    ]
    # The step's process stopped the script at its run call: no second, nested run.
    assert await count_runs(store_db) == 1
    log = tmp_path / "logs" / "unguarded" / summary["run_id"] / "work.0.log"
    assert 'if __name__ == "__main__":' in await asyncio.to_thread(log.read_text)


async def test_unguarded_script_with_function_below_the_run_call_fails_the_step(
    tmp_path: Path, store_url: str, store_db: Database
) -> None:
    code, out, err = await run_script(tmp_path, UNGUARDED_BELOW, store_url)

    assert code == 0, err
    first, second = (json.loads(line) for line in out[-2:])
    assert first["status"] == "success" and first["steps"] == {}
    assert second["status"] == "failure"
    status, value, error = second["steps"]["work"]
    assert (status, value) == ("failure", None)
    assert "UnguardedMainError" in error
    assert 'if __name__ == "__main__":' in error
    assert "'work'" in error
    assert await count_runs(store_db) == 2
