"""Run queries: list a store's runs and read one back, by its id or a unique prefix of it.

These only read: given a URL, a path or a store name they open the store without creating
or migrating it (a missing sqlite file, or a schema older than this aeventor, is an error
that says what to do). ``aeventor runs`` and ``aeventor show`` are thin over them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import URL

from .backends.stores import open_store
from .exceptions import ConfigurationError, NoResult
from .program.model import RunStatus
from .records import RunResult

__all__ = ("AmbiguousRunId", "RunReader", "run_result", "runs")


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
