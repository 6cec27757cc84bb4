"""Run logs: the program log is written as the run goes; deterministic logs diff; the run's
log level reaches the steps' loggers (process and in-loop steps)."""

from __future__ import annotations

import asyncio
import difflib
import filecmp
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.backends.stores.base import Database

from . import stepfuncs
from .helpers import wait_until

MakeEventor = Callable[..., evr.Eventor]
S = evr.StepStatus

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}:\d{2}")
PID = re.compile(r"pid\W*\d+", re.IGNORECASE)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _files(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(run_dir.iterdir())}


async def files_of(result: evr.RunResult) -> dict[str, str]:
    assert result.log_dir is not None
    return await asyncio.to_thread(_files, result.log_dir)


def _compare(left: Path, right: Path) -> tuple[list[str], list[str], list[str]]:
    """Files in one directory only, files that differ, files alike (by content)."""
    compared = filecmp.dircmp(left, right)
    return (
        sorted(compared.left_only + compared.right_only),
        sorted(compared.diff_files),
        sorted(compared.same_files),
    )


def step_logger() -> logging.Logger:
    """The step logger of the in-loop step running in this task."""
    return logging.getLogger(evr.current_step().env["EVENTOR_LOGGER_NAME"])


# -- written as the run goes -----------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["plain", "deterministic"])
async def test_program_log_is_written_while_the_run_goes(
    make_eventor: MakeEventor, tmp_path: Path, deterministic: bool
) -> None:
    release = tmp_path / "release"
    ev = make_eventor(name="live", deterministic_logs=deterministic)
    start = ev.add_event("start")
    ev.add_step("quick", func=stepfuncs.add, args=(1, 2))
    ev.add_step("waiter", func=stepfuncs.wait_for, args=(str(release),))
    ev.add_assoc(start, "quick", "waiter")
    ev.trigger_event(start)

    handle = ev.start()
    try:
        program_log = ev.log_dir / "live" / handle.run_id / "program.log"

        async def shows(text: str) -> bool:
            return text in await asyncio.to_thread(_read, program_log)

        # The step that ended is in the file while the other still runs.
        await wait_until(lambda: shows("step quick[0] success"), what="quick's end in the log")
        await wait_until(lambda: shows("step waiter[0] started"), what="waiter's start")
        assert not handle.done()
        text = await asyncio.to_thread(_read, program_log)
        assert "waiter[0] success" not in text
        assert "ended" not in text
    finally:
        await asyncio.to_thread(release.touch)
    result = await handle.wait()
    assert result, result.reason
    text = await asyncio.to_thread(_read, program_log)
    assert "step waiter[0] success" in text
    assert text.rstrip().endswith("ended: success")


# -- deterministic logs ------------------------------------------------------------------


def _ordered_program(make_eventor: MakeEventor, store_db: Database, first: str) -> evr.Eventor:
    """Steps a and b run side by side for sequences 2 and 10; ``first`` of them ends first
    (the other waits until the store recorded its end); c runs once both succeeded (a
    derived event)."""

    async def side(name: str) -> str:
        context = evr.current_step()
        step_logger().info("%s runs for %s", name, context.sequence)
        if name != first:
            ended = (f"{first}_ok", context.sequence)

            async def first_ended() -> bool:
                return ended in await store_db.fired_events(context.run_id)

            await wait_until(first_ended, what=f"{first}[{context.sequence}] to end")
        return name

    async def last() -> None:
        step_logger().info("both ended")

    ev = make_eventor(name="det", deterministic_logs=True)
    start, a_ok, b_ok = ev.add_event("start"), ev.add_event("a_ok"), ev.add_event("b_ok")
    both = ev.add_event("both", expr=(a_ok, b_ok))
    ev.add_step("a", func=side, args=("a",), triggers={S.success: a_ok})
    ev.add_step("b", func=side, args=("b",), triggers={S.success: b_ok})
    ev.add_step("c", func=last)
    ev.add_assoc(start, "a", "b")
    ev.add_assoc(both, "c")
    ev.trigger_event(start, 10)
    ev.trigger_event(start, 2)
    return ev


def _expected_program_log() -> str:
    lines = ["INFO run of program det started"]
    for seq in ("2", "10"):  # sequences by value
        lines += [f"INFO event {e}[{seq}] fired" for e in ("start", "a_ok", "b_ok", "both")]
        for step in ("a", "b", "c"):
            lines += [f"INFO step {step}[{seq}] started", f"INFO step {step}[{seq}] success"]
    lines.append("INFO run ended: success")
    return "\n".join(lines) + "\n"


async def test_deterministic_program_log_is_ordered_and_lists_every_event(
    make_eventor: MakeEventor, store_db: Database
) -> None:
    results = [await _ordered_program(make_eventor, store_db, first).run() for first in "ab"]
    assert all(results), [r.reason for r in results]
    # The steps ended in different orders: the store has their events in firing order.
    fired = [await store_db.fired_events(r.run_id) for r in results]
    for seq in ("2", "10"):
        assert fired[0].index(("a_ok", seq)) < fired[0].index(("b_ok", seq))
        assert fired[1].index(("b_ok", seq)) < fired[1].index(("a_ok", seq))
    assert ("both", "2") in fired[0]  # a derived event

    logs = [await files_of(result) for result in results]
    assert logs[0] == logs[1]
    assert logs[0]["program.log"] == _expected_program_log()
    assert set(logs[0]) == {"program.log", *(f"{s}.{q}.log" for s in "abc" for q in (2, 10))}
    assert logs[0]["a.2.log"] == "INFO det.step: a runs for 2\n"
    assert logs[0]["c.10.log"] == "INFO det.step: both ended\n"
    for result, files in zip(results, logs, strict=True):
        for name, text in files.items():
            assert result.run_id not in text, name
            assert not TIMESTAMP.search(text), f"{name}: {text}"
            assert not PID.search(text), f"{name}: {text}"


async def test_deterministic_program_log_is_ordered_when_cancelled(
    make_eventor: MakeEventor, tmp_path: Path
) -> None:
    ev = make_eventor(name="cancelled", deterministic_logs=True)
    start = ev.add_event("start")
    ev.add_step("quick", func=stepfuncs.add, args=(1, 2))
    ev.add_step("waiter", func=stepfuncs.wait_for, args=(str(tmp_path / "never"),))
    ev.add_assoc(start, "waiter", "quick")  # the log follows the steps' definition order
    ev.trigger_event(start)

    handle = ev.start()
    await wait_until(
        lambda: asyncio.to_thread(
            lambda: (
                "step quick[0] success"
                in _read(ev.log_dir / "cancelled" / handle.run_id / "program.log")
            )
        ),
        what="quick's end in the log",
    )
    handle.cancel()
    result = await handle.wait()
    assert result.status is evr.RunStatus.cancelled
    assert (await files_of(result))["program.log"] == (
        "INFO run of program cancelled started\n"
        "INFO event start[0] fired\n"
        "INFO step quick[0] started\n"
        "INFO step quick[0] success\n"
        "INFO step waiter[0] started\n"
        "INFO run ended: cancelled (cancelled)\n"
    )


async def test_diff_of_two_runs_shows_only_the_step_that_behaved_differently(
    make_eventor: MakeEventor, tmp_path: Path
) -> None:
    flags = {name: tmp_path / f"fail-{name}" for name in "ab"}

    async def inloop() -> None:
        step_logger().info("in the loop")

    def build() -> evr.Eventor:
        ev = make_eventor(name="nightly", deterministic_logs=True, stop_on_exception=False)
        start, a_ok, c_ok = ev.add_event("start"), ev.add_event("a_ok"), ev.add_event("c_ok")
        both = ev.add_event("both", expr=(a_ok, c_ok))
        ev.add_step(
            "a", func=stepfuncs.fail_if, args=("a", str(flags["a"])), triggers={S.success: a_ok}
        )
        # b fails in the second run only (its flag file exists then); it fires nothing.
        ev.add_step("b", func=stepfuncs.fail_if, args=("b", str(flags["b"])))
        ev.add_step("c", func=inloop, triggers={S.success: c_ok})
        ev.add_step("d", command=["sh", "-c", "echo from the shell"])
        ev.add_assoc(start, "a", "b", "c")
        ev.add_assoc(both, "d")
        ev.trigger_event(start, 1)
        return ev

    good = await build().run()
    assert good, good.reason
    await asyncio.to_thread(flags["b"].write_text, "fail")
    bad = await build().run()
    assert bad.status is good.status  # failures that stop nothing (stop_on_exception=False)

    assert good.log_dir is not None and bad.log_dir is not None
    only, differ, same = await asyncio.to_thread(_compare, good.log_dir, bad.log_dir)
    assert only == []
    assert differ == ["b.1.log", "program.log"]
    assert same == ["a.1.log", "c.1.log", "d.1.log"]

    good_files, bad_files = await files_of(good), await files_of(bad)
    changed = [
        line
        for line in difflib.unified_diff(
            good_files["program.log"].splitlines(), bad_files["program.log"].splitlines(), n=0
        )
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changed == ["-INFO step b[1] success", "+ERROR step b[1] failure: RuntimeError: b broke"]
    assert good_files["b.1.log"] == "INFO nightly.step: working on b\n"
    assert bad_files["b.1.log"].startswith("INFO nightly.step: working on b\nTraceback")
    assert bad_files["b.1.log"].rstrip().endswith("RuntimeError: b broke")

    # diff -r, as a user would run it: the same two files, nothing else.
    proc = await asyncio.create_subprocess_exec(
        "diff", "-r", str(good.log_dir), str(bad.log_dir), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    headers = [line for line in out.decode().splitlines() if line.startswith("diff ")]
    assert [h.rsplit("/", 1)[-1] for h in headers] == ["b.1.log", "program.log"]


# -- log level ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING])
async def test_log_level_reaches_step_logs(make_eventor: MakeEventor, level: int) -> None:
    async def inloop() -> None:
        logger = step_logger()
        logger.debug("debug from inloop")
        logger.info("info from inloop")
        logger.warning("warning from inloop")

    ev = make_eventor(name="levels", logging_level=level, deterministic_logs=True)
    start = ev.add_event("start")
    ev.add_step("proc", func=stepfuncs.log_at_levels, args=("proc",))
    ev.add_step("loop", func=inloop)
    ev.add_assoc(start, "proc", "loop")
    ev.trigger_event(start)

    result = await ev.run()

    assert result, result.reason
    files = await files_of(result)
    for step, name in (("proc", "proc"), ("loop", "inloop")):
        expected = [
            f"{logging.getLevelName(at)} levels.step: {logging.getLevelName(at).lower()} from {name}"
            for at in (logging.DEBUG, logging.INFO, logging.WARNING)
            if at >= level
        ]
        assert files[f"{step}.0.log"].splitlines() == expected, step
    # The step logger's level is the run's only while its in-loop steps run.
    assert logging.getLogger("levels.step").level == logging.NOTSET
    assert ("INFO step proc[0] success" in files["program.log"]) is (level <= logging.INFO)
