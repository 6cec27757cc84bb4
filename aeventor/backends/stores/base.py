"""The store: every state change of every run, as short SQL transactions.

:class:`Database` holds the engine's SQL (SQLAlchemy Core, no dialect-specific text); the
backend modules subclass it only where the servers differ: how a write transaction begins,
how a duplicate insert is ignored, how other processes are woken.

Each state change is one transaction that locks the run row first (``SELECT ... FOR UPDATE``;
sqlite serialises writers with ``BEGIN IMMEDIATE`` instead), reads the few facts the state
machine needs, and writes its answer: completing a step, firing its triggers, evaluating the
expressions they satisfy and making steps ready commit together, so any process holding the
database can advance any run.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import importlib
import inspect
import json
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, Self, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...dispatch import PENDING
from ...dispatch.claims import (
    Delay,
    RunWorkers,
    StepEnd,
    StepRunState,
    WorkerState,
    new_token,
)
from ...dispatch.pools import Waiter, run_scoped
from ...dispatch.store import (
    Claim,
    NewStepRun,
    Notifier,
    RunLock,
    RunOrigin,
    Store,
    StoredProgram,
    StoreTx,
    Taker,
)
from ...exceptions import (
    AuthenticationError,
    ConnectionLost,
    DatabaseError,
    NoResult,
    SchemaVersionError,
    StatementTimeout,
    StoreConfigError,
    TransientError,
    UniqueViolation,
    ValueTooLarge,
)
from ...logs import get_logger
from ...program.model import ProgramDef, RunStatus, StepStatus, version_of
from ...records import DelayedTarget, ProgramSummary, RunResult, Slots, StepRun, run_log_dir
from ...utils import backoff, stop_at_deadline
from . import schema as t

__all__ = (
    "DEFAULT_STATEMENT_TIMEOUT",
    "Database",
    "ErrorKind",
    "SqlTx",
    "retry_transient",
)

log = get_logger("aeventor.store")

_T = TypeVar("_T")
#: The statuses of a run that has ended (``aeventor cleanup`` deletes only these).
_ENDED = (RunStatus.success, RunStatus.failure, RunStatus.cancelled)
_P = ParamSpec("_P")


def retry_transient(
    method: Callable[Concatenate[Database, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Database, _P], Coroutine[Any, Any, _T]]:
    """Retry a store operation on a :class:`~aeventor.exceptions.TransientError`, up to
    ``reconnect_deadline``.

    Transient: the server is unreachable (:class:`ConnectionLost`), rolled the transaction
    back for a deadlock or a serialization failure, timed out a lock wait, or has no
    connection left. Every operation is one transaction whose writes are conditional (a
    step run is completed only while active under the caller's fencing token, a trigger
    inserted only once), so running it again after a lost connection cannot apply it twice;
    an operation whose first attempt may have committed unacknowledged (it takes an
    ``attempt`` argument) recognises that commit and returns what it did.
    :func:`aeventor.utils.backoff` spaces the attempts (full jitter from
    ``RECONNECT_INITIAL_DELAY``, capped at ``RECONNECT_MAX_DELAY``) with the store's
    ``sleep``, and logs a warning before each delay. The deadline is measured on the store's
    ``clock``, so tests can move time; past it the last error is re-raised. Nothing else is
    retried: a refused login, a statement timeout or a value too large for the server fails
    at once.
    """

    # A method that takes ``attempt`` is told which attempt it is (1, 2, ...): from the
    # second on, it first looks for what an earlier attempt may have committed.
    counts = "attempt" in inspect.signature(method).parameters

    @functools.wraps(method)
    async def wrapper(self: Database, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        retrying = backoff(
            initial=RECONNECT_INITIAL_DELAY,
            maximum=RECONNECT_MAX_DELAY,
            stop=stop_at_deadline(self.clock, self.clock() + self.reconnect_deadline),
            retry_on=lambda exc: isinstance(exc, TransientError),
            sleep=self.sleep,
            log=log,
            event=_retry_event,
            operation=method.__name__,
        )
        async for attempt in retrying:
            with attempt:
                # Run each attempt to its end even when the caller is cancelled: a transaction
                # cut off mid-statement would leave its connection (and sqlite's write lock)
                # behind. The caller's cancellation is re-raised once the attempt is over.
                if counts:
                    kwargs["attempt"] = attempt.retry_state.attempt_number
                operation = asyncio.ensure_future(method(self, *args, **kwargs))
                try:
                    return await asyncio.shield(operation)
                except asyncio.CancelledError:
                    await asyncio.wait([operation])
                    if not operation.cancelled() and operation.exception() is not None:
                        # The caller is gone; its cancellation wins. The attempt's own error
                        # is retrieved here (asyncio would report it as never retrieved).
                        log.debug(
                            "store operation failed after its caller was cancelled",
                            operation=method.__name__,
                            error=str(operation.exception()),
                        )
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    return wrapper


def _retry_event(exc: BaseException) -> str:
    if isinstance(exc, ConnectionLost):
        return "store unreachable; retrying"
    return "store operation failed transiently; retrying"


RECONNECT_INITIAL_DELAY = 0.05
RECONNECT_MAX_DELAY = 2.0
#: The connection pool of a process's store: a worker's writes go through its committer, its
#: claim loop, its heartbeat and its reaper, so a few connections serve it; whoever else
#: needs one waits (longer than a statement may run) rather than opening more.
POOL = {"pool_size": 4, "max_overflow": 0, "pool_timeout": 180}
#: Seconds a statement may run before the server cancels it, unless the store sets its own.
DEFAULT_STATEMENT_TIMEOUT = 60.0
#: Rows fetched at a time by a read of a run's every step run (:meth:`Database.load_result`).
ROWS_PER_FETCH = 1000
#: Most new step runs inserted by one statement (SQLAlchemy's default page of
#: "insertmanyvalues"): a wide fan-out is not held whole as parameters.
ROWS_PER_INSERT = 1000

#: What a driver error means for the caller (see :meth:`Database._classify`):
#: ``auth`` the login was refused; ``disconnect`` the connection is gone; ``transient`` a
#: deadlock, serialization failure, lock wait timeout or a server out of connections;
#: ``timeout`` the statement timeout cancelled a statement; ``too_large`` a statement was
#: larger than the server accepts.
ErrorKind = Literal["auth", "disconnect", "transient", "timeout", "too_large"]

# Hot-path statements, built once: SQLAlchemy then only binds values (its compiled cache
# makes building them per call pay off little; constructing them is most of the cost).
#: The run row as a transaction locks it, in :class:`RunLock`'s order.
_RUN_LOCK_COLUMNS = (
    t.run.c.status,
    t.run.c.stopped,
    t.run.c.recovery,
    t.run.c.mode,
    t.run.c.replay,
    t.run.c.controller,
)
_LOCK_RUN = (
    sa.select(*_RUN_LOCK_COLUMNS).where(t.run.c.id == sa.bindparam("run_id")).with_for_update()
)
#: What a :class:`StepRun` holds of a step run's row.
_STEP_RUNS = sa.select(
    *(
        t.step_run.c[name]
        for name in (
            "id",
            "run_id",
            "step",
            "sequence",
            "recovery",
            "attempt",
            "status",
            "host",
            "worker",
            "pid",
            "result",
            "error",
            "created",
            "started",
            "ended",
        )
    )
)
_FIRED = sa.select(t.trigger.c.event).where(
    t.trigger.c.run_id == sa.bindparam("run_id"),
    t.trigger.c.sequence == sa.bindparam("sequence"),
    t.trigger.c.recovery == sa.bindparam("recovery"),
    t.trigger.c.event.in_(sa.bindparam("events", expanding=True)),
)
#: Every event a sequence fired (a join of more than FIRED_IN_LIMIT unknown events).
_FIRED_ALL = sa.select(t.trigger.c.event).where(
    t.trigger.c.run_id == sa.bindparam("run_id"),
    t.trigger.c.sequence == sa.bindparam("sequence"),
    t.trigger.c.recovery == sa.bindparam("recovery"),
)
#: Above this many events whose state a transaction needs, it reads all the sequence fired.
FIRED_IN_LIMIT = 200
# Whether a run has anything left to do: one row is enough (a count would read every
# pending row of a large fan-out at each of its completions).
_PENDING = (
    sa.select(t.step_run.c.id)
    .where(
        t.step_run.c.run_id == sa.bindparam("run_id"),
        t.step_run.c.status.in_([sa.literal(s.value, literal_execute=True) for s in PENDING]),
    )
    .limit(1)
)
_PENDING_DELAYS = (
    sa.select(t.delay.c.id)
    .where(t.delay.c.run_id == sa.bindparam("run_id"), t.delay.c.done.is_(None))
    .limit(1)
)
#: The step run is active under this claim: its fencing token is the claimer's. A worker
#: whose lease was taken (reaped, requeued, claimed again) holds a stale token.
_HELD = (
    t.step_run.c.id == sa.bindparam("claim_id"),
    t.step_run.c.status == StepStatus.active.value,
    t.step_run.c.token.is_not_distinct_from(sa.bindparam("held_token", type_=sa.String(32))),
)
_END_STEP = (
    t.step_run.update()
    .where(*_HELD)
    .values(
        status=sa.bindparam("new_status"),
        result=sa.bindparam("new_result"),
        error=sa.bindparam("new_error"),
        ended=sa.bindparam("now"),
        lease_until=None,
    )
)
#: end_steps' statements, on rows it locked and found active under their token.
_END_VALUES: dict[str, Any] = {
    "status": sa.bindparam("new_status"),
    "result": sa.bindparam("new_result"),
    "error": sa.bindparam("new_error"),
    "ended": sa.bindparam("now"),
    "lease_until": None,
}
_END_STEPS = (
    t.step_run.update()
    .where(
        t.step_run.c.id.in_(sa.bindparam("claim_ids", expanding=True)),
        t.step_run.c.status == StepStatus.active.value,
    )
    .values(**_END_VALUES)
)
_END_STEP_LOCKED = (
    t.step_run.update()
    .where(
        t.step_run.c.id == sa.bindparam("claim_id"),
        t.step_run.c.status == StepStatus.active.value,
    )
    .values(**_END_VALUES)
)

#: end_step and lock_run in one statement (Postgres): the run's row is locked in the
#: subquery, before the step run's (UPDATE ... FROM locks its target as it updates it, after
#: the join), the order every transaction keeps.
_LOCKED_RUN = (
    sa.select(t.run.c.id, *_RUN_LOCK_COLUMNS)
    .where(t.run.c.id == sa.bindparam("lock_run"))
    .with_for_update()
    .subquery("locked_run")
)
_END_STEP_LOCKING_RUN = (
    t.step_run.update()
    .where(*_HELD, t.step_run.c.run_id == _LOCKED_RUN.c.id)
    .values(**_END_VALUES)
    .returning(*(_LOCKED_RUN.c[column.name] for column in _RUN_LOCK_COLUMNS))
)

# Active step runs as claims (the reaper's and a stopping worker's reads).
#: The columns of a claim, in :class:`Claim`'s order.
_CLAIM_COLUMNS = (
    t.step_run.c.id,
    t.step_run.c.run_id,
    t.step_run.c.step,
    t.step_run.c.sequence,
    t.step_run.c.recovery,
    t.step_run.c.attempt,
    t.step_run.c.token,
    t.step_run.c.host,
    t.step_run.c.queue,
    t.step_run.c.mac,
    t.step_run.c.pid,
)
_ACTIVE_CLAIMS = sa.select(*_CLAIM_COLUMNS).where(t.step_run.c.status == StepStatus.active.value)


_REQUEUE_STEP = (
    t.step_run.update()
    .where(*_HELD, t.step_run.c.pid.is_(None))
    .values(
        status=StepStatus.ready.value,
        worker=None,
        token=None,
        pid=None,
        started=None,
        lease_until=None,
    )
)


_REVISION = sa.text(f"SELECT version_num FROM {t.VERSION_TABLE}")

#: A run without its step runs: the listings' read.
_RUN_SUMMARY = sa.select(
    t.run.c.id,
    t.run.c.program_name,
    t.run.c.status,
    t.run.c.reason,
    t.run.c.created,
    t.run.c.ended,
    t.run.c.log_dir,
    t.run.c.recovery,
)


def _run_summary(row: Any) -> RunResult:
    return RunResult(
        run_id=row.id,
        program=row.program_name,
        status=RunStatus(row.status),
        reason=row.reason,
        created=row.created,
        ended=row.ended,
        steps=(),
        log_dir=None
        if row.log_dir is None
        else run_log_dir(Path(row.log_dir), row.program_name, row.id),
        recovery=int(row.recovery),
    )


class Database(Store):
    """A store reached through SQLAlchemy's async engine.

    Args:
        url: the SQLAlchemy URL (driver included); its password is never logged.
        poll_interval: seconds between polls for work made by other processes, or None
            when wake-ups always arrive (sqlite in one process, Postgres LISTEN).
        statement_timeout: seconds any one statement may run before the server cancels it
            (:class:`~aeventor.exceptions.StatementTimeout`); None: no limit. Postgres and
            MariaDB/MySQL apply it to every connection of the store; sqlite has no such
            setting (its writers wait for the write lock for its busy timeout).

    .. versionadded:: 0.1
    """

    #: Seconds between polls when the caller sets none (None: never poll).
    default_poll_interval: float | None = None

    #: Whether an insert that skips duplicates can report the rows it inserted (RETURNING),
    #: which claiming at insert time needs.
    claims_on_insert = True
    #: Whether an INSERT of fired events can say which rows it inserted (RETURNING on an
    #: insert that skips existing rows): :meth:`SqlTx.fire_new`.
    fires_on_insert = False
    #: Whether :meth:`server_now` is the server's clock in SQL (not a value of this
    #: process's, as sqlite's is): then statements that use it can be built once and reused.
    clock_in_sql = False
    #: Whether one UPDATE ... FROM ... RETURNING can end a step run and lock its run row,
    #: in that order (:meth:`SqlTx.end_step_locking_run`).
    ends_locking_run = False

    #: Seconds a store operation keeps retrying while the server is unreachable.
    reconnect_deadline: float = 120.0

    def __init__(
        self,
        *,
        url: URL,
        poll_interval: float | None = None,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self.url = url
        self.statement_timeout = statement_timeout
        # Injectable for tests of the back-off: its delays are awaited with sleep, its
        # deadlines measured on clock.
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.clock: Callable[[], float] = time.monotonic
        self.poll_interval = (
            poll_interval if poll_interval is not None else self.default_poll_interval
        )
        self.notifier = Notifier()
        self._engine: AsyncEngine | None = None
        #: Hot-path statements built once per kind of caller (see :meth:`_reused`).
        self._reused_statements: dict[Hashable, Any] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.render_as_string(hide_password=True)}>"

    # -- lifecycle ----------------------------------------------------------------------

    @abc.abstractmethod
    def _create_engine(self) -> AsyncEngine: ...

    async def open(self) -> None:
        """Connect and make sure the schema exists and is current."""
        if self._engine is not None:
            return
        self._engine = self._create_engine()
        upgrade = asyncio.ensure_future(self._ensure_current_schema())
        try:
            with self.wrap_exceptions():
                await asyncio.shield(upgrade)
        except BaseException:
            # Let a cancelled upgrade finish its transaction before the engine goes.
            await asyncio.wait([upgrade])
            await self.aclose()
            raise

    async def _ensure_current_schema(self) -> None:
        # The fast path: a schema at this aeventor's head needs neither Alembic (whose
        # import costs most of an open) nor a lock. A revision is recorded only with the
        # migration that makes it, so a reader that sees the head sees the whole schema.
        if await self._revision() != t.HEAD_REVISION:
            await self._ensure_schema()

    async def _revision(self) -> str | None:
        """The schema's recorded revision; None when there is none (or no table yet)."""
        try:
            async with self.engine.connect() as conn:
                return (await conn.execute(_REVISION)).scalar_one_or_none()
        except DBAPIError:
            return None  # no version table: a new database (the upgrade makes it)

    async def _ensure_schema(self) -> None:
        await (await migrations_module()).upgrade_to_head(self.engine)

    async def open_for_reading(self) -> None:
        """Connect to an existing store without creating or migrating anything.

        For read-only commands (``aeventor runs``, ``show``).

        Raises:
            StoreConfigError: a sqlite file that does not exist (the message names it).
            SchemaVersionError: the store has no aeventor schema, or one older or newer
                than this aeventor's; the message says what to run.

        .. versionadded:: 0.1
        """
        if self._engine is not None:
            return
        database = self.url.database
        is_file = self.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        if is_file and not await asyncio.to_thread(Path(str(database)).is_file):
            raise StoreConfigError(
                f"no sqlite store {str(database)!r}: check the path (read-only commands "
                "never create a store)"
            )
        self._engine = self._create_engine()
        try:
            with self.wrap_exceptions():
                module = await migrations_module()
                script = await module.load_scripts()
                async with self.engine.connect() as conn:
                    current = await conn.run_sync(module.current_revision)
            head = script.get_current_head()
            if current != head:
                module.check_known(current, script)  # newer: upgrade aeventor instead
                what = "has no aeventor schema" if current is None else "has an older schema"
                where = self.url.render_as_string(hide_password=True)
                if self.url.get_backend_name() == "sqlite":
                    where = str(database)
                raise SchemaVersionError(
                    f"{self!r} {what} (revision {current!r}, this aeventor's is {head!r}); "
                    f"run `aeventor db upgrade --store {where}` first"
                )
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise DatabaseError(f"{self!r} is not open; use `async with` or await its open() first")
        return self._engine

    # -- dialect hooks ------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; driver errors come out as aeventor errors."""
        with self.wrap_exceptions():
            async with self.engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection."""
        with self.wrap_exceptions():
            async with self.engine.connect() as conn:
                yield conn

    def claims_on_insert_in(self, conn: AsyncConnection, *, retried: bool) -> bool:
        """Whether a transaction on ``conn`` can insert step runs already claimed (it sees
        which rows it inserted)."""
        return self.claims_on_insert

    def _insert_claimed(self, table: sa.Table) -> Any:
        """The INSERT of step runs claimed as they are made (see :meth:`claims_on_insert_in`)."""
        return self._insert_ignore(table)

    @abc.abstractmethod
    def _insert_ignore(self, table: sa.Table) -> Any:
        """An INSERT that silently skips rows whose unique key exists."""

    async def _notify_work(
        self, conn: AsyncConnection, run_id: str, queues: Collection[str | None] = ()
    ) -> None:
        """Tell other processes, at commit, that ``run_id`` (and these queues) may have work.

        A no-op by default: only Postgres can push wake-ups.
        """

    @retry_transient
    async def write(self, operation: Callable[[StoreTx], Awaitable[_T]], attempt: int = 1) -> _T:
        """Run ``operation`` in one write transaction, retried whole on a lost connection.

        From the second attempt on, the transaction says it is a retry (``tx.retried``): the
        first may have committed before its acknowledgement was lost, and the operation
        then returns what that commit did.
        """
        async with self.transaction() as conn:
            tx = SqlTx(self, conn, retried=attempt > 1)
            value = await operation(tx)
            await tx.flush()
            for run_id, queues in tx.notifications.items():
                await self._notify_work(conn, run_id, queues)
        # Work this transaction made for other runs (slots it gave back): this process's
        # workers hear of it here, as other processes do through the store.
        for run_id, queues in tx.here.items():
            self.notifier.notify(run_id)
            for queue in queues:
                self.notifier.notify_queue(queue)
        return value

    @contextmanager
    def wrap_exceptions(self) -> Iterator[None]:
        """Translate SQLAlchemy and driver errors into aeventor errors, chained.

        What an error means comes first from :meth:`_classify` (a refused login is not a
        lost connection, even where the driver dropped the connection with it); then a
        connection SQLAlchemy invalidated is a lost one.
        """
        try:
            yield
        except IntegrityError as exc:
            raise UniqueViolation(
                f"duplicate row: {exc.orig}", constraint=self._constraint_name(exc)
            ) from exc
        except DBAPIError as exc:
            raise self._translate(exc) from exc
        except OSError as exc:
            raise ConnectionLost(f"cannot reach {self!r}: {exc}") from exc
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{self!r}: {exc}") from exc

    def _translate(self, exc: DBAPIError) -> DatabaseError:
        kind = self._classify(exc)
        reason = self._reason(exc)
        if kind is None and exc.connection_invalidated:
            kind = "disconnect"
        if kind == "auth":
            return AuthenticationError(
                f"{self!r}: the server refused the login: {reason}; check the user name "
                "and password in the store URL (or the named store's encrypted password) "
                "and that this user may connect to this database"
            )
        if kind == "disconnect":
            return ConnectionLost(f"lost the connection to {self!r}: {reason}")
        if kind == "transient":
            return TransientError(f"{self!r}: {reason}")
        if kind == "timeout":
            limit = "none" if self.statement_timeout is None else f"{self.statement_timeout:g} s"
            return StatementTimeout(
                f"{self!r}: a statement ran past the store's statement_timeout ({limit}) "
                f"and the server cancelled it ({reason}); "
                "raise the timeout with ?statement_timeout=SECONDS in the store URL "
                "(0: no limit), or find what held it up"
            )
        if kind == "too_large":
            return ValueTooLarge(
                f"{self!r}: a statement was larger than the server accepts ({reason}); "
                f"{self.describe_limit()}; make it smaller"
                + (f", or {how}" if (how := self.how_to_raise_limit()) else ""),
                limit=self.max_value_bytes,
            )
        return DatabaseError(f"{self!r}: {reason}")

    def _reason(self, exc: DBAPIError) -> str:
        """The driver's message, for ours."""
        return str(exc.orig)

    def _classify(self, exc: DBAPIError) -> ErrorKind | None:
        """What a driver error means (None: a plain :class:`DatabaseError`); per backend."""
        return None

    def _constraint_name(self, exc: IntegrityError) -> str | None:
        return getattr(exc.orig, "constraint_name", None)

    def server_now(self) -> sa.ColumnElement[datetime]:
        """The database server's clock, in SQL: leases are set and judged on it alone, so
        clients whose clocks disagree still agree on whose lease lapsed.

        sqlite runs in the client's process: its clock is the client's.
        """
        return sa.literal(t.utcnow(), t.UTCDateTime)

    def server_now_plus(self, delta: timedelta) -> sa.ColumnElement[datetime]:
        """``delta`` after :meth:`server_now`, in SQL."""
        return sa.literal(t.utcnow() + delta, t.UTCDateTime)

    # -- programs and runs --------------------------------------------------------------

    @retry_transient
    async def register_program(self, program: ProgramDef, *, signature: str | None = None) -> int:
        """Store a program definition (once per version) and return its id.

        A signature given for a version stored unsigned is added to it.

        Raises:
            ValueTooLarge: the definition is larger than the store can take
                (:attr:`max_value_bytes`).
        """
        definition = program.canonical_json()
        version = version_of(definition)
        too_large = self.oversize(
            f"program {program.name!r}'s definition",
            definition,
            fix="define fewer or smaller steps",
        )
        if too_large is not None:
            raise ValueTooLarge(
                too_large, size=self.value_size(definition), limit=self.max_value_bytes
            )
        async with self.transaction() as conn:
            # Values bound at execution, not in the statement: SQLAlchemy's statement cache
            # keeps a statement's own values (a large definition would stay in memory).
            await conn.execute(
                self._insert_ignore(t.program),
                {
                    "name": program.name,
                    "version": version,
                    "definition": definition,
                    "created": t.utcnow(),
                    "signature": signature,
                },
            )
            if signature is not None:
                await conn.execute(
                    t.program.update()
                    .where(
                        t.program.c.name == program.name,
                        t.program.c.version == version,
                        t.program.c.signature.is_(None),
                    )
                    .values(signature=signature)
                )
            row = (
                await conn.execute(
                    sa.select(t.program.c.id).where(
                        t.program.c.name == program.name, t.program.c.version == version
                    )
                )
            ).one()
        return int(row.id)

    @retry_transient
    async def load_program(self, program_id: int) -> ProgramDef:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    sa.select(t.program.c.definition).where(t.program.c.id == program_id)
                )
            ).one_or_none()
        if row is None:
            raise NoResult(f"no program with id {program_id} in {self!r}")
        return ProgramDef.from_json(json.loads(row.definition))

    @retry_transient
    async def latest_program(self, name: str) -> ProgramDef:
        """The newest registered version of program ``name``."""
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    sa.select(t.program.c.definition)
                    .where(t.program.c.name == name)
                    .order_by(t.program.c.created.desc(), t.program.c.id.desc())
                    .limit(1)
                )
            ).one_or_none()
        if row is None:
            raise NoResult(f"no program {name!r} is registered in {self!r}")
        return ProgramDef.from_json(json.loads(row.definition))

    async def claim(
        self,
        *,
        worker: str,
        limit: int,
        run_id: str | None = None,
        hosts: Sequence[str] | None = None,
        lease: timedelta = timedelta(seconds=60),
    ) -> list[Claim]:
        """Atomically take up to ``limit`` ready step runs (of one run, or queued for hosts).

        Two claimers never take the same step run: rows are locked with ``SKIP LOCKED``
        where the server has it, and the update is conditional on the row still being ready.
        The claimed rows' ``active`` triggers are fired by :meth:`started`, in a transaction
        of its own, so that a claim never waits on a run lock while holding row locks.

        Every claim gets a new fencing token; a claim retried after a lost connection
        finds what its first attempt committed by that token.
        """
        if limit <= 0:
            return []
        return await self._claim_ready(
            worker=worker, limit=limit, run_id=run_id, hosts=hosts, lease=lease, token=new_token()
        )

    def _reused(self, key: Hashable, build: Callable[[], _T], *, clock: bool = False) -> _T:
        """The statement ``build`` makes, built once per ``key`` (SQLAlchemy then finds its
        compiled form from the statement object, not by walking a new one). One that reads
        :meth:`server_now` (``clock``) is reused only where that is SQL, not a value."""
        if clock and not self.clock_in_sql:
            return build()
        statement = self._reused_statements.get(key)
        if statement is None:
            statement = self._reused_statements[key] = build()
        return cast(_T, statement)

    def _claim_statements(
        self, dialect: sa.Dialect, *, by_run: bool, by_hosts: bool, lease: timedelta
    ) -> _ClaimStatements:
        """The claim's statements for one kind of claimer."""
        return self._reused(
            ("claim", by_run, by_hosts, lease),
            lambda: self._build_claim(dialect, by_run=by_run, by_hosts=by_hosts, lease=lease),
            clock=True,
        )

    def _build_claim(
        self, dialect: sa.Dialect, *, by_run: bool, by_hosts: bool, lease: timedelta
    ) -> _ClaimStatements:
        step_run = t.step_run
        # Inline, not a bound parameter: a prepared statement's generic plan could not use
        # the partial index on status = 'ready' (a full scan at a million rows).
        is_ready = step_run.c.status == sa.literal(StepStatus.ready.value, literal_execute=True)

        def candidates(*columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
            query = sa.select(*columns).where(
                is_ready,
                # A retry waits out its backoff (on the server's clock).
                sa.or_(step_run.c.not_before.is_(None), step_run.c.not_before <= self.server_now()),
            )
            if by_run:
                query = query.where(step_run.c.run_id == sa.bindparam("claim_run"))
            if by_hosts:
                query = query.where(step_run.c.queue.in_(sa.bindparam("hosts", expanding=True)))
            return (
                query.order_by(step_run.c.id)
                .limit(sa.bindparam("limit", type_=sa.Integer))
                .with_for_update(skip_locked=True)
            )

        take = {
            "status": StepStatus.active.value,
            "worker": sa.bindparam("claim_worker"),
            "started": sa.bindparam("claim_started"),
            "lease_until": self.server_now_plus(lease),
            "token": sa.bindparam("claim_token"),
        }
        pick = candidates(*_CLAIM_COLUMNS)
        if dialect.update_returning:
            # Postgres and sqlite: one statement. Postgres locks the candidates in the
            # subquery (SKIP LOCKED passes over rows other claimers hold) and rechecks
            # status = 'ready' on the row's latest version; sqlite has no FOR UPDATE, its
            # write lock (BEGIN IMMEDIATE) serialises claimers.
            picked = candidates(step_run.c.id)
            # Postgres: "= ANY(ARRAY(subquery))", an InitPlan run once. With IN the planner
            # may make a semi join that re-runs the locking subquery for every ready row of
            # every run, and may then take more than ``limit`` rows.
            chosen = (
                step_run.c.id == sa.any_(sa.func.array(picked.scalar_subquery()))
                if dialect.name == "postgresql"
                else step_run.c.id.in_(picked)
            )
            update = step_run.update().where(chosen, is_ready).values(take)
            return _ClaimStatements(pick, update.returning(*_CLAIM_COLUMNS))
        # MariaDB/MySQL: no UPDATE ... RETURNING, and no LIMIT in an IN subquery. Lock the
        # candidates (pick), then take them all in one UPDATE.
        update = step_run.update().where(
            step_run.c.id.in_(sa.bindparam("ids", expanding=True)), is_ready
        )
        return _ClaimStatements(pick, update.values(take))

    @retry_transient
    async def _claim_ready(
        self,
        *,
        worker: str,
        limit: int,
        run_id: str | None,
        hosts: Sequence[str] | None,
        lease: timedelta,
        token: str,
        attempt: int = 1,
    ) -> list[Claim]:
        async with self.transaction() as conn:
            if attempt > 1:
                # An earlier attempt may have committed before its connection was lost: what
                # it claimed carries our token. Hand that out, or it would stay active,
                # leased to us and run by nobody.
                step_run = t.step_run
                earlier = await conn.execute(
                    _ACTIVE_CLAIMS.where(step_run.c.worker == worker, step_run.c.token == token)
                )
                rows = sorted(earlier.all(), key=lambda row: row.id)
                if rows:
                    return [Claim.from_row(r) for r in rows]
            return await self._take_ready(
                conn,
                worker=worker,
                limit=limit,
                run_id=run_id,
                hosts=hosts,
                lease=lease,
                token=token,
            )

    async def _take_ready(
        self,
        conn: AsyncConnection | _Flushing,
        *,
        worker: str,
        limit: int,
        run_id: str | None,
        hosts: Sequence[str] | None,
        lease: timedelta,
        token: str,
    ) -> list[Claim]:
        """Claim up to ``limit`` ready step runs (of one run, or of host queues) in the
        caller's transaction, passing over those other claimers hold."""
        if limit <= 0:
            return []
        params: dict[str, Any] = {
            "claim_worker": worker,
            "claim_started": t.utcnow(),
            "claim_token": token,
            "limit": limit,
        }
        if run_id is not None:
            params["claim_run"] = run_id
        if hosts is not None:
            params["hosts"] = list(hosts)
        statements = self._claim_statements(
            conn.dialect, by_run=run_id is not None, by_hosts=hosts is not None, lease=lease
        )
        if conn.dialect.update_returning:
            taken = await conn.execute(statements.take, params)
            return [Claim.from_row(r) for r in sorted(taken.all(), key=lambda row: row.id)]
        rows = list((await conn.execute(statements.pick, params)).all())
        if not rows:
            return []
        ids = [row.id for row in rows]
        result = await conn.execute(statements.take, {**params, "ids": ids})
        if result.rowcount != len(ids):
            # Not expected (this transaction holds the rows' locks), but never hand out a
            # row that another claimer took: keep only those taken here.
            mine = set(
                (
                    await conn.execute(
                        sa.select(t.step_run.c.id).where(
                            t.step_run.c.id.in_(ids), t.step_run.c.token == token
                        )
                    )
                ).scalars()
            )
            rows = [row for row in rows if row.id in mine]
        # The rows were read before the update gave them our token.
        return [dataclasses.replace(Claim.from_row(r), token=token) for r in rows]

    @retry_transient
    async def heartbeat(
        self,
        *,
        worker: str,
        hostname: str,
        pid: int,
        hosts: Sequence[str],
        lease: timedelta,
        held: Mapping[int, str | None],
    ) -> dict[int, StepStatus]:
        """One batched beat: the worker's row and lease, and the leases of what it holds.

        Returns the step runs of ``held`` (id -> fencing token) that are no longer the
        worker's, with their status: cancelled from anywhere, or taken from it (recorded
        lost, requeued, claimed by another worker) while it could not renew them. The
        worker terminates those.
        """
        until = self.server_now_plus(lease)
        step_run = t.step_run
        async with self.transaction() as conn:
            now = t.utcnow()
            updated = await conn.execute(
                t.agent.update()
                .where(t.agent.c.id == worker)
                .values(
                    heartbeat=now, lease_until=until, hosts=json.dumps(list(hosts)), stopped=None
                )
            )
            if updated.rowcount == 0:
                await conn.execute(
                    t.agent.insert().values(
                        id=worker,
                        hostname=hostname,
                        pid=pid,
                        hosts=json.dumps(list(hosts)),
                        started=now,
                        heartbeat=now,
                        lease_until=until,
                    )
                )
            if not held:
                return {}
            ids = sorted(held)
            # Locked in id order first, as a group commit locks them: an UPDATE of many rows
            # locks them in whatever order its plan reads them.
            await _lock_step_runs(conn, ids)
            await conn.execute(
                step_run.update()
                .where(
                    step_run.c.id.in_(ids),
                    step_run.c.worker == worker,
                    step_run.c.status == StepStatus.active.value,
                )
                .values(lease_until=until)
            )
            rows = (
                await conn.execute(
                    sa.select(
                        step_run.c.id, step_run.c.status, step_run.c.worker, step_run.c.token
                    ).where(step_run.c.id.in_(ids))
                )
            ).all()
        return _revoked(held, worker, rows)

    @retry_transient
    async def worker_stopped(self, worker: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                t.agent.update()
                .where(t.agent.c.id == worker)
                .values(stopped=t.utcnow(), lease_until=None)
            )

    @retry_transient
    async def lapsed_leases(
        self, *, limit: int = 100, run_id: str | None = None, worker: str | None = None
    ) -> list[Claim]:
        """Active step runs nobody will finish: their lease lapsed and their worker's too.

        Both are judged on the server's clock. A worker that is alive renews what it holds;
        what it no longer holds (``worker``: the caller's own step runs) lapses and is
        returned as well.

        Args:
            run_id: only this run's step runs.
            worker: the caller's id.
        """
        step_run = t.step_run
        now = self.server_now()
        alive = _worker_alive(now)
        orphaned = ~alive if worker is None else sa.or_(~alive, step_run.c.worker == worker)
        query = _ACTIVE_CLAIMS.where(step_run.c.lease_until < now, orphaned)
        if run_id is not None:
            query = query.where(step_run.c.run_id == run_id)
        async with self.reading() as conn:
            rows = await conn.execute(query.order_by(step_run.c.id).limit(limit))
            return [Claim.from_row(r) for r in rows]

    @retry_transient
    async def active_claims(self, *, worker: str) -> list[Claim]:
        """The step runs still active under ``worker``'s lease, whatever their lease says."""
        async with self.reading() as conn:
            rows = await conn.execute(_ACTIVE_CLAIMS.where(t.step_run.c.worker == worker))
            return [Claim.from_row(r) for r in rows]

    # -- reading ------------------------------------------------------------------------

    @retry_transient
    async def run_status(self, run_id: str) -> RunStatus:
        async with self.reading() as conn:
            status = (
                await conn.execute(sa.select(t.run.c.status).where(t.run.c.id == run_id))
            ).scalar_one_or_none()
        if status is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return RunStatus(status)

    @retry_transient
    async def load_result(self, run_id: str) -> RunResult:
        """The run and every step run it made, in creation order.

        The step runs are read by one statement a batch at a time, and the values they
        repeat (run id, worker, host, sequence, instants) are shared: a run of many steps is
        held as its :class:`StepRun` objects, never also as all its rows.
        """
        steps: list[StepRun] = []
        shared: dict[Any, Any] = {}
        share = shared.setdefault
        async with self.reading() as conn:
            run = (await conn.execute(sa.select(t.run).where(t.run.c.id == run_id))).one_or_none()
            if run is None:
                raise NoResult(f"no run {run_id!r} in {self!r}")
            rows = await conn.stream(
                _STEP_RUNS.where(t.step_run.c.run_id == run_id)
                .order_by(t.step_run.c.id)
                .execution_options(yield_per=ROWS_PER_FETCH)
            )
            async for r in rows:
                steps.append(
                    StepRun(
                        id=r.id,
                        run_id=share(r.run_id, r.run_id),
                        step=r.step,
                        sequence=share(r.sequence, r.sequence),
                        recovery=r.recovery,
                        attempt=r.attempt,
                        status=StepStatus(r.status),
                        host=share(r.host, r.host),
                        worker=share(r.worker, r.worker),
                        pid=r.pid,
                        result=None if r.result is None else json.loads(r.result),
                        error=r.error,
                        # Rows written by one transaction share its instants.
                        created=share(r.created, r.created),
                        started=share(r.started, r.started),
                        ended=share(r.ended, r.ended),
                    )
                )
        return dataclasses.replace(_run_summary(run), steps=steps)

    @retry_transient
    async def fired_events(self, run_id: str) -> list[tuple[str, str]]:
        """Every ``(event, sequence)`` fired in a run, once, in firing order (a recovered
        run carries its fired events into each new generation: the first counts)."""
        c = t.trigger.c
        first = sa.func.min(c.id).label("first")
        async with self.reading() as conn:
            rows = await conn.execute(
                sa.select(c.event, c.sequence, first)
                .where(c.run_id == run_id)
                .group_by(c.event, c.sequence)
                .order_by(first)
            )
            return [(r.event, r.sequence) for r in rows]

    @retry_transient
    async def run_delays(self, run_id: str) -> list[DelayedTarget]:
        """A run's delayed associations that fired, pending or reached, by due time.

        .. versionadded:: 0.1
        """
        d = t.delay.c
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    sa.select(d.event, d.sequence, d.recovery, d.kind, d.target, d.due, d.done)
                    .where(d.run_id == run_id)
                    .order_by(d.due, d.id)
                )
            ).all()
        return [
            DelayedTarget(r.event, r.sequence, r.recovery, r.kind, r.target, r.due, r.done)
            for r in rows
        ]

    @retry_transient
    async def run_slots(self, run_id: str) -> list[Slots]:
        """The slots a run's step runs wait for or hold, and those it kept.

        .. versionadded:: 0.1
        """
        slot, step_run = t.slot, t.step_run
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        slot.c.pool, step_run.c.step, step_run.c.sequence, slot.c.slots, slot.c.held
                    )
                    .select_from(slot.outerjoin(step_run, step_run.c.id == slot.c.step_run_id))
                    .where(slot.c.run_id == run_id)
                    .order_by(slot.c.id)
                )
            ).all()
        return [Slots(r.pool, r.step, r.sequence, int(r.slots), bool(r.held)) for r in rows]

    def _pending_delays(self, run_id: str | None) -> sa.Select[Any]:
        d, r = t.delay.c, t.run.c
        query = (
            sa.select(d.id, d.run_id, d.sequence, d.recovery, d.event, d.kind, d.target, d.due)
            .join_from(t.delay, t.run, r.id == d.run_id)
            .where(d.done.is_(None), r.status == RunStatus.running.value)
        )
        if run_id is not None:
            return query.where(d.run_id == run_id)
        return query.where(r.mode == "distributed")

    @retry_transient
    async def due_delays(self, *, run_id: str | None = None, limit: int = 100) -> list[Delay]:
        query = (
            self._pending_delays(run_id)
            .where(t.delay.c.due <= self.server_now())
            .order_by(t.delay.c.due, t.delay.c.id)
            .limit(limit)
        )
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Delay(r.id, r.run_id, r.sequence, r.recovery, r.event, r.kind, r.target) for r in rows
        ]

    @retry_transient
    async def next_delay(self, *, run_id: str | None = None) -> float | None:
        query = self._pending_delays(run_id).order_by(t.delay.c.due).limit(1)
        async with self.reading() as conn:
            row = (await conn.execute(query)).one_or_none()
            if row is None:
                return None
            now = (await conn.execute(sa.select(self.server_now()))).scalar_one()
        return max(float((row.due - now).total_seconds()), 0.0)

    @retry_transient
    async def run_workers(self, run_id: str) -> RunWorkers:
        run, c = t.run.c, t.step_run.c
        async with self.reading() as conn:
            controller = (
                await conn.execute(sa.select(run.controller).where(run.id == run_id))
            ).one_or_none()
            if controller is None:
                raise NoResult(f"no run {run_id!r} in {self!r}")
            lapsed_step = sa.func.max(c.lease_until) < self.server_now()
            holders = {
                r.worker: bool(r.lapsed)
                for r in await conn.execute(
                    sa.select(c.worker, lapsed_step.label("lapsed"))
                    .where(
                        c.run_id == run_id,
                        c.status == StepStatus.active.value,
                        c.worker.is_not(None),
                    )
                    .group_by(c.worker)
                )
            }
            ids = set(holders) | ({controller.controller} - {None})
            a = t.agent.c
            known = {
                r.id: WorkerState(
                    r.id,
                    r.hostname,
                    int(r.pid),
                    r.started,
                    r.stopped,
                    bool(r.lapsed),
                )
                for r in await conn.execute(
                    sa.select(
                        a.id,
                        a.hostname,
                        a.pid,
                        a.started,
                        a.stopped,
                        sa.case(
                            (a.lease_until.is_(None), True),
                            else_=a.lease_until < self.server_now(),
                        ).label("lapsed"),
                    ).where(a.id.in_(list(ids)))
                )
            }
        return RunWorkers(
            controller=controller.controller,
            holders=frozenset(holders),
            known=known,
            unleased=frozenset(w for w, lapsed in holders.items() if lapsed),
        )

    @retry_transient
    async def run_origin(self, run_id: str) -> RunOrigin:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    sa.select(t.run.c.program_id, t.run.c.mode, t.run.c.signature).where(
                        t.run.c.id == run_id
                    )
                )
            ).one_or_none()
        if row is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return RunOrigin(run_id, int(row.program_id), row.mode, row.signature)

    @retry_transient
    async def list_runs(
        self,
        *,
        program: str | None = None,
        limit: int = 20,
        status: RunStatus | None = None,
        since: datetime | None = None,
        id_prefix: str | None = None,
    ) -> list[RunResult]:
        """The newest runs first, without their step runs (each ``steps`` is empty).

        Args:
            program: only the runs of this program.
            limit: at most this many runs.
            status: only the runs in this status.
            since: only the runs created at or after this (timezone-aware) instant.
            id_prefix: only the runs whose id starts with this.

        Returns:
            The runs; :meth:`load_result` reads one with its step runs.

        .. versionadded:: 0.1
        """
        query = _RUN_SUMMARY.order_by(t.run.c.created.desc(), t.run.c.id.desc()).limit(limit)
        if program is not None:
            query = query.where(t.run.c.program_name == program)
        if status is not None:
            query = query.where(t.run.c.status == status.value)
        if since is not None:
            query = query.where(t.run.c.created >= since)
        if id_prefix is not None:
            query = query.where(t.run.c.id.startswith(id_prefix, autoescape=True))
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        if id_prefix is not None:  # sqlite's and MySQL's LIKE ignore case
            rows = [r for r in rows if r.id.startswith(id_prefix)]
        return [_run_summary(r) for r in rows]

    @retry_transient
    async def list_programs(self) -> list[ProgramSummary]:
        """Every program registered in the store, by name: its versions, and how many runs
        it has and how the newest went (two grouped reads).

        .. versionadded:: 0.1
        """
        program, run = t.program, t.run
        newest = program.alias("newest")
        latest_version = (
            sa.select(newest.c.version)
            .where(newest.c.name == program.c.name)
            .order_by(newest.c.created.desc(), newest.c.id.desc())
            .limit(1)
            .correlate(program)
            .scalar_subquery()
        )
        versions = (
            sa.select(
                program.c.name,
                sa.func.count(program.c.id).label("versions"),
                sa.func.max(program.c.created, type_=t.UTCDateTime()).label("registered"),
                latest_version.label("latest_version"),
            )
            .group_by(program.c.name)
            .order_by(program.c.name)
        )
        # The newest run of each program: its creation is its program's latest (ties, in
        # the same microsecond, go to the greater id below).
        counts = (
            sa.select(
                run.c.program_name,
                sa.func.count(run.c.id).label("runs"),
                sa.func.max(run.c.created, type_=t.UTCDateTime()).label("last_created"),
            )
            .group_by(run.c.program_name)
            .subquery()
        )
        runs = sa.select(
            counts.c.program_name, counts.c.runs, run.c.id, run.c.status, run.c.created
        ).join(
            run,
            sa.and_(
                run.c.program_name == counts.c.program_name,
                run.c.created == counts.c.last_created,
            ),
        )
        async with self.reading() as conn:
            programs = (await conn.execute(versions)).all()
            newest_runs: dict[str, Any] = {}
            for r in (await conn.execute(runs)).all():
                seen = newest_runs.get(r.program_name)
                if seen is None or r.id > seen.id:
                    newest_runs[r.program_name] = r
        return [
            ProgramSummary(
                name=p.name,
                versions=int(p.versions),
                latest_version=p.latest_version,
                registered=p.registered,
                runs=0 if (last := newest_runs.get(p.name)) is None else int(last.runs),
                last_run_id=None if last is None else last.id,
                last_status=None if last is None else RunStatus(last.status),
                last_run=None if last is None else last.created,
            )
            for p in programs
        ]

    @retry_transient
    async def ended_runs(
        self, *, before: datetime, program: str | None = None, limit: int = 500, offset: int = 0
    ) -> list[RunResult]:
        """Runs that ended (success, failure, cancelled) before ``before``, oldest first.

        Without their step runs (each ``steps`` is empty); for ``aeventor cleanup``.

        .. versionadded:: 0.1
        """
        query = (
            _RUN_SUMMARY.where(
                t.run.c.status.in_([s.value for s in _ENDED]),
                t.run.c.ended.is_not(None),
                t.run.c.ended < before,
            )
            .order_by(t.run.c.ended, t.run.c.id)
            .limit(limit)
            .offset(offset)
        )
        if program is not None:
            query = query.where(t.run.c.program_name == program)
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        return [_run_summary(r) for r in rows]

    @retry_transient
    async def delete_runs(self, run_ids: Collection[str]) -> list[str]:
        """Delete these runs with their step runs, triggers, delays, slots and own pools, in
        one transaction.

        Only runs that have ended are deleted: one still running (or running again) is
        left alone. Returns the ids deleted.

        .. versionadded:: 0.1
        """
        ids = list(run_ids)
        if not ids:
            return []
        ended = [s.value for s in _ENDED]
        async with self.transaction() as conn:
            rows = (
                await conn.execute(
                    sa.select(t.run.c.id)
                    .where(t.run.c.id.in_(ids), t.run.c.status.in_(ended))
                    .with_for_update()  # a run resumed meanwhile waits, then is kept
                )
            ).all()
            gone = [r.id for r in rows]
            if gone:
                await conn.execute(t.step_run.delete().where(t.step_run.c.run_id.in_(gone)))
                await conn.execute(t.trigger.delete().where(t.trigger.c.run_id.in_(gone)))
                await conn.execute(t.delay.delete().where(t.delay.c.run_id.in_(gone)))
                await conn.execute(t.slot.delete().where(t.slot.c.run_id.in_(gone)))
                await conn.execute(t.pool.delete().where(t.pool.c.run_id.in_(gone)))
                await conn.execute(
                    t.run.delete().where(t.run.c.id.in_(gone), t.run.c.status.in_(ended))
                )
        return gone

    @retry_transient
    async def stored_program(self, program_id: int) -> StoredProgram:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        t.program.c.name,
                        t.program.c.version,
                        t.program.c.definition,
                        t.program.c.signature,
                    ).where(t.program.c.id == program_id)
                )
            ).one_or_none()
        if row is None:
            raise NoResult(f"no program with id {program_id} in {self!r}")
        return StoredProgram(program_id, row.name, row.version, row.definition, row.signature)


@dataclasses.dataclass(frozen=True, slots=True)
class _ClaimStatements:
    """A claim's statements: the candidates, locked (what MySQL reads first), and the
    update that takes them."""

    pick: Any
    take: Any


@dataclasses.dataclass(slots=True)
class _Facts:
    """What one transaction knows of the events fired in a run's sequence."""

    #: The events whose state it knows.
    known: set[str] = dataclasses.field(default_factory=set)
    #: Those of them that fired (and the events it fired itself).
    fired: set[str] = dataclasses.field(default_factory=set)
    #: The groups of events (:meth:`Graph.fact_groups`) it read.
    groups: set[frozenset[str]] = dataclasses.field(default_factory=set)
    #: The fired events whose rows it wrote already (:meth:`SqlTx.fire_new`).
    written: set[str] = dataclasses.field(default_factory=set)
    #: Whether it read every event the sequence fired (then ``fired`` is all there is).
    whole: bool = False


class _Flushing:
    """A transaction's connection that first writes the rows the transaction deferred."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlTx) -> None:
        self._tx = tx

    @property
    def dialect(self) -> sa.Dialect:
        return self._tx._conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        await self._tx.flush()
        return await self._tx._conn.execute(statement, parameters)


class SqlTx:
    """:class:`~aeventor.dispatch.store.StoreTx` on one SQLAlchemy connection."""

    def __init__(self, db: Database, conn: AsyncConnection, *, retried: bool = False) -> None:
        self.db = db
        self._conn = conn
        #: The connection, writing the deferred rows before any other statement.
        self.conn = _Flushing(self)
        #: Trigger rows written at the next statement or at commit (:meth:`flush`): a group
        #: commit's steps each fire their events, in one INSERT.
        self._triggers: list[dict[str, Any]] = []
        self.claims_on_insert = db.claims_on_insert_in(conn, retried=retried)
        self.retried = retried
        self.earliest_delay: float | None = None
        #: run id -> queues to NOTIFY at commit
        self.notifications: dict[str, set[str | None]] = {}
        #: run id -> queues to wake in this process too, after commit
        self.here: dict[str, set[str | None]] = {}
        #: The runs this transaction locked, as it read them.
        self._locked: dict[str, RunLock] = {}
        #: (run, sequence, recovery) -> what this transaction knows of its fired events.
        self._facts: dict[tuple[str, str, int], _Facts] = {}
        #: Pools a step's ``releases`` gave run-kept slots back to (release_slots reports
        #: them with the rest).
        self.freed_by_hand_over: set[str] = set()

    async def lock_run(self, run_id: str) -> RunLock:
        # Locked once per transaction: the lock holds until commit, and what this
        # transaction changes of the row (stop_run, end_run, resume_run, set_controller)
        # forgets what it read.
        known = self._locked.get(run_id)
        if known is not None:
            return known
        row = (await self.conn.execute(_LOCK_RUN, {"run_id": run_id})).one_or_none()
        if row is None:
            raise NoResult(f"no run {run_id!r} in {self.db!r}")
        self._locked[run_id] = locked = _run_lock(row)
        return locked

    async def insert_run(
        self,
        *,
        run_id: str,
        program_id: int,
        program_name: str,
        mode: str,
        submitted_by: str | None,
        signature: str | None,
        controller: str | None = None,
        log_dir: str | None = None,
    ) -> None:
        await self.conn.execute(
            t.run.insert().values(
                id=run_id,
                program_id=program_id,
                program_name=program_name,
                status=RunStatus.running.value,
                stopped=False,
                recovery=0,
                created=t.utcnow(),
                mode=mode,
                submitted_by=submitted_by,
                signature=signature,
                controller=controller,
                log_dir=log_dir,
            )
        )

    async def end_steps(self, ends: Sequence[StepEnd]) -> set[int]:
        if not ends:
            return set()
        if len(ends) == 1:
            # One row: its conditional UPDATE locks it and says whether it was ours.
            (end,) = ends
            ended = await self.end_step(
                end.claim_id,
                token=end.token,
                status=end.status,
                result=end.result,
                error=end.error,
            )
            return {end.claim_id} if ended else set()
        # Read under lock what end_step's WHERE would check, then end what is ours in one
        # UPDATE per distinct outcome (most steps of a batch end alike) and the rest in
        # one executemany: a group commit of n steps is a few statements, not n.
        state = await _lock_step_runs(self.conn, {end.claim_id for end in ends}, read=True)
        active = StepStatus.active.value
        held = [end for end in ends if state.get(end.claim_id) == (active, end.token)]
        alike: dict[tuple[str, str | None, str | None], list[int]] = {}
        for end in held:
            alike.setdefault((end.status.value, end.result, end.error), []).append(end.claim_id)
        now = t.utcnow()
        single: list[dict[str, Any]] = []
        for (status, result, error), ids in alike.items():
            values = {"new_status": status, "new_result": result, "new_error": error, "now": now}
            if len(ids) == 1:
                single.append({"claim_id": ids[0], **values})
            else:
                await self.conn.execute(_END_STEPS, {"claim_ids": ids, **values})
        if single:
            await self.conn.execute(_END_STEP_LOCKED, single)
        return {end.claim_id for end in held}

    async def end_step(
        self,
        claim_id: int,
        *,
        token: str | None,
        status: StepStatus,
        result: str | None,
        error: str | None,
        only_if_lapsed: bool = False,
    ) -> bool:
        statement = _END_STEP
        if only_if_lapsed:
            statement = statement.where(t.step_run.c.lease_until < self.db.server_now())
        updated = await self.conn.execute(
            statement,
            {
                "claim_id": claim_id,
                "held_token": token,
                "new_status": status.value,
                "new_result": result,
                "new_error": error,
                "now": t.utcnow(),
            },
        )
        return bool(updated.rowcount == 1)

    async def end_step_locking_run(
        self,
        run_id: str,
        claim_id: int,
        *,
        token: str | None,
        status: StepStatus,
        result: str | None,
        error: str | None,
    ) -> RunLock | None:
        if not self.db.ends_locking_run or run_id in self._locked:
            return None
        row = (
            await self.conn.execute(
                _END_STEP_LOCKING_RUN,
                {
                    "lock_run": run_id,
                    "claim_id": claim_id,
                    "held_token": token,
                    "new_status": status.value,
                    "new_result": result,
                    "new_error": error,
                    "now": t.utcnow(),
                },
            )
        ).one_or_none()
        if row is None:
            return None
        self._locked[run_id] = locked = _run_lock(row)
        return locked

    async def requeue_step(
        self, claim_id: int, *, token: str | None, only_if_lapsed: bool = False
    ) -> bool:
        statement = _REQUEUE_STEP
        if only_if_lapsed:
            statement = statement.where(t.step_run.c.lease_until < self.db.server_now())
        updated = await self.conn.execute(statement, {"claim_id": claim_id, "held_token": token})
        return bool(updated.rowcount == 1)

    async def step_state(self, step_run_id: int) -> tuple[StepStatus, str | None] | None:
        row = (
            await self.conn.execute(
                sa.select(t.step_run.c.status, t.step_run.c.token).where(
                    t.step_run.c.id == step_run_id
                )
            )
        ).one_or_none()
        return None if row is None else (StepStatus(row.status), row.token)

    async def claimed(self, *, worker: str, token: str) -> list[Claim]:
        rows = await self.conn.execute(
            _ACTIVE_CLAIMS.where(t.step_run.c.worker == worker, t.step_run.c.token == token)
        )
        return sorted((Claim.from_row(r) for r in rows), key=lambda claim: claim.id)

    async def claim_ready(self, take: Taker) -> list[Claim]:
        return await self.db._take_ready(
            self.conn,
            worker=take.worker,
            limit=take.budget,
            run_id=take.run_id,
            hosts=None if take.hosts is None else [h for h in take.hosts if h is not None],
            lease=take.lease,
            token=take.token,
        )

    async def set_pid(self, step_run_id: int, pid: int, *, token: str | None) -> bool:
        updated = await self.conn.execute(
            t.step_run.update().where(*_HELD).values(pid=pid),
            {"claim_id": step_run_id, "held_token": token},
        )
        return bool(updated.rowcount == 1)

    async def fired(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        groups: Iterable[AbstractSet[str]],
    ) -> AbstractSet[str]:
        # Known for the rest of the transaction: whoever fires an event of a run holds the
        # run's lock, which this transaction took before asking. A group commit's
        # completions then read an AND of many events once, not once each; and a group
        # read before (the same set object: Graph.fact_groups shares them) costs a lookup.
        facts = self._facts_of(run_id, sequence, recovery)
        if facts.whole:
            return facts.fired
        unknown: set[str] = set()
        for group in groups:
            if group not in facts.groups:
                facts.groups.add(frozenset(group))
                unknown |= group - facts.known
        if not unknown:
            return facts.fired
        key = {"run_id": run_id, "sequence": sequence, "recovery": recovery}
        if len(unknown) > FIRED_IN_LIMIT:
            # A join of many events: every event the sequence fired, in one plain read,
            # rather than a statement with thousands of parameters (one prepared statement
            # per size, each planned anew). Then nothing about the sequence is unknown.
            rows = await self._conn.execute(_FIRED_ALL, key)
            facts.whole = True
        else:
            # Deferred trigger rows are known already: none of them is asked for here.
            rows = await self._conn.execute(_FIRED, {**key, "events": sorted(unknown)})
        facts.fired.update(r.event for r in rows)
        facts.known |= unknown
        return facts.fired

    async def fire_new(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> AbstractSet[str] | None:
        if not self.db.fires_on_insert:
            return None
        facts = self._facts_of(run_id, sequence, recovery)
        before = {e for e in events if e in facts.fired}
        new = [e for e in dict.fromkeys(events) if e not in facts.fired]
        if new:
            now = t.utcnow()
            rows = await self.conn.execute(
                self.db._reused(
                    "fire new",
                    lambda: self.db._insert_ignore(t.trigger).returning(t.trigger.c.event),
                ),
                _trigger_rows(run_id, sequence, recovery, new, now),
            )
            # A row that was there already did not come back: that event had fired.
            before.update(set(new) - {row.event for row in rows})
            facts.known.update(new)
            facts.fired.update(new)
            facts.written.update(new)
        return before

    async def add_triggers(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> None:
        # What fired is known to this transaction at once (fired() answers from it); the
        # rows are written before its next statement, or at commit.
        facts = self._facts_of(run_id, sequence, recovery)
        facts.known.update(events)
        facts.fired.update(events)
        now = t.utcnow()
        self._triggers.extend(
            _trigger_rows(
                run_id, sequence, recovery, [e for e in events if e not in facts.written], now
            )
        )

    async def flush(self) -> None:
        """Write the deferred rows (the store calls it before commit)."""
        if self._triggers:
            rows, self._triggers = self._triggers, []
            insert = self.db._reused("add triggers", lambda: self.db._insert_ignore(t.trigger))
            await self._conn.execute(insert, rows)

    def _facts_of(self, run_id: str, sequence: str, recovery: int) -> _Facts:
        """What this transaction knows of the events fired in a run's sequence."""
        facts = self._facts.get((run_id, sequence, recovery))
        if facts is None:
            facts = self._facts[(run_id, sequence, recovery)] = _Facts()
        return facts

    async def add_step_runs(self, rows: Sequence[NewStepRun]) -> None:
        now = t.utcnow()
        # A few hundred rows per statement: a wide fan-out's step runs are never all held
        # at once as parameter dicts (ours, then the driver's compiled ones).
        now_rows = [r for r in rows if r.delay is None]
        for start in range(0, len(now_rows), ROWS_PER_INSERT):
            await self.conn.execute(
                self.db._insert_ignore(t.step_run),
                [_step_row(r, now) for r in now_rows[start : start + ROWS_PER_INSERT]],
            )
        for row in rows:
            if row.delay is not None:
                # Due on the server's clock, as leases are.
                await self.conn.execute(
                    self.db._insert_ignore(t.step_run).values(
                        not_before=self.db.server_now_plus(timedelta(seconds=row.delay))
                    ),
                    [_step_row(row, now)],
                )
        needy = [row for row in rows if row.needs]
        if needy:
            await self._add_slots(needy, now)

    async def _add_slots(self, rows: Sequence[NewStepRun], now: datetime) -> None:
        """The slots the new ``rows`` wait for (their pools' rows made if new)."""
        keys = {r.key for row in rows for r in row.needs}
        await self.conn.execute(
            self.db._insert_ignore(t.pool),
            [
                {"name": key, "run_id": rows[0].run_id if run_scoped(key) else None, "created": now}
                for key in sorted(keys)
            ],
        )
        c = t.step_run.c
        found = await self.conn.execute(
            sa.select(c.id, c.step, c.sequence, c.recovery, c.attempt).where(
                c.run_id == rows[0].run_id,
                sa.tuple_(c.step, c.sequence, c.recovery, c.attempt).in_(
                    [(r.step, r.sequence, r.recovery, r.attempt) for r in rows]
                ),
            )
        )
        ids = {(r.step, r.sequence, r.recovery, r.attempt): r.id for r in found}
        # A retried transaction's first attempt may have made them already.
        have = set(
            (
                await self.conn.execute(
                    sa.select(t.slot.c.step_run_id).where(t.slot.c.step_run_id.in_(ids.values()))
                )
            ).scalars()
        )
        values = [
            {
                "pool": need.key,
                "run_id": row.run_id,
                "step_run_id": step_run_id,
                "slots": need.slots,
                "size": need.size,
                "priority": row.priority,
                "held": False,
                "created": now,
            }
            for row in rows
            if (step_run_id := ids[(row.step, row.sequence, row.recovery, row.attempt)]) not in have
            for need in row.needs
        ]
        if values:
            await self.conn.execute(t.slot.insert(), values)

    async def slot_waiters(self, keys: Sequence[str]) -> tuple[dict[str, int], list[Waiter]]:
        slot, step_run = t.slot, t.step_run

        def waiting_on(pools: Sequence[str]) -> sa.ColumnElement[bool]:
            """The slot belongs to a step run waiting for one of ``pools``."""
            return slot.c.step_run_id.in_(
                sa.select(slot.c.step_run_id).where(slot.c.pool.in_(pools), slot.c.held.is_(False))
            )

        extra = (
            await self.conn.execute(
                sa.select(slot.c.pool).distinct().where(waiting_on(keys), slot.c.held.is_(False))
            )
        ).scalars()
        pools = sorted(set(keys) | set(extra))
        # The pools' locks, in one order for every transaction: whoever counts a pool's
        # slots holds its row until commit, so two never admit into the same room.
        await self.conn.execute(
            sa.select(t.pool.c.name)
            .where(t.pool.c.name.in_(pools))
            .order_by(t.pool.c.name)
            .with_for_update()
        )
        now = self.db.server_now()
        worker_alive = _worker_alive(now)
        # A holder whose lease and whose worker's lease both lapsed holds nothing: its
        # worker died (the reaper records it lost; until then its slots are free).
        lapsed = sa.and_(
            step_run.c.status == StepStatus.active.value,
            step_run.c.lease_until < now,
            ~worker_alive,
        )
        held_rows = await self.conn.execute(
            sa.select(slot.c.pool, sa.func.sum(slot.c.slots))
            .select_from(slot.outerjoin(step_run, step_run.c.id == slot.c.step_run_id))
            .where(
                slot.c.pool.in_(pools),
                slot.c.held.is_(True),
                sa.or_(slot.c.step_run_id.is_(None), ~lapsed),
            )
            .group_by(slot.c.pool)
        )
        held = {row[0]: int(row[1]) for row in held_rows}
        wanted = await self.conn.execute(
            sa.select(slot.c.step_run_id, slot.c.pool, slot.c.slots, slot.c.size)
            .select_from(slot.join(step_run, step_run.c.id == slot.c.step_run_id))
            .where(
                waiting_on(pools),
                slot.c.held.is_(False),
                step_run.c.status == StepStatus.waiting.value,
            )
            .order_by(slot.c.priority.desc(), slot.c.step_run_id, slot.c.pool)
        )
        return held, _waiters(wanted, set(pools))

    async def admit_step_runs(self, step_run_ids: Sequence[int]) -> list[tuple[str, str | None]]:
        ids = list(step_run_ids)
        await self.conn.execute(
            t.slot.update().where(t.slot.c.step_run_id.in_(ids)).values(held=True)
        )
        c = t.step_run.c
        await self.conn.execute(
            t.step_run.update()
            .where(c.id.in_(ids), c.status == StepStatus.waiting.value)
            .values(status=StepStatus.ready.value)
        )
        rows = await self.conn.execute(sa.select(c.run_id, c.queue).where(c.id.in_(ids)))
        return [(r.run_id, r.queue) for r in rows]

    async def waiting_pools(self, run_id: str | None) -> set[str]:
        query = sa.select(t.slot.c.pool).distinct().where(t.slot.c.held.is_(False))
        if run_id is not None:
            query = query.where(t.slot.c.run_id == run_id)
        return set((await self.conn.execute(query)).scalars())

    async def release_slots(self, run_id: str) -> set[str]:
        slot, step_run = t.slot, t.step_run
        status = (
            await self.conn.execute(sa.select(t.run.c.status).where(t.run.c.id == run_id))
        ).scalar_one()
        if status != RunStatus.running.value:
            query = sa.select(slot.c.id, slot.c.pool).where(slot.c.run_id == run_id)
        else:
            query = (
                sa.select(slot.c.id, slot.c.pool)
                .select_from(slot.join(step_run, step_run.c.id == slot.c.step_run_id))
                .where(
                    slot.c.run_id == run_id,
                    step_run.c.status.not_in([s.value for s in PENDING]),
                )
            )
        rows = (await self.conn.execute(query)).all()
        freed, self.freed_by_hand_over = self.freed_by_hand_over, set()
        if rows:
            await self.conn.execute(t.slot.delete().where(t.slot.c.id.in_([r.id for r in rows])))
        return freed | {r.pool for r in rows}

    async def hand_over_slots(
        self,
        run_id: str,
        step_run_id: int,
        *,
        keep: Mapping[str, int],
        release: Mapping[str, int],
    ) -> None:
        slot = t.slot
        for key, slots in keep.items():
            await self.conn.execute(
                slot.update()
                .where(slot.c.step_run_id == step_run_id, slot.c.pool == key, slot.c.held.is_(True))
                .values(step_run_id=None, slots=slots)
            )
        for key, slots in release.items():
            kept = await self.conn.execute(
                sa.select(slot.c.id, slot.c.slots)
                .where(slot.c.run_id == run_id, slot.c.pool == key, slot.c.step_run_id.is_(None))
                .order_by(slot.c.id)
            )
            for row in kept.all():
                if slots <= 0:
                    break
                if row.slots <= slots:
                    await self.conn.execute(slot.delete().where(slot.c.id == row.id))
                else:
                    await self.conn.execute(
                        slot.update().where(slot.c.id == row.id).values(slots=row.slots - slots)
                    )
                slots -= row.slots
            self.freed_by_hand_over.add(key)

    async def add_claimed_step_runs(
        self, rows: Sequence[NewStepRun], *, worker: str, lease: timedelta, token: str
    ) -> list[Claim]:
        now = t.utcnow()
        values = [
            _step_row(r, now) | {"worker": worker, "started": now, "token": token} for r in rows
        ]
        for row in values:
            del row["lease_until"]  # set by the statement, on the server's clock
        statement = self.db._reused(
            ("insert claimed", lease),
            lambda: (
                self.db._insert_claimed(t.step_run)
                .values(lease_until=self.db.server_now_plus(lease))
                .returning(*_CLAIM_COLUMNS)
            ),
            clock=True,
        )
        inserted = await self.conn.execute(statement, values)
        return [Claim.from_row(r) for r in inserted.all()]

    async def pending(self, run_id: str, *, delays: bool = True) -> int:
        params = {"run_id": run_id}
        if (await self.conn.execute(_PENDING, params)).first() is not None:
            return 1
        if not delays:
            return 0
        return int((await self.conn.execute(_PENDING_DELAYS, params)).first() is not None)

    async def add_delays(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        delays: Sequence[tuple[str, str, str, float]],
    ) -> None:
        now = t.utcnow()
        for event, kind, target, seconds in delays:
            await self.conn.execute(
                self.db._insert_ignore(t.delay).values(
                    run_id=run_id,
                    sequence=sequence,
                    recovery=recovery,
                    event=event,
                    kind=kind,
                    target=target,
                    due=self.db.server_now_plus(timedelta(seconds=seconds)),
                    created=now,
                )
            )
            if self.earliest_delay is None or seconds < self.earliest_delay:
                self.earliest_delay = seconds

    async def take_delay(self, delay_id: int) -> bool:
        updated = await self.conn.execute(
            t.delay.update()
            .where(t.delay.c.id == delay_id, t.delay.c.done.is_(None))
            .values(done=t.utcnow())
        )
        return bool(updated.rowcount == 1)

    async def stop_run(self, run_id: str, reason: str | None) -> None:
        self._locked.pop(run_id, None)
        values: dict[str, Any] = {"stopped": True}
        if reason is not None:
            values["reason"] = reason
        await self.conn.execute(t.run.update().where(t.run.c.id == run_id).values(**values))
        await self.conn.execute(
            t.step_run.update()
            .where(
                t.step_run.c.run_id == run_id,
                t.step_run.c.status.in_([StepStatus.ready.value, StepStatus.waiting.value]),
            )
            .values(status=StepStatus.skipped.value, ended=t.utcnow())
        )

    async def end_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        self._locked.pop(run_id, None)
        values: dict[str, Any] = {"status": status.value, "ended": t.utcnow()}
        if reason is not None:
            values["reason"] = reason
        await self.conn.execute(
            t.run.update()
            .where(t.run.c.id == run_id, t.run.c.status == RunStatus.running.value)
            .values(**values)
        )

    async def cancel_step_runs(self, run_id: str) -> None:
        await self.conn.execute(
            t.step_run.update()
            .where(
                t.step_run.c.run_id == run_id,
                t.step_run.c.status.in_([s.value for s in PENDING]),
            )
            .values(status=StepStatus.cancelled.value, ended=t.utcnow(), lease_until=None)
        )

    async def pending_step_run(
        self, run_id: str, step: str, sequence: str
    ) -> tuple[int, int] | None:
        c = t.step_run.c
        row = (
            await self.conn.execute(
                sa.select(c.id, c.recovery)
                .where(
                    c.run_id == run_id,
                    c.step == step,
                    c.sequence == sequence,
                    c.status.in_([s.value for s in PENDING]),
                )
                .order_by(c.id.desc())
                .limit(1)
            )
        ).one_or_none()
        return None if row is None else (int(row.id), int(row.recovery))

    async def cancel_step_run(self, step_run_id: int, error: str) -> bool:
        c = t.step_run.c
        updated = await self.conn.execute(
            t.step_run.update()
            .where(c.id == step_run_id, c.status.in_([s.value for s in PENDING]))
            .values(
                status=StepStatus.cancelled.value,
                error=error,
                ended=t.utcnow(),
                lease_until=None,
                token=None,
            )
        )
        return bool(updated.rowcount == 1)

    async def set_controller(self, run_id: str, controller: str) -> None:
        self._locked.pop(run_id, None)
        await self.conn.execute(
            t.run.update().where(t.run.c.id == run_id).values(controller=controller)
        )

    async def holders(self, run_id: str) -> set[str]:
        rows = await self.conn.execute(
            sa.select(t.step_run.c.worker)
            .distinct()
            .where(
                t.step_run.c.run_id == run_id,
                t.step_run.c.status == StepStatus.active.value,
                t.step_run.c.worker.is_not(None),
            )
        )
        return {r.worker for r in rows}

    async def supersede_step_runs(self, run_id: str, error: str) -> int:
        closed = 0
        for status, new, why in (
            (StepStatus.active, StepStatus.lost, error),
            (StepStatus.ready, StepStatus.cancelled, None),
            (StepStatus.waiting, StepStatus.cancelled, None),
        ):
            updated = await self.conn.execute(
                t.step_run.update()
                .where(t.step_run.c.run_id == run_id, t.step_run.c.status == status.value)
                .values(status=new.value, error=why, ended=t.utcnow(), lease_until=None, token=None)
            )
            closed += updated.rowcount
        return closed

    async def step_run_states(self, run_id: str) -> list[StepRunState]:
        c = t.step_run.c
        rows = await self.conn.execute(
            sa.select(c.id, c.step, c.sequence, c.recovery, c.attempt, c.status, c.worker)
            .where(c.run_id == run_id)
            .order_by(c.id)
        )
        return [
            StepRunState(
                r.id, r.step, r.sequence, r.recovery, r.attempt, StepStatus(r.status), r.worker
            )
            for r in rows
        ]

    async def fired_in(self, run_id: str, recovery: int) -> list[tuple[str, str]]:
        c = t.trigger.c
        rows = await self.conn.execute(
            sa.select(c.sequence, c.event)
            .where(c.run_id == run_id, c.recovery == recovery)
            .order_by(c.id)
        )
        return [(r.sequence, r.event) for r in rows]

    async def earlier_outcomes(
        self, run_id: str, sequence: str, recovery: int, steps: Sequence[str]
    ) -> dict[str, StepStatus]:
        c = t.step_run.c
        rows = await self.conn.execute(
            sa.select(c.step, c.status)
            .where(
                c.run_id == run_id,
                c.sequence == sequence,
                c.recovery < recovery,
                c.step.in_(list(steps)),
            )
            .order_by(c.recovery, c.attempt)
        )
        return {r.step: StepStatus(r.status) for r in rows}  # the latest wins

    async def resume_run(
        self,
        run_id: str,
        *,
        recovery: int,
        replay: str,
        controller: str | None,
        program: tuple[int, str | None] | None = None,
    ) -> None:
        self._locked.pop(run_id, None)
        values: dict[str, Any] = {
            "status": RunStatus.running.value,
            "stopped": False,
            "reason": None,
            "ended": None,
            "recovery": recovery,
            "replay": replay,
            "controller": controller,
        }
        if program is not None:
            values["program_id"], values["signature"] = program
        await self.conn.execute(t.run.update().where(t.run.c.id == run_id).values(**values))

    def notify(
        self, run_id: str, queues: Collection[str | None] = (), *, here: bool = False
    ) -> None:
        self.notifications.setdefault(run_id, set()).update(queues)
        if here:
            self.here.setdefault(run_id, set()).update(queues)


def _worker_alive(now: sa.ColumnElement[datetime]) -> sa.Exists:
    """Whether a step run's worker is alive: not stopped, its lease not lapsed at ``now``
    (the server's clock)."""
    agent = t.agent
    return (
        sa.exists()
        .where(
            agent.c.id == t.step_run.c.worker,
            agent.c.stopped.is_(None),
            agent.c.lease_until >= now,
        )
        .correlate(t.step_run)
    )


def _trigger_rows(
    run_id: str, sequence: str, recovery: int, events: Iterable[str], now: datetime
) -> list[dict[str, Any]]:
    """The trigger rows of ``events`` fired in a run's sequence."""
    return [
        {"run_id": run_id, "event": e, "sequence": sequence, "recovery": recovery, "created": now}
        for e in events
    ]


def _run_lock(row: Any) -> RunLock:
    """A row of :data:`_RUN_LOCK_COLUMNS` as a :class:`RunLock`."""
    return RunLock(
        RunStatus(row.status),
        bool(row.stopped),
        int(row.recovery),
        row.mode,
        row.replay,
        row.controller,
    )


async def _lock_step_runs(
    conn: AsyncConnection | _Flushing, ids: Collection[int], *, read: bool = False
) -> dict[int, tuple[str, str | None]]:
    """Lock step runs in id order (sqlite: its write lock covers them); with ``read``, their
    status and token by id (read on sqlite too)."""
    locks = conn.dialect.name != "sqlite"
    if not ids or not (locks or read):
        return {}
    statement = (
        sa.select(t.step_run.c.id, t.step_run.c.status, t.step_run.c.token)
        .where(t.step_run.c.id.in_(sorted(ids)))
        .order_by(t.step_run.c.id)
    )
    rows = await conn.execute(statement.with_for_update() if locks else statement)
    return {int(row.id): (row.status, row.token) for row in rows}


def _waiters(rows: Iterable[Any], locked: set[str]) -> list[Waiter]:
    """Slot rows (ordered by priority, step run) grouped per waiting step run."""
    needs: dict[int, dict[str, tuple[int, int]]] = {}
    for row in rows:
        needs.setdefault(int(row.step_run_id), {})[row.pool] = (int(row.slots), int(row.size))
    return [
        Waiter(step_run_id, wanted, complete=locked.issuperset(wanted))
        for step_run_id, wanted in needs.items()
    ]


def _revoked(
    held: Mapping[int, str | None], worker: str, rows: Sequence[Any]
) -> dict[int, StepStatus]:
    """Which held step runs are no longer the worker's (a deleted one counts as cancelled)."""
    revoked = dict.fromkeys(held, StepStatus.cancelled)
    for row in rows:
        try:
            status = StepStatus(row.status)
        except ValueError:  # a status nobody wrote: not ours to run either
            continue
        ours = row.worker == worker and row.token == held[row.id]
        if ours and status in _OWN_STATUSES:
            # Still ours, or ended by our own completion (which raced this beat).
            del revoked[row.id]
        else:
            revoked[row.id] = status
    return revoked


#: The statuses a held step run can have while its claim is still the holder's: active, or
#: ended by the holder itself.
_OWN_STATUSES = frozenset({StepStatus.active, StepStatus.success, StepStatus.failure})


def _step_row(row: NewStepRun, now: datetime) -> dict[str, Any]:
    ended = now if row.status in (StepStatus.skipped, StepStatus.cancelled) else None
    return {
        "run_id": row.run_id,
        "step": row.step,
        "sequence": row.sequence,
        "recovery": row.recovery,
        "attempt": row.attempt,
        "status": row.status.value,
        "host": row.host,
        "queue": row.queue,
        "mac": row.mac,
        "worker": None,
        "started": None,
        "lease_until": None,
        "created": now,
        "ended": ended,
    }


async def migrations_module() -> Any:
    """The migrations package, imported off the loop the first time (Alembic's import reads
    its plugins' entry points from disk)."""
    return await asyncio.to_thread(importlib.import_module, f"{__package__}.migrations")
