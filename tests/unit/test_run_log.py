"""The program log (:class:`RunLog`) and in-loop step logs (:func:`step_log_capture`)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aeventor as evr
from aeventor.dispatch.logs import STARTED, RunLog, step_log_capture
from aeventor.program.model import ProgramDef


def program() -> ProgramDef:
    ev = evr.Eventor(name="prog", store=":memory:", log_dir=Path("unused"))
    start, done = ev.add_event("start"), ev.add_event("done")
    ev.add_event("both", expr=(start, done))
    ev.add_step("first")
    ev.add_step("second")
    ev.add_assoc(start, "first", "second")
    return ev.program


#: Built outside the loop (building an Eventor looks at files the first time).
PROGRAM = program()


class Fired:
    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.events = events

    async def fired_events(self, run_id: str) -> list[tuple[str, str]]:
        return self.events


def run_log(tmp_path: Path, *, deterministic: bool, level: int = logging.INFO) -> RunLog:
    return RunLog(
        tmp_path / "prog" / "run-1" / "program.log",
        run_id="run-1",
        program=PROGRAM,
        level=level,
        deterministic=deterministic,
    )


async def read(path: Path) -> str:
    return await asyncio.to_thread(path.read_text)


async def test_deterministic_log_is_rewritten_in_a_fixed_order(tmp_path: Path) -> None:
    log = run_log(tmp_path, deterministic=True)
    log.run_started("prog")
    log.event("start", "10")
    log.event("start", "2")
    # Completion order, attempts and recoveries out of order; a message naming the run.
    log.step("second", "10", "started", phase=STARTED)
    log.step("second", "10", "success")
    log.step("first", "10", "started", attempt=2, phase=STARTED)
    log.step("first", "10", "failure: see run-1/first.10.2.log", attempt=2, level=logging.ERROR)
    log.step("first", "10", "started", phase=STARTED)
    log.step("first", "10", "failure: boom", level=logging.ERROR)
    log.step("first", "2", "started", recovery=1, phase=STARTED)
    log.step("first", "2", "success", recovery=1)
    log.step("first", "2", "started", phase=STARTED)
    log.step("first", "2", "success")
    log.debug("below the level: dropped")
    log.run_ended("success")
    await log.flush()
    # Appended as it went, in the order it happened.
    assert (await read(log.path)).splitlines()[4] == "INFO step second[10] success"

    # The store's events replace the triggered ones (each once, derived ones too).
    await log.end(
        Fired([("start", "10"), ("start", "2"), ("both", "2"), ("done", "2"), ("both", "2")])
    )

    assert await read(log.path) == (
        "INFO run of program prog started\n"
        "INFO event start[2] fired\n"
        "INFO event done[2] fired\n"
        "INFO event both[2] fired\n"
        "INFO step first[2] started\n"
        "INFO step first[2] success\n"
        "INFO step first[2] recovery 1 started\n"
        "INFO step first[2] recovery 1 success\n"
        "INFO event start[10] fired\n"
        "INFO step first[10] started\n"
        "ERROR step first[10] failure: boom\n"
        "INFO step first[10] attempt 2 started\n"
        "ERROR step first[10] attempt 2 failure: see <run>/first.10.2.log\n"
        "INFO step second[10] started\n"
        "INFO step second[10] success\n"
        "INFO run ended: success\n"
    )
    assert not await asyncio.to_thread(lambda: list(log.path.parent.glob(".*tmp")))


async def test_plain_log_is_stamped_and_keeps_its_order(tmp_path: Path) -> None:
    log = run_log(tmp_path, deterministic=False, level=logging.DEBUG)
    log.run_started("prog")
    log.step("second", "0", "started pid=42", phase=STARTED)
    log.debug("a detail")
    await log.flush()
    log.run_ended("success")
    await log.end(Fired([("start", "0")]))

    lines = (await read(log.path)).splitlines()
    stamp = r"\d{4}-\d{2}-\d{2}T[\d:.]+\+00:00 (INFO|DEBUG) \[pid=\d+\] "
    assert [re.sub(stamp, "", line) for line in lines] == [
        "run run-1 of program prog started",
        "step second[0] started pid=42",
        "a detail",
        "run run-1 ended: success",
    ]
    assert all(re.match(stamp, line) for line in lines)


async def test_flushes_in_a_row_write_each_line_once_in_order(tmp_path: Path) -> None:
    woken = []
    log = RunLog(
        tmp_path / "program.log",
        run_id="r",
        program=PROGRAM,
        level=logging.INFO,
        deterministic=False,
        on_line=lambda: woken.append(1),
    )
    for i in range(200):
        log.info(f"line {i}")
        if i % 7 == 0:
            await asyncio.gather(log.flush(), log.flush())
    await asyncio.gather(log.flush(), log.flush(), log.flush())
    text = await read(log.path)
    assert [line.rsplit(" ", 1)[-1] for line in text.splitlines()] == [str(i) for i in range(200)]
    assert len(woken) == 200


async def test_in_loop_step_logs_are_kept_apart_at_their_own_levels() -> None:
    logger = logging.getLogger("prog.step")
    assert logger.level == logging.NOTSET
    both_running = asyncio.Barrier(2)

    async def step(name: str, level: int) -> list[str]:
        with step_log_capture("prog.step", level=level, deterministic=True) as lines:
            await both_running.wait()
            logger.debug("debug from %s", name)
            logging.getLogger("prog.step.child").info("info from %s", name)
            await asyncio.to_thread(logger.warning, "warning from %s (a thread)", name)
            await both_running.wait()
        return lines

    verbose, quiet = await asyncio.gather(step("v", logging.DEBUG), step("q", logging.WARNING))
    logger.warning("outside any step: nobody's")

    assert verbose == [
        "DEBUG prog.step: debug from v\n",
        "INFO prog.step.child: info from v\n",
        "WARNING prog.step: warning from v (a thread)\n",
    ]
    assert quiet == ["WARNING prog.step: warning from q (a thread)\n"]
    assert logger.level == logging.NOTSET
    assert logger.handlers == []
