"""Log files of a run: one program log per run, one log per step run.

Layout: ``<log_dir>/<program>/<run_id>/program.log`` and ``<step>.<sequence>.log`` beside it
(``.r<recovery>`` for a recovered generation, ``.<attempt>`` after the first attempt; see
:func:`step_log_path`). Step log names carry no run id.

The program log is the run's story: the run's start, the events triggered, each step run
started and ended, the run's end. It is written as the run goes: :class:`RunLog` buffers
lines and :meth:`RunLog.flush` appends everything buffered in one write, in a thread (the
worker's log writer flushes within :data:`~aeventor.dispatch.worker.LOG_BATCH` seconds of a
line, together with every line logged meanwhile).

With ``deterministic_logs`` the program log carries no timestamp, pid or run id, and when
the run ends (success, failure or cancel) it is rewritten atomically in a fixed order:
the run's start; then by sequence (numbers by value, before other names), each sequence's
fired events (every event the store recorded as fired, derived ones included) in the
program's definition order, then its step runs in the definition order of the steps, by
recovery and attempt, each started before it ended; other lines; the run's end. Two runs of
one program then give the same file unless their steps behaved differently, and ``diff -r``
of their directories shows just those steps (their step logs and their lines). Step logs
then carry no timestamps or pids either (what a step prints is its own). The rewrite is the
run's own process's, at the end of a standalone run (:meth:`RunLog.end`); an agent's program
logs (the lines of the step runs it served) are only appended.

A process step's log is its stdout and stderr, with its log records (the root logger and the
step logger, ``EVENTOR_LOGGER_NAME``, at the run's ``log_level``). An in-loop step's log
holds the records of its step logger (and of that logger's children) emitted in the step's
task, at the run's ``log_level``, and its error if it failed; it is written when the step
ends, if there is anything to write (:func:`step_log_capture`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from ..program.model import ProgramDef
from ..records import run_log_dir, step_log_path

__all__ = (
    "RunLog",
    "run_log_dir",
    "step_format",
    "step_log_capture",
    "step_log_path",
    "write_step_log",
)

#: Where a line goes when the deterministic program log is rewritten.
_HEAD, _BODY, _OTHER, _TAIL = 0, 1, 2, 3
#: Within a sequence: fired events before step runs.
_EVENT, _STEP = 0, 1
#: A step run's lines: started before ended.
STARTED, ENDED = 0, 1

_Key = tuple[object, ...]


def _sequence_key(sequence: str) -> tuple[int, int, str]:
    """Sequences in a stable order: numbers by value, then other names."""
    try:
        return (0, int(sequence), sequence)
    except ValueError:
        return (1, 0, sequence)


class FiredEvents(Protocol):
    """Where the events fired in a run are recorded (a store)."""

    async def fired_events(self, run_id: str) -> list[tuple[str, str]]: ...


class RunLog:
    """The program log of one run.

    Args:
        path: the file (``<run dir>/program.log``).
        run_id: the run (never written in deterministic mode).
        program: the run's program; its definition order sorts the deterministic log.
        level: lines below it are dropped.
        deterministic: no timestamps, pids or run ids; sorted when the run ends (:meth:`end`).
        on_line: called after each buffered line (the worker wakes its log writer).

    Lines are buffered; :meth:`flush` appends what is buffered, in one write, off the loop.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        path: Path,
        *,
        run_id: str,
        program: ProgramDef,
        level: int,
        deterministic: bool,
        on_line: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.run_id = run_id
        self.level = level
        self.deterministic = deterministic
        self._on_line = on_line
        self._events = {name: i for i, name in enumerate(program.events)}
        self._steps = {name: i for i, name in enumerate(program.steps)}
        # Appended in the loop's thread, taken in the writer's: a deque is safe for that,
        # and the lock keeps concurrent writes in order (whoever takes lines writes them
        # before anyone takes the next ones).
        self._pending: collections.deque[str] = collections.deque()
        self._write_lock = threading.Lock()
        #: Deterministic mode: every line with its place, for the final rewrite.
        self._lines: list[tuple[_Key, str]] = []
        #: Where this process's lines start in the file: before them, an earlier
        #: controller's (a recovered run), which the rewrite keeps as they are.
        self._base: int | None = None

    def __repr__(self) -> str:
        return f"<RunLog {self.path}>"

    # -- lines --------------------------------------------------------------------------

    def log(self, level: int, message: str, *, key: _Key = (_OTHER,)) -> None:
        if level < self.level:
            return
        name = logging.getLevelName(level)
        if self.deterministic:
            line = f"{name} {message.replace(self.run_id, '<run>')}\n"
            self._lines.append((key, line))
        else:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            line = f"{stamp} {name} [pid={os.getpid()}] {message}\n"
        self._pending.append(line)
        if self._on_line is not None:
            self._on_line()

    def info(self, message: str) -> None:
        self.log(logging.INFO, message)

    def debug(self, message: str) -> None:
        self.log(logging.DEBUG, message)

    def error(self, message: str) -> None:
        self.log(logging.ERROR, message)

    def run_started(self, program: str) -> None:
        """The run's first line."""
        if self.deterministic:
            self.log(logging.INFO, f"run of program {program} started", key=(_HEAD,))
        else:
            self.info(f"run {self.run_id} of program {program} started")

    def run_ended(self, outcome: str) -> None:
        """The run's last line: ``success``, ``failure`` or ``cancelled (reason)``."""
        prefix = "run" if self.deterministic else f"run {self.run_id}"
        self.log(logging.INFO, f"{prefix} ended: {outcome}", key=(_TAIL,))

    def event(self, event: str, sequence: str, what: str = "triggered") -> None:
        """``event X[seq] triggered`` (or ``fired``)."""
        self.log(
            logging.INFO,
            f"event {event}[{sequence}] {what}",
            key=self._event_key(event, sequence),
        )

    def step(
        self,
        step: str,
        sequence: str,
        what: str,
        *,
        recovery: int = 0,
        attempt: int = 1,
        phase: int = ENDED,
        level: int = logging.INFO,
    ) -> None:
        """A line of one step run: ``step s[seq] started``, ``step s[seq] success``, ..."""
        label = f"{step}[{sequence}]"
        if recovery:
            label += f" recovery {recovery}"
        if attempt > 1:
            label += f" attempt {attempt}"
        key = (
            _BODY,
            _sequence_key(sequence),
            _STEP,
            self._steps.get(step, len(self._steps)),
            step,
            recovery,
            attempt,
            phase,
        )
        self.log(level, f"step {label} {what}", key=key)

    def _event_key(self, event: str, sequence: str) -> _Key:
        return (
            _BODY,
            _sequence_key(sequence),
            _EVENT,
            self._events.get(event, len(self._events)),
            event,
        )

    # -- files --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Append what is buffered, in one write, in a thread."""
        if self._pending:
            await asyncio.to_thread(self._write_pending)

    def _write_pending(self) -> None:
        with self._write_lock:
            if not self._pending:
                return
            # Opened first: lines stay pending if the file cannot be opened.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                if self._base is None:
                    self._base = fh.tell()
                lines = []
                pending = self._pending
                while pending:
                    lines.append(pending.popleft())
                fh.write("".join(lines))

    async def end(self, store: FiredEvents) -> None:
        """The run ended: write what is buffered; in deterministic mode, rewrite the whole
        file in its fixed order (see the module's docstring), with every event the store
        recorded as fired in place of the events logged as they were triggered."""
        if not self.deterministic:
            await self.flush()
            return
        fired = dict.fromkeys(await store.fired_events(self.run_id))
        lines = [(key, line) for key, line in self._lines if key[0] != _BODY or key[2] != _EVENT]
        if logging.INFO >= self.level:
            lines.extend(
                (self._event_key(event, sequence), f"INFO event {event}[{sequence}] fired\n")
                for event, sequence in fired
            )
        # A stable sort: lines of one place keep the order they were written in.
        lines.sort(key=lambda item: item[0])
        await asyncio.to_thread(self._replace, "".join(line for _, line in lines))

    def _replace(self, text: str) -> None:
        with self._write_lock:
            self._pending.clear()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A recovered run: what earlier controllers wrote stays first, as it was (it is
            # in its own fixed order); lines it already has (events fired before) are not
            # repeated.
            earlier = ""
            try:
                with open(self.path, "rb") as fh:
                    data = fh.read() if self._base is None else fh.read(self._base)
                earlier = data.decode("utf-8", errors="replace")
            except FileNotFoundError:
                pass
            if earlier:
                known = set(earlier.splitlines(keepends=True))
                text = earlier + "".join(
                    line for line in text.splitlines(keepends=True) if line not in known
                )
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self.path)


# -- step logs ----------------------------------------------------------------------------


def step_format(*, deterministic: bool) -> str:
    """The :mod:`logging` format of step log records (process and in-loop steps)."""
    return (
        "%(levelname)s %(name)s: %(message)s"
        if deterministic
        else "%(asctime)s %(levelname)s %(name)s [pid=%(process)d]: %(message)s"
    )


class _Sink:
    """Where the records of one in-loop step run go."""

    __slots__ = ("formatter", "handler", "level", "lines")

    def __init__(self, handler: _StepLogHandler, level: int, formatter: logging.Formatter):
        self.handler = handler
        self.level = level
        self.formatter = formatter
        self.lines: list[str] = []


_sink: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar(
    "aeventor_step_log", default=None
)


class _StepLogHandler(logging.Handler):
    """On a program's step logger, while in-loop steps of it run: hands each record to the
    step run whose task emitted it. The logger's level is the lowest its running steps ask
    for; each step keeps only the records at its own level."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.saved_level = logger.level
        self.levels: collections.Counter[int] = collections.Counter()
        #: Its retirement, due at the loop's next turn (see :meth:`leave`).
        self._retiring: asyncio.Handle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sink.get()
        if sink is None or sink.handler is not self or record.levelno < sink.level:
            return
        try:
            sink.lines.append(sink.formatter.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)

    def enter(self, level: int) -> None:
        if self._retiring is not None:
            self._retiring.cancel()
            self._retiring = None
        self.levels[level] += 1
        self._level(min(self.levels))

    def leave(self, level: int) -> None:
        self.levels[level] -= 1
        if not self.levels[level]:
            del self.levels[level]
        if self.levels:
            self._level(min(self.levels))
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._retire()
            return
        # At the loop's next turn, unless another step enters first: in-loop steps that
        # run one after another do not set the logger's level (which clears the cache of
        # every logger) and its handler twice each.
        self._retiring = loop.call_soon(self._retire)

    def _level(self, level: int) -> None:
        if self.logger.level != level:
            self.logger.setLevel(level)

    def _retire(self) -> None:
        self._retiring = None
        if not self.levels:
            self._level(self.saved_level)
            self.logger.removeHandler(self)


#: The formatters of step records, deterministic or not (one each: they keep no state).
_FORMATTERS = {
    deterministic: logging.Formatter(step_format(deterministic=deterministic))
    for deterministic in (False, True)
}


@contextlib.contextmanager
def step_log_capture(logger_name: str, *, level: int, deterministic: bool) -> Iterator[list[str]]:
    """Collect the records the step logger ``logger_name`` gets from this task (an in-loop
    step run) at ``level`` or above, formatted as a process step's; yields the lines.

    While any in-loop step of the program runs, the logger's level is the lowest level its
    steps ask for (so their records are made), and restored after.
    """
    logger = logging.getLogger(logger_name)
    handler = next((h for h in logger.handlers if isinstance(h, _StepLogHandler)), None)
    if handler is None:
        handler = _StepLogHandler(logger)
        logger.addHandler(handler)
    sink = _Sink(handler, level, _FORMATTERS[deterministic])
    handler.enter(level)
    token = _sink.set(sink)
    try:
        yield sink.lines
    finally:
        _sink.reset(token)
        handler.leave(level)


def write_step_log(path: Path, text: str) -> None:
    """Append ``text`` to a step log (in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
