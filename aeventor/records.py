"""What a run leaves behind, as read back from the store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .program.model import RunStatus, StepStatus

__all__ = (
    "DelayedTarget",
    "ProgramSummary",
    "RunResult",
    "Slots",
    "StepRun",
    "run_log_dir",
    "step_log_path",
)


@dataclass(frozen=True, slots=True)
class StepRun:
    """One run of one step for one sequence.

    Attributes:
        result: the step's return value (decoded from JSON), None for no-ops and failures;
            a command step returns its exit code.
        error: for a failure, the exception type, message and traceback as text.

    .. versionadded:: 0.1
    """

    id: int
    run_id: str
    step: str
    sequence: str
    recovery: int
    attempt: int
    status: StepStatus
    host: str | None
    worker: str | None
    pid: int | None
    result: Any
    error: str | None
    created: datetime
    started: datetime | None
    ended: datetime | None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of a run: truthy on success.

    A run is falsy when a step failure that fired no failure trigger stopped it, or when it
    was cancelled.

    .. versionadded:: 0.1
    """

    run_id: str
    program: str
    status: RunStatus
    reason: str | None
    created: datetime
    ended: datetime | None
    steps: Sequence[StepRun]
    #: The run's log directory (program.log and one log per step run), where its
    #: controller wrote it (None for distributed runs: their logs are on the agents' hosts).
    log_dir: Path | None = None
    #: The run's recovery generation: 0, then one more at each recovery or rerun.
    recovery: int = 0

    def __bool__(self) -> bool:
        return self.status is RunStatus.success

    @property
    def ok(self) -> bool:
        return bool(self)

    def __iter__(self) -> Iterator[StepRun]:
        return iter(self.steps)

    def step(self, name: str, sequence: str | int = 0) -> StepRun:
        """The latest attempt of step ``name`` for ``sequence``.

        Raises:
            KeyError: no such step run; the message lists the step runs that exist.
        """
        wanted = str(sequence)
        found = [s for s in self.steps if s.step == name and s.sequence == wanted]
        if not found:
            have = ", ".join(sorted({f"{s.step}[{s.sequence}]" for s in self.steps}))
            raise KeyError(f"no step run {name}[{wanted}] in run {self.run_id}; have: {have}")
        return max(found, key=lambda s: (s.recovery, s.attempt))

    def log_path(self, step_run: StepRun) -> Path | None:
        """The log file of a step run (its stdout, stderr and log records)."""
        if self.log_dir is None:
            return None
        return step_log_path(
            self.log_dir, step_run.step, step_run.sequence, step_run.attempt, step_run.recovery
        )


@dataclass(frozen=True, slots=True)
class ProgramSummary:
    """A program registered in a store, and its runs, as ``aeventor programs`` lists it.

    Attributes:
        name: the program's name.
        versions: how many versions of it are registered.
        latest_version: the newest version's hash (:attr:`ProgramDef.version`).
        registered: when the newest version was registered.
        runs: how many runs of it the store holds (any version).
        last_run_id: the newest run's id; None without runs.
        last_status: the newest run's status.
        last_run: when the newest run was created.

    .. versionadded:: 0.1
    """

    name: str
    versions: int
    latest_version: str
    registered: datetime
    runs: int
    last_run_id: str | None
    last_status: RunStatus | None
    last_run: datetime | None


@dataclass(frozen=True, slots=True)
class Slots:
    """Slots of a pool a run's step run waits for or holds (``acquires``, ``max_concurrent``).

    Attributes:
        pool: the pool's key: ``cluster:<name>``, ``local:<host>:<name>``,
            ``program:<run>:<name>``, ``step:<run>:<step>``, ``group:<run>:<group>``,
            ``run:<run>`` or ``host:<host>``.
        step, sequence: the step run's (None: kept by the run after its step ended, for a
            later step's ``releases``).
        slots: how many; ``held`` True once taken, False while waiting.

    .. versionadded:: 0.1
    """

    pool: str
    step: str | None
    sequence: str | None
    slots: int
    held: bool


@dataclass(frozen=True, slots=True)
class DelayedTarget:
    """A delayed association of a run that fired (``add_assoc(..., delay=)``).

    Attributes:
        event: the event that fired; ``sequence`` and ``recovery`` its firing's.
        kind: ``step`` or ``event``; ``target`` its name.
        due: when the target is reached (the store server's clock).
        done: when it was reached; None while it is pending.

    .. versionadded:: 0.1
    """

    event: str
    sequence: str
    recovery: int
    kind: str
    target: str
    due: datetime
    done: datetime | None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_log_dir(log_dir: Path, program: str, run_id: str) -> Path:
    """Where a run's logs go: ``<log_dir>/<program>/<run_id>``."""
    return log_dir / _safe(program) / run_id


def step_log_path(run_dir: Path, step: str, sequence: str, attempt: int, recovery: int = 0) -> Path:
    """A step run's log file in its run's directory: ``<step>.<sequence>.log``, with
    ``.r<recovery>`` for a recovered generation and ``.<attempt>`` after the first attempt
    (``build.0.r1.2.log``), so no run of a step writes over another's log."""
    suffix = f".r{recovery}" if recovery > 0 else ""
    if attempt > 1:
        suffix += f".{attempt}"
    return run_dir / f"{_safe(step)}.{_safe(sequence)}{suffix}.log"
