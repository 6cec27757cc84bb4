"""Run queries: list a store's programs and runs and read one back, by its id or a unique
prefix of it, as a tree of the events it fired and the step runs they made ready; watch a
run, find and follow its logs, compare two runs; cancel a run; delete the runs that ended
long ago (:func:`cleanup`).

All but :func:`cancel` and :func:`cleanup` only read: given a URL, a path or a store name
they open the store without creating or migrating it (a missing sqlite file, or a schema
older than this aeventor, is an error that says what to do). The ``aeventor`` commands
``programs``, ``runs``, ``show``, ``watch``, ``logs`` and ``diff`` are thin over them.
"""

from __future__ import annotations

import asyncio
import codecs
import difflib
import re
import shutil
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from sqlalchemy.engine import URL

from .backends.stores import open_store
from .backends.stores.base import Database
from .dispatch import PENDING
from .dispatch.store import Notifier, RunOrigin
from .exceptions import AeventorError, ConfigurationError, NoResult
from .program.expr import names
from .program.model import ProgramDef, RunStatus, StepStatus
from .records import (
    DelayedTarget,
    ProgramSummary,
    RunResult,
    Slots,
    StepRun,
    run_log_dir,
    step_log_path,
)

__all__ = (
    "CLEANUP_BATCH",
    "AmbiguousRunId",
    "Cleanup",
    "EventNode",
    "LogFile",
    "ProgramSummary",
    "RunDetails",
    "RunDiff",
    "RunEnded",
    "RunReader",
    "SequenceTree",
    "StepDiff",
    "StepNode",
    "build_tree",
    "cancel",
    "cleanup",
    "diff_runs",
    "follow_log",
    "latest_step_runs",
    "log_file",
    "normalise_log",
    "programs",
    "run_details",
    "run_result",
    "runs",
    "watch",
)


class AmbiguousRunId(NoResult):
    """A run id prefix that more than one run's id starts with.

    .. versionadded:: 0.1
    """


class RunReader(Protocol):
    """What the queries need of an open store (the SQL stores and ``InMemoryStore``)."""

    async def list_runs(
        self,
        *,
        program: str | None = ...,
        limit: int = ...,
        status: RunStatus | None = ...,
        since: datetime | None = ...,
        id_prefix: str | None = ...,
    ) -> list[RunResult]: ...

    async def load_result(self, run_id: str) -> RunResult: ...

    async def list_programs(self) -> list[ProgramSummary]: ...

    async def fired_events(self, run_id: str) -> list[tuple[str, str]]: ...

    async def run_delays(self, run_id: str) -> list[DelayedTarget]: ...

    async def run_slots(self, run_id: str) -> list[Slots]: ...

    async def run_program(self, run_id: str) -> ProgramDef: ...

    async def run_origin(self, run_id: str) -> RunOrigin: ...

    async def run_status(self, run_id: str) -> RunStatus: ...

    @property
    def notifier(self) -> Notifier: ...

    @property
    def poll_interval(self) -> float | None: ...


@runtime_checkable
class _Listens(Protocol):
    """A store that hears other processes' changes only once asked (Postgres opened for
    reading: LISTEN takes a connection of its own)."""

    async def listen_for_changes(self) -> None: ...


#: A store as the queries take it: an open store, or what ``--store`` accepts.
StoreArg = RunReader | str | Path | URL


@asynccontextmanager
async def _reading(store: StoreArg) -> AsyncIterator[RunReader]:
    if not isinstance(store, str | Path | URL):
        yield store  # open, and owned by the caller
        return
    db = open_store(store, program="aeventor")
    await db.open_for_reading()
    try:
        yield db
    finally:
        await db.aclose()


def _status(status: RunStatus | str | None) -> RunStatus | None:
    if status is None or isinstance(status, RunStatus):
        return status
    try:
        return RunStatus(status)
    except ValueError:
        valid = ", ".join(s.value for s in RunStatus)
        raise ConfigurationError(f"status={status!r}: a run's status is one of {valid}") from None


def _since(since: datetime | timedelta | None) -> datetime | None:
    if since is None:
        return None
    if isinstance(since, timedelta):
        return datetime.now(UTC) - since
    # The store keeps UTC; a naive datetime is taken as UTC too (as `aeventor runs` shows it).
    return since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)


async def runs(
    store: StoreArg,
    *,
    program: str | None = None,
    status: RunStatus | str | None = None,
    since: datetime | timedelta | None = None,
    limit: int = 20,
) -> list[RunResult]:
    """A store's runs, newest first, without their step runs (each ``steps`` is empty).

    Args:
        store: an open store, or a URL, sqlite path or store name (opened read-only: it is
            never created nor migrated).
        program: only the runs of this program.
        status: only the runs in this status (a :class:`RunStatus` or its value).
        since: only the runs created at or after this instant (a naive datetime is UTC),
            or within this long before now.
        limit: at most this many runs.

    Raises:
        ConfigurationError: an unknown status, or (``StoreConfigError``) a store that
            cannot be opened, e.g. a sqlite file that does not exist.
        SchemaVersionError: the store's schema is not this aeventor's (older: run
            ``aeventor db upgrade``).

    .. versionadded:: 0.1
    """
    if limit < 1:
        raise ConfigurationError(f"limit={limit}: ask for at least one run")
    wanted = _status(status)
    after = _since(since)
    async with _reading(store) as db:
        return await db.list_runs(program=program, limit=limit, status=wanted, since=after)


async def run_result(store: StoreArg, run_id: str) -> RunResult:
    """A run and its step runs; ``run_id`` may be a unique prefix of the run's id.

    Args:
        store: as :func:`runs` takes it.
        run_id: the run's id, or the first characters of it (``aeventor runs`` shows 8).

    Raises:
        NoResult: no run's id is, or starts with, ``run_id``.
        AmbiguousRunId: several runs' ids start with ``run_id`` (a :class:`NoResult`).
        ConfigurationError: an empty ``run_id``, or a store that cannot be opened.

    .. versionadded:: 0.1
    """
    if not run_id:
        raise ConfigurationError("run id '': give a run id, or the first characters of one")
    async with _reading(store) as db:
        try:
            return await db.load_result(run_id)
        except NoResult:
            pass
        found = await db.list_runs(id_prefix=run_id, limit=4)
        if not found:
            raise NoResult(
                f"no run {run_id!r} (no run id starts with it); `aeventor runs` lists the runs"
            ) from None
        if len(found) > 1:
            some = ", ".join(r.run_id for r in found[:3])
            more = ", ..." if len(found) > 3 else ""
            raise AmbiguousRunId(
                f"run id prefix {run_id!r} matches several runs ({some}{more}); give more of the id"
            )
        return await db.load_result(found[0].run_id)


class RunEnded(AeventorError):
    """:func:`cancel` of a run that has already ended; ``result`` is how it ended.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


async def cancel(
    store: str | Path | URL,
    run_id: str,
    *,
    reason: str = "cancelled",
    step: str | None = None,
    sequence: str | int | None = None,
    cluster_key: bytes | str | None = None,
) -> RunResult:
    """Cancel a running run, as ``aeventor.attach(store, run_id).cancel()`` does; or, with
    ``step``, one step run of it, as ``handle.cancel_step(step, sequence)`` does.

    The run and its ready and active step runs are marked cancelled in one transaction;
    the workers running its steps (a standalone run's process, or the agents of a
    distributed run) terminate them at their next heartbeat. The store is not created nor
    migrated.

    A cancelled step run is terminated by its worker at its next heartbeat; its run reacts
    as to a failure of the step (its failure triggers fire; without one the run stops).

    Args:
        store: a URL, sqlite path or store name.
        run_id: the run's id, or a unique prefix of it.
        reason: recorded as the run's reason (or the step run's error).
        step: cancel only the ready or running step run of this step.
        sequence: the step's sequence; may be left out when one of its step runs is ready
            or running.
        cluster_key: signs what the step's failure triggers make ready in a distributed
            run (default: ``$AEVENTOR_CLUSTER_KEY`` or the key file).

    Returns:
        The run as cancelled (with ``step``: the run after the step's cancel).

    Raises:
        RunEnded: the run had already ended (its ``result`` says how).
        NoResult: no run has this id or prefix (:class:`AmbiguousRunId`: several do); no
            ready or running step run of ``step`` (for ``sequence``).

    .. versionchanged:: 0.1
        ``step`` and ``sequence``.
    """
    db = open_store(store, program="aeventor")
    await db.open_for_reading()
    try:
        found = await run_result(db, run_id)
        if step is not None and found.status is RunStatus.running:
            await _cancel_step(db, found, step, sequence, reason, cluster_key)
            return await db.load_result(found.run_id)
        if found.status is RunStatus.running:
            await db.cancel_run(found.run_id, reason=reason)
        result = await db.load_result(found.run_id)
    finally:
        await db.aclose()
    if found.status is not RunStatus.running or result.status is not RunStatus.cancelled:
        raise RunEnded(
            f"run {result.run_id} of {result.program} has already ended: {result.status.value}",
            result,
        )
    return result


async def _cancel_step(
    db: Database,
    found: RunResult,
    step: str,
    sequence: str | int | None,
    reason: str,
    cluster_key: bytes | str | None,
) -> None:
    from .dispatch import Graph
    from .signing import load_cluster_key, step_run_signer

    program = await db.run_program(found.run_id)
    if step not in program.steps:
        raise ConfigurationError(
            f"cancel: program {program.name!r} has no step {step!r}; its steps: "
            + ", ".join(sorted(program.steps))
        )
    pending = {s.sequence for s in found.steps if s.step == step and s.status in PENDING}
    if sequence is None:
        if len(pending) != 1:
            raise NoResult(
                f"cancel: step {step!r} of run {found.run_id} has "
                + (
                    f"step runs ready or running for several sequences ({', '.join(sorted(pending))}); "
                    "name one with --sequence"
                    if pending
                    else "no step run ready or running"
                )
            )
        sequence = pending.pop()
    signer = None
    if (await db.run_origin(found.run_id)).mode == "distributed":
        key = cluster_key.encode() if isinstance(cluster_key, str) else cluster_key
        if key is None:
            key = await asyncio.to_thread(load_cluster_key)
        signer = step_run_signer(key)
    advance = await db.cancel_step(
        Graph(program, signer=signer), found.run_id, step, str(sequence), reason=reason
    )
    if not advance.recorded:
        if advance.run_status is not RunStatus.running:
            raise RunEnded(
                f"run {found.run_id} of {found.program} has already ended: "
                f"{advance.run_status.value}",
                await db.load_result(found.run_id),
            )
        raise NoResult(
            f"cancel: step {step}[{sequence}] of run {found.run_id} is neither ready nor running"
        )


@dataclass(frozen=True, slots=True)
class Cleanup:
    """What :func:`cleanup` removed (or, with ``dry_run``, would remove).

    Attributes:
        runs: the runs, oldest end first (without their step runs).
        log_dirs: the runs' log directories that existed (and were deleted).
        dry_run: nothing was deleted.
        before: the cutoff: the runs ended before this instant (UTC).

    .. versionadded:: 0.1
    """

    runs: tuple[RunResult, ...]
    log_dirs: tuple[Path, ...]
    dry_run: bool
    before: datetime

    def per_program(self) -> dict[str, int]:
        """How many runs of each program, by program name."""
        return dict(sorted(Counter(run.program for run in self.runs).items()))


#: How many runs :func:`cleanup` deletes per transaction.
CLEANUP_BATCH = 500


async def cleanup(
    store: str | Path | URL,
    *,
    older_than: timedelta,
    program: str | None = None,
    dry_run: bool = False,
    log_dir: str | Path | None = None,
    batch: int = CLEANUP_BATCH,
) -> Cleanup:
    """Delete the runs that ended more than ``older_than`` ago, and their log directories.

    Only runs that ended (success, failure, cancelled) are deleted, with their step runs
    and triggers, ``batch`` runs per transaction; running runs are never touched. The
    store is not created nor migrated.

    Args:
        store: a URL, sqlite path or store name.
        older_than: how long ago a run must have ended.
        program: only the runs of this program.
        dry_run: only say what would be deleted.
        log_dir: for runs that did not record where their logs are (distributed runs,
            runs of older versions), the Eventors' log directory, whose
            ``<program>/<run_id>`` directories go with their runs. A run that recorded its
            log directory (:attr:`RunResult.log_dir`) has that one removed.
        batch: runs per transaction.

    .. versionadded:: 0.1
    """
    if older_than < timedelta(0):
        raise ConfigurationError(f"older_than={older_than}: give a duration of zero or more")
    if batch < 1:
        raise ConfigurationError(f"batch={batch}: give at least one run per transaction")
    before = datetime.now(UTC) - older_than
    logs = None if log_dir is None else Path(log_dir)
    removed: list[RunResult] = []
    dirs: list[Path] = []
    db = open_store(store, program="aeventor")
    await db.open_for_reading()
    try:
        offset = 0
        while True:
            found = await db.ended_runs(before=before, program=program, limit=batch, offset=offset)
            if dry_run:
                deleted = found
                offset += len(found)
            else:
                ids = set(await db.delete_runs([run.run_id for run in found]))
                deleted = [run for run in found if run.run_id in ids]
                offset += len(found) - len(deleted)  # those kept (resumed) stay in the list
            removed += deleted
            dirs += await asyncio.to_thread(_remove_logs, logs, deleted, dry_run)
            if len(found) < batch:
                break
    finally:
        await db.aclose()
    return Cleanup(runs=tuple(removed), log_dirs=tuple(dirs), dry_run=dry_run, before=before)


def _remove_logs(log_dir: Path | None, runs: list[RunResult], dry_run: bool) -> list[Path]:
    found = []
    for run in runs:
        if run.log_dir is not None:
            path = run.log_dir
        elif log_dir is not None:
            path = run_log_dir(log_dir, run.program, run.run_id)
        else:
            continue
        if path.is_dir():
            found.append(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    return found


# -- programs ---------------------------------------------------------------------------------


async def programs(store: StoreArg) -> list[ProgramSummary]:
    """The programs registered in a store, by name: versions, runs and the newest run.

    Args:
        store: as :func:`runs` takes it.

    .. versionadded:: 0.1
    """
    async with _reading(store) as db:
        return await db.list_programs()


# -- a run as a tree --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepNode:
    """A step run in :class:`RunDetails`' tree, and the events its outcome fired (its
    ``triggers``).

    .. versionadded:: 0.1
    """

    run: StepRun
    events: tuple[EventNode, ...] = ()


@dataclass(frozen=True, slots=True)
class EventNode:
    """A fired event: the step runs it made ready (its associations) and the events it
    fired in turn (associated events, and expressions it completed).

    .. versionadded:: 0.1
    """

    event: str
    sequence: str
    steps: tuple[StepNode, ...] = ()
    events: tuple[EventNode, ...] = ()
    #: Its delayed associations still pending (their step runs or events are to come).
    pending: tuple[DelayedTarget, ...] = ()


@dataclass(frozen=True, slots=True)
class SequenceTree:
    """One sequence of a run.

    Attributes:
        events: the events fired from outside the program's associations: initial
            triggers, and events a step fired from its code.
        unreached: step runs that no fired event made ready (nothing recorded is hidden).

    .. versionadded:: 0.1
    """

    sequence: str
    events: tuple[EventNode, ...]
    unreached: tuple[StepNode, ...] = ()


@dataclass(frozen=True, slots=True)
class RunDetails:
    """A run with its step runs, the events it fired and the tree they make.

    Attributes:
        events: each fired ``(event, sequence)`` once, in first-firing order (a recovered
            run fires its events again in each generation).
        sequences: the tree, per sequence in first-firing order.
        mode: ``standalone`` or ``distributed``.
        delays: its delayed associations that fired, pending or reached, by due time.
        slots: the slots of pools and limits its step runs wait for or hold.

    .. versionadded:: 0.1
    """

    result: RunResult
    program: ProgramDef
    events: tuple[tuple[str, str], ...]
    sequences: tuple[SequenceTree, ...]
    mode: str
    delays: tuple[DelayedTarget, ...] = ()
    slots: tuple[Slots, ...] = ()


async def run_details(store: StoreArg, run_id: str) -> RunDetails:
    """A run as ``aeventor show`` prints it; ``run_id`` may be a unique prefix.

    Raises:
        NoResult: as :func:`run_result`.

    .. versionadded:: 0.1
    """
    async with _reading(store) as db:
        result = await run_result(db, run_id)
        program = await db.run_program(result.run_id)
        fired = tuple(dict.fromkeys(await db.fired_events(result.run_id)))
        origin = await db.run_origin(result.run_id)
        delays = tuple(await db.run_delays(result.run_id))
        slots = tuple(await db.run_slots(result.run_id))
    return RunDetails(
        result=result,
        program=program,
        events=fired,
        sequences=build_tree(program, fired, result.steps, delays=delays),
        mode=origin.mode,
        delays=delays,
        slots=slots,
    )


def build_tree(
    program: ProgramDef,
    fired: Sequence[tuple[str, str]],
    steps: Sequence[StepRun],
    *,
    delays: Sequence[DelayedTarget] = (),
) -> tuple[SequenceTree, ...]:
    """Arrange a run's fired events and step runs as a tree, per sequence.

    The store records what fired and what ran, not why; the program says why. There are
    three ways an event fires: an association (delayed or not) from an event fired earlier,
    a step run's outcome (its ``triggers``), or an expression over events fired earlier. An
    event is put under the first of those that explains it (an expression: under the last
    of its events to fire), else at its sequence's top level (an initial trigger, or a
    step's own code). A step run goes under the first fired event associated with its step
    (at once or after a delay); every attempt and recovery of one step and sequence stays
    together.

    Args:
        fired: ``(event, sequence)`` pairs in firing order; repeats are ignored.
        steps: the run's step runs.
        delays: the run's delayed associations; those pending go under their event.

    .. versionadded:: 0.1
    """
    order = list(dict.fromkeys(fired))
    sequences = dict.fromkeys([seq for _, seq in order] + [s.sequence for s in steps])
    return tuple(
        _sequence_tree(
            program,
            seq,
            [event for event, at in order if at == seq],
            [s for s in steps if s.sequence == seq],
            [d for d in delays if d.sequence == seq and d.done is None],
        )
        for seq in sequences
    )


def _sequence_tree(
    program: ProgramDef,
    sequence: str,
    events: list[str],
    steps: list[StepRun],
    pending: list[DelayedTarget],
) -> SequenceTree:
    waiting: dict[str, list[StepRun]] = {}
    for run in sorted(steps, key=lambda s: (s.recovery, s.attempt, s.id)):
        waiting.setdefault(run.step, []).append(run)
    # Parents and children by key: an event by name, a step run by id.
    event_steps: dict[str, list[StepRun]] = {}
    event_events: dict[str, list[str]] = {}
    step_events: dict[int, list[str]] = {}
    top: list[str] = []
    placed: list[StepRun] = []
    for event in events:
        parent = _parent(program, event, list(event_steps), placed)
        if parent is None:
            top.append(event)
        elif isinstance(parent, str):
            event_events[parent].append(event)
        else:
            step_events[parent.id].append(event)
        event_steps[event], event_events[event] = [], []
        for kind, target in program.targets(event):  # delayed associations too
            if kind == "step" and target in waiting:
                made = waiting.pop(target)
                event_steps[event] += made
                placed += made
                for run in made:
                    step_events[run.id] = []

    def step_node(run: StepRun) -> StepNode:
        return StepNode(run, tuple(event_node(e) for e in step_events.get(run.id, ())))

    def event_node(event: str) -> EventNode:
        return EventNode(
            event,
            sequence,
            tuple(step_node(run) for run in event_steps[event]),
            tuple(event_node(e) for e in event_events[event]),
            tuple(d for d in pending if d.event == event),
        )

    unreached = sorted((run for runs in waiting.values() for run in runs), key=lambda s: s.id)
    return SequenceTree(
        sequence,
        tuple(event_node(e) for e in top),
        tuple(StepNode(run) for run in unreached),
    )


def _parent(
    program: ProgramDef, event: str, earlier: list[str], placed: list[StepRun]
) -> str | StepRun | None:
    for before in earlier:
        if ("event", event) in program.targets(before):
            return before
    for run in placed:
        step = program.steps.get(run.step)
        if step is None:
            continue
        statuses = {run.status, *([StepStatus.active] if run.started is not None else [])}
        if any(event in step.triggers.get(status, ()) for status in statuses):
            return run
    definition = program.events.get(event)
    if definition is not None and definition.expr is not None:
        used = set(names(definition.expr))
        for before in reversed(earlier):
            if before in used:
                return before
    return None


# -- watching a run ---------------------------------------------------------------------------

#: Seconds between two looks at a watched run (or a followed log) when no wake-up comes.
WATCH_POLL = 0.5


async def _changed_or_timeout(changed: asyncio.Event, poll: float) -> None:
    try:
        async with asyncio.timeout(poll):
            await changed.wait()
    except TimeoutError:
        pass


async def watch(
    store: StoreArg, run_id: str, *, poll: float = WATCH_POLL
) -> AsyncGenerator[RunResult, None]:
    """The run, each time it may have changed, until it ends (the last one yielded has).

    Woken by the store (NOTIFY on Postgres, which a store opened here listens for), and
    at least every ``poll`` seconds otherwise. Close the iterator when leaving it early
    (``contextlib.aclosing``): that closes the store it opened.

    Args:
        store: as :func:`runs` takes it.
        run_id: the run's id, or a unique prefix of it.

    .. versionadded:: 0.1
    """
    async with _reading(store) as db:
        if isinstance(db, _Listens):
            await db.listen_for_changes()
        found = await run_result(db, run_id)
        with db.notifier.subscribe(found.run_id) as changed:
            while True:
                changed.clear()
                result = await db.load_result(found.run_id)
                yield result
                if result.status is not RunStatus.running:
                    return
                await _changed_or_timeout(changed, poll)


# -- logs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogFile:
    """A run's log file: ``program.log``, or the log of ``step_run``.

    .. versionadded:: 0.1
    """

    result: RunResult
    path: Path
    step_run: StepRun | None = None


async def log_file(
    store: StoreArg,
    run_id: str,
    step: str | None = None,
    *,
    sequence: str | None = None,
    log_dir: str | Path | None = None,
) -> LogFile:
    """Where a run's program log, or one of its step runs' logs, is.

    The run's log directory is the one its controller recorded, or
    ``<log_dir>/<program>/<run_id>`` with ``log_dir`` (the Eventor's or agent's). A step's
    log is that of its latest recovery and attempt for ``sequence``.

    Args:
        store: as :func:`runs` takes it.
        run_id: the run's id, or a unique prefix of it.
        step: a step's name, or ``STEP.SEQUENCE``; None: the program log.
        sequence: the step's sequence; None: the only one it ran for.
        log_dir: overrides the recorded directory.

    Raises:
        ConfigurationError: no log directory is known (a distributed run's logs are on its
            agents' hosts: the message names them), no such step run, or several
            sequences to choose from (the message lists them).

    .. versionadded:: 0.1
    """
    async with _reading(store) as db:
        result = await run_result(db, run_id)
        origin = await db.run_origin(result.run_id)
    run_dir = _run_dir(result, origin.mode, log_dir)
    if step is None:
        return LogFile(result, run_dir / "program.log")
    chosen = _step_run(result, step, sequence)
    return LogFile(
        result,
        step_log_path(run_dir, chosen.step, chosen.sequence, chosen.attempt, chosen.recovery),
        chosen,
    )


def _run_dir(result: RunResult, mode: str, log_dir: str | Path | None) -> Path:
    if log_dir is not None:
        return run_log_dir(Path(log_dir), result.program, result.run_id)
    if result.log_dir is not None:
        return result.log_dir
    if mode == "distributed":
        hosts = sorted({s.host or s.worker or "?" for s in result.steps if s.host or s.worker})
        where = f" ({', '.join(hosts)})" if hosts else ""
        raise ConfigurationError(
            f"run {result.run_id} is distributed: its logs are on its agents' hosts{where}; "
            "read them there with --log-dir DIR, the agent's log directory"
        )
    raise ConfigurationError(
        f"run {result.run_id} recorded no log directory; pass --log-dir DIR, the log_dir "
        "its Eventor wrote to"
    )


def _step_run(result: RunResult, step: str, sequence: str | None) -> StepRun:
    known = {s.step for s in result.steps}
    if sequence is None and step not in known and "." in step:
        step, sequence = step.rsplit(".", 1)
    ran = [s for s in result.steps if s.step == step]
    if not ran:
        have = ", ".join(sorted(known)) or "none"
        raise ConfigurationError(
            f"run {result.run_id} has no step run of {step!r}; its steps: {have}"
        )
    sequences = list(dict.fromkeys(s.sequence for s in ran))
    if sequence is None:
        if len(sequences) > 1:
            raise ConfigurationError(
                f"step {step!r} ran for sequences {', '.join(sequences)} in run "
                f"{result.run_id}: name one as {step}.SEQ"
            )
        sequence = sequences[0]
    if sequence not in sequences:
        raise ConfigurationError(
            f"step {step!r} did not run for sequence {sequence!r} in run {result.run_id}; "
            f"it ran for {', '.join(sequences)}"
        )
    return result.step(step, sequence)


async def follow_log(
    store: StoreArg, log: LogFile, *, poll: float = WATCH_POLL
) -> AsyncGenerator[str, None]:
    """The log's text as it grows (like ``tail -f``), until its run ends.

    The file is read from its start, off the event loop; its run's status comes from the
    store. A step run's log moves on to the step's next attempt or recovery when there is
    one (a retry, a recovery of the run), after a line that names the new file. Once the
    run has ended, what was written meanwhile is yielded and the iterator ends.

    .. versionadded:: 0.1
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    path, current = log.path, log.step_run
    async with _reading(store) as db:
        if isinstance(db, _Listens):
            await db.listen_for_changes()
        with db.notifier.subscribe(log.result.run_id) as changed:
            ended = False
            while True:
                changed.clear()
                # The status before the read: a run that ended then has written its log
                # by the read (the controller flushes its last lines right after it ends
                # the run: one more read, a poll later, picks those up).
                was_ended = ended
                ended = await db.run_status(log.result.run_id) is not RunStatus.running
                if current is not None:
                    newer = (await db.load_result(log.result.run_id)).step(
                        current.step, current.sequence
                    )
                    if (newer.recovery, newer.attempt) != (current.recovery, current.attempt):
                        # Finish the file being followed, then follow the newer one.
                        data, offset = await asyncio.to_thread(_read_from, path, offset)
                        text = decoder.decode(data)
                        if text:
                            yield text
                        current, offset = newer, 0
                        path = step_log_path(
                            path.parent, newer.step, newer.sequence, newer.attempt, newer.recovery
                        )
                        yield f"--- {path.name}: attempt {newer.attempt}, recovery {newer.recovery}\n"
                data, offset = await asyncio.to_thread(_read_from, path, offset)
                text = decoder.decode(data)
                if text:
                    yield text
                if was_ended and not data:
                    break
                await _changed_or_timeout(changed, poll)
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


# -- comparing two runs -----------------------------------------------------------------------

_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
)
_PID = re.compile(r"\bpid([= ])\d+")
_RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
_ADDRESS = re.compile(r"\b0x[0-9a-f]{6,}\b")


def normalise_log(text: str) -> str:
    """A log's text without what differs between any two runs: timestamps, pids, run ids
    and object addresses become ``<time>``, ``pid=<pid>``, ``<run>``, ``0x<addr>``.

    .. versionadded:: 0.1
    """
    text = _TIMESTAMP.sub("<time>", text)
    text = _PID.sub(r"pid\1<pid>", text)
    text = _RUN_ID.sub("<run>", text)
    return _ADDRESS.sub("0x<addr>", text)


@dataclass(frozen=True, slots=True)
class StepDiff:
    """One step and sequence in two runs: the status of its latest attempt in each (None:
    it did not run there).

    .. versionadded:: 0.1
    """

    step: str
    sequence: str
    first: StepStatus | None
    second: StepStatus | None

    @property
    def differs(self) -> bool:
        return self.first is not self.second


@dataclass(frozen=True, slots=True)
class RunDiff:
    """Two runs compared by :func:`diff_runs`.

    Attributes:
        steps: every step and sequence of either run: sequence by sequence, each in the
            order its steps ran (in the first run, then the second).
        logs: per log file that differs once normalised (``program.log`` first), its
            unified diff lines (``a/NAME`` is the first run's, ``b/NAME`` the second's).
        logs_missing: why logs were not compared (None when they were).

    .. versionadded:: 0.1
    """

    first: RunResult
    second: RunResult
    steps: tuple[StepDiff, ...]
    logs: tuple[tuple[str, tuple[str, ...]], ...]
    logs_missing: str | None = None

    @property
    def differs(self) -> bool:
        return (
            self.first.status is not self.second.status
            or any(step.differs for step in self.steps)
            or bool(self.logs)
        )


async def diff_runs(
    store: StoreArg, first: str, second: str, *, log_dir: str | Path | None = None
) -> RunDiff:
    """Compare two runs: their step outcomes, and their logs once :func:`normalise_log`
    took out what always differs.

    ``program.log`` is compared subject by subject (each event's and step's lines in their
    order, then the next's), as concurrent steps interleave differently in every run; a
    step's log line by line.

    Args:
        store: as :func:`runs` takes it.
        first: a run id or unique prefix; ``second`` too.
        log_dir: where both runs' logs are (as :func:`log_file` takes it).

    .. versionadded:: 0.1
    """
    async with _reading(store) as db:
        a = await run_result(db, first)
        b = await run_result(db, second)
        modes = [(await db.run_origin(r.run_id)).mode for r in (a, b)]
    latest_a = {(s.step, s.sequence): s for s in latest_step_runs(a)}
    latest_b = {(s.step, s.sequence): s for s in latest_step_runs(b)}
    # Sequence by sequence (in the order they first ran), each in the order its steps ran.
    keys = list(dict.fromkeys([*latest_a, *latest_b]))
    sequences = list(dict.fromkeys(seq for _, seq in keys))
    keys.sort(key=lambda key: sequences.index(key[1]))
    steps = tuple(
        StepDiff(
            step,
            seq,
            None if (step, seq) not in latest_a else latest_a[step, seq].status,
            None if (step, seq) not in latest_b else latest_b[step, seq].status,
        )
        for step, seq in keys
    )
    try:
        dirs = (_run_dir(a, modes[0], log_dir), _run_dir(b, modes[1], log_dir))
    except ConfigurationError as exc:
        return RunDiff(a, b, steps, (), logs_missing=str(exc))
    for run, path in zip((a, b), dirs, strict=True):
        if not await asyncio.to_thread(path.is_dir):
            why = f"run {run.run_id} has no log directory {str(path)!r}; pass --log-dir DIR"
            return RunDiff(a, b, steps, (), logs_missing=why)
    logs = await asyncio.to_thread(_diff_logs, *dirs)
    return RunDiff(a, b, steps, logs)


def latest_step_runs(result: RunResult) -> list[StepRun]:
    """Each step and sequence's latest recovery and attempt, in the order each first ran
    (the earlier attempts have ended).

    .. versionadded:: 0.1
    """
    latest: dict[tuple[str, str], StepRun] = {}
    for run in sorted(result.steps, key=lambda s: s.id):
        key = (run.step, run.sequence)
        if key not in latest or (run.recovery, run.attempt) > (
            latest[key].recovery,
            latest[key].attempt,
        ):
            latest[key] = run
    return list(latest.values())


def _diff_logs(a: Path, b: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    def logs(run_dir: Path) -> dict[str, Path]:
        return {path.name: path for path in run_dir.glob("*.log")}

    in_a, in_b = logs(a), logs(b)
    files = sorted(set(in_a) | set(in_b), key=lambda name: (name != "program.log", name))
    found = []
    for name in files:
        before = _normalised_lines(in_a.get(name), by_subject=name == "program.log")
        after = _normalised_lines(in_b.get(name), by_subject=name == "program.log")
        lines = tuple(difflib.unified_diff(before, after, f"a/{name}", f"b/{name}", lineterm=""))
        if lines:
            found.append((name, lines))
    return tuple(found)


#: What a program.log line is about: ``event go[1]``, ``step load[1]``.
_SUBJECT = re.compile(r"\b(?:event|step) (\S+\[[^\]]*\])")


def _subject(line: str) -> str:
    found = _SUBJECT.search(line)
    return "" if found is None else found[1]


def _normalised_lines(path: Path | None, *, by_subject: bool = False) -> list[str]:
    if path is None:
        return []
    lines = normalise_log(path.read_text(encoding="utf-8", errors="replace")).splitlines()
    if by_subject:
        # Concurrent steps interleave their lines differently in every run: compare each
        # event's and step's lines in their order, subject by subject (the run's own lines,
        # about no step, first).
        lines.sort(key=_subject)
    return lines
