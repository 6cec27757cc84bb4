"""Module-level step functions: subprocess steps import them by path (``module:qualname``).

They run in a step subprocess, so they are plain blocking code; where they wait for a
condition, they poll it with a deadline.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

#: Seconds a step may wait for a condition before it fails.
DEADLINE = 30.0

EVENTOR_KEYS = (
    "EVENTOR_RUN_ID",
    "EVENTOR_PROGRAM",
    "EVENTOR_STEP_NAME",
    "EVENTOR_STEP_SEQUENCE",
    "EVENTOR_STEP_RECOVERY",
    "EVENTOR_LOGGER_NAME",
)


def add(a: int, b: int) -> int:
    return a + b


def greet(name: str, *, punctuation: str = ".") -> str:
    return f"hello {name}{punctuation}"


def echo_sequence(seq: str) -> str:
    return f"sequence {seq}"


async def async_double(x: int) -> int:
    return 2 * x


def fail(message: str) -> None:
    raise ValueError(message)


def return_set() -> set[int]:
    return {1, 2}


def log_and_print() -> str:
    """Write to the step's log through the engine's logger, stdout and stderr."""
    logging.getLogger(os.environ["EVENTOR_LOGGER_NAME"]).info("logged by the step")
    print("printed by the step", flush=True)  # noqa: T201 - stdout is the step's log
    return "logged"


def report_env(meeting_dir: str, parties: int) -> dict[str, object]:
    """Return this process's EVENTOR_* variables, once ``parties`` steps run at once.

    Each step leaves a file in ``meeting_dir`` and waits until ``parties`` files are there,
    so the variables are read while all the steps' processes are alive.
    """
    mine = {key: os.environ.get(key) for key in EVENTOR_KEYS}
    meeting = Path(meeting_dir)
    (meeting / str(os.getpid())).touch()
    deadline = time.monotonic() + DEADLINE
    while len(list(meeting.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(meeting.iterdir()))} of {parties} steps met")
        time.sleep(0.01)
    # Read again after the others started: nothing they did may have changed ours.
    again = {key: os.environ.get(key) for key in EVENTOR_KEYS}
    return {"env": mine, "again": again, "pid": os.getpid()}


def spawn_and_sleep(pid_file: str) -> None:
    """Start a grandchild, publish both pids, and sleep far longer than any test."""
    child = subprocess.Popen(["sleep", "300"])
    tmp = f"{pid_file}.tmp"
    Path(tmp).write_text(f"{os.getpid()} {child.pid}")
    os.replace(tmp, pid_file)
    time.sleep(300)


def hold(report: str, release: str) -> str:
    """Start a grandchild, publish both pids in ``report``, and return once ``release`` exists.

    Cancelled, the step must be terminated with its grandchild; released, it ends its
    grandchild itself.
    """
    child = subprocess.Popen(["sleep", "300"])
    tmp = f"{report}.tmp"
    Path(tmp).write_text(f"{os.getpid()} {child.pid}")
    os.replace(tmp, report)
    deadline = time.monotonic() + DEADLINE
    try:
        while not Path(release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} did not appear within {DEADLINE} s")
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    return "released"


def stubborn(report: str) -> None:
    """Ignore SIGTERM, start a child that ignores it too (an ignored signal stays ignored
    across exec), write both pids to ``report``, then sleep for ever."""
    import json
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    tmp = Path(report + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "child": child.pid}))
    tmp.rename(report)
    time.sleep(300)


def fail_until(counter: str, succeed_at: int) -> int:
    """Count this attempt in ``counter``; fail (ConnectionError) before attempt
    ``succeed_at``."""
    path = Path(counter)
    attempt = (int(path.read_text()) if path.exists() else 0) + 1
    path.write_text(str(attempt))
    logging.getLogger(__name__).warning("attempt %d", attempt)
    if attempt < succeed_at:
        raise ConnectionError(f"attempt {attempt} failed")
    return attempt


def wait_for(path: str) -> str:
    """Return once ``path`` exists (the test creates it)."""
    deadline = time.monotonic() + DEADLINE
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {DEADLINE} s")
        time.sleep(0.01)
    return "released"


def log_at_levels(name: str) -> str:
    """Log one line at each level through the step's logger."""
    logger = logging.getLogger(os.environ["EVENTOR_LOGGER_NAME"])
    logger.debug("debug from %s", name)
    logger.info("info from %s", name)
    logger.warning("warning from %s", name)
    return name


def fail_if(name: str, flag: str) -> str:
    """Log a line; fail when the file ``flag`` exists (the same program, another outcome)."""
    logging.getLogger(os.environ["EVENTOR_LOGGER_NAME"]).info("working on %s", name)
    if Path(flag).exists():
        raise RuntimeError(f"{name} broke")
    return name


def log_through(name: str, *, logger: logging.Logger) -> str:
    """The original's pass_logger_to_task: log through the ``logger`` it was given."""
    logger.warning("hello from %s through %s", name, logger.name)
    return logger.name


def fire_events(event: str, times: int) -> int:
    """A process step firing ``event`` for sequences 0..times-1 (a loop, as the original's
    runly040), then an undefined event, whose refusal it reports."""
    import aeventor as evr

    step = evr.current_step()
    for n in range(times):
        step.trigger(event, sequence=n)
    try:
        step.trigger("no_such_event")
    except evr.AeventorError as exc:
        return len(str(exc))
    return -1


async def fire_from_async(event: str) -> str:
    """An async function run as a process step (in the step runner) awaits its trigger."""
    import aeventor as evr

    await evr.current_step().trigger(event)
    return evr.current_step().step


def occupy(journal: str, seconds: float = 0.0, release: str | None = None) -> str:
    """Record this step run's start and end in ``journal`` (one appended line each, atomic
    with O_APPEND): ``start|end <step>.<sequence> <time>``; in between, sleep ``seconds``
    and, with ``release``, wait until that file exists."""
    label = f"{os.environ['EVENTOR_STEP_NAME']}.{os.environ['EVENTOR_STEP_SEQUENCE']}"

    def note(what: str) -> None:
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{what} {label} {time.time():.6f}\n".encode())
        finally:
            os.close(fd)

    note("start")
    time.sleep(seconds)
    if release is not None:
        deadline = time.monotonic() + DEADLINE
        while not Path(release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} did not appear within {DEADLINE} s")
            time.sleep(0.01)
    note("end")
    return label
