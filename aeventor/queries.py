"""Run queries: list a store's runs and read one back, by its id or a unique prefix of it;
cancel a run; delete the runs that ended long ago (:func:`cleanup`).

These only read: given a URL, a path or a store name they open the store without creating
or migrating it (a missing sqlite file, or a schema older than this aeventor, is an error
that says what to do). ``aeventor runs`` and ``aeventor show`` are thin over them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import URL

from .backends.stores import open_store
from .backends.stores.base import Database
from .dispatch import PENDING
from .exceptions import AeventorError, ConfigurationError, NoResult
from .program.model import RunStatus
from .records import RunResult, run_log_dir

__all__ = (
    "CLEANUP_BATCH",
    "AmbiguousRunId",
    "Cleanup",
    "RunEnded",
    "RunReader",
    "cancel",
    "cleanup",
    "run_result",
    "runs",
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
