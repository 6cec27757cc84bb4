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
import json
import random
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...dispatch._state import PENDING, Graph, final_run_status
from ...exceptions import ConnectionLost, DatabaseError, NoResult, UniqueViolation
from ...program.model import ProgramDef, RunStatus, StepStatus
from ...records import RunResult, StepRun
from ...utils import backoff_delay
from . import schema as t

__all__ = ("Advance", "Claim", "Database", "Notifier", "Taker", "retry_on_disconnect")

log = structlog.get_logger("aeventor.store")

_T = TypeVar("_T")
_P = ParamSpec("_P")


def retry_on_disconnect(
    method: Callable[Concatenate[Database, _P], Awaitable[_T]],
) -> Callable[Concatenate[Database, _P], Awaitable[_T]]:
    """Retry a store operation while the server is unreachable, up to ``reconnect_deadline``.

    Every operation is one transaction whose writes are conditional (a step run is completed
    only while active, a trigger inserted only once), so running it again after a lost
    connection cannot apply it twice. Delays grow exponentially with full jitter and a cap.
    """

    @functools.wraps(method)
    async def wrapper(self: Database, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        attempt = 0
        deadline = self.clock() + self.reconnect_deadline
        while True:
            # Run each attempt to its end even when the caller is cancelled: a transaction
            # cut off mid-statement would leave its connection (and sqlite's write lock)
            # behind. The caller's cancellation is re-raised once the attempt is over.
            operation = asyncio.ensure_future(method(self, *args, **kwargs))
            try:
                try:
                    return await asyncio.shield(operation)
                except asyncio.CancelledError:
                    await asyncio.wait([operation])
                    raise
            except ConnectionLost as exc:
                if self.clock() >= deadline:
                    raise
                delay = backoff_delay(
                    attempt, initial=0.05, maximum=RECONNECT_MAX_DELAY, rand=random.random
                )
                attempt += 1
                log.warning(
                    "store unreachable; retrying",
                    operation=method.__name__,
                    attempt=attempt,
                    delay=round(delay, 3),
                    error=str(exc),
                )
                await self.sleep(delay)

    return wrapper


RECONNECT_MAX_DELAY = 2.0

# Hot-path statements, built once: SQLAlchemy then only binds values (its compiled cache
# makes building them per call pay off little; constructing them is most of the cost).
_LOCK_RUN = (
    sa.select(t.run.c.status, t.run.c.stopped, t.run.c.recovery, t.run.c.mode)
    .where(t.run.c.id == sa.bindparam("run_id"))
    .with_for_update()
)
_FIRED = sa.select(t.trigger.c.event).where(
    t.trigger.c.run_id == sa.bindparam("run_id"),
    t.trigger.c.sequence == sa.bindparam("sequence"),
    t.trigger.c.recovery == sa.bindparam("recovery"),
    t.trigger.c.event.in_(sa.bindparam("events", expanding=True)),
)
_PENDING = (
    sa.select(sa.func.count())
    .select_from(t.step_run)
    .where(
        t.step_run.c.run_id == sa.bindparam("run_id"),
        t.step_run.c.status.in_([sa.literal(s.value, literal_execute=True) for s in PENDING]),
    )
)
_END_STEP = (
    t.step_run.update()
    .where(
        t.step_run.c.id == sa.bindparam("claim_id"),
        t.step_run.c.status == StepStatus.active.value,
    )
    .values(
        status=sa.bindparam("new_status"),
        result=sa.bindparam("new_result"),
        error=sa.bindparam("new_error"),
        ended=sa.bindparam("now"),
        lease_until=None,
    )
)

# The reaper's variant: only while the lease is still lapsed (its worker did not come back).
_END_LAPSED_STEP = _END_STEP.where(t.step_run.c.lease_until < sa.bindparam("now"))


@dataclass(slots=True)
class Taker:
    """Lets a transaction that makes step runs ready claim some of them at once.

    The dispatcher that completes a step usually runs the next one too; inserting that step
    run already active and leased to it saves a claim transaction and a wake-up per hop.

    Attributes:
        worker: who claims.
        budget: how many step runs it may still take.
        hosts: only step runs assigned to these hosts (None: any).
    """

    worker: str
    budget: int
    hosts: frozenset[str | None] | None = None
    lease: timedelta = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Claim:
    """A step run this process took: it is active and leased to us."""

    id: int
    run_id: str
    step: str
    sequence: str
    recovery: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Advance:
    """What a transaction changed, for the caller's wake-ups.

    Attributes:
        ready: how many step runs it made ready (and left for claimers).
        run_status: the run's status after it (running until the run ends).
        claims: step runs it made and claimed for the caller's :class:`Taker`.
    """

    ready: int
    run_status: RunStatus
    claims: tuple[Claim, ...] = ()


class Notifier:
    """Wake-ups from other processes (LISTEN/NOTIFY), keyed by run id or by queue.

    Changes made by this process wake its dispatchers directly (each transaction returns
    what it changed), so only a listener calls :meth:`notify` and :meth:`notify_queue`.
    A subscriber with key None hears every run. A queue subscriber (an agent) hears only
    the queues it takes work from: a queue is a host name, None the standalone queue.
    """

    def __init__(self) -> None:
        self._waiters: dict[str | None, set[asyncio.Event]] = {}
        self._queue_waiters: dict[str | None, set[asyncio.Event]] = {}
        #: Called with the queues that gain their first subscriber, so that a store that
        #: listens per queue starts listening there (Postgres: LISTEN on their channels).
        self.on_new_queues: Callable[[Sequence[str | None]], None] | None = None

    @contextmanager
    def subscribe(self, key: str | None = None) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        with self._registered(self._waiters, (key,), event):
            yield event

    @contextmanager
    def subscribe_queues(self, queues: Iterable[str | None]) -> Iterator[asyncio.Event]:
        """An event set when another process makes work ready in one of ``queues``.

        A store that must start listening for a new queue sets the event once it listens
        (the work made meanwhile is found by the rescan that wake-up causes).
        """
        unique = tuple(dict.fromkeys(queues))
        new = [queue for queue in unique if queue not in self._queue_waiters]
        event = asyncio.Event()
        with self._registered(self._queue_waiters, unique, event):
            if new and self.on_new_queues is not None:
                self.on_new_queues(new)
            yield event

    @contextmanager
    def _registered(
        self,
        table: dict[str | None, set[asyncio.Event]],
        keys: Sequence[str | None],
        event: asyncio.Event,
    ) -> Iterator[None]:
        for key in keys:
            table.setdefault(key, set()).add(event)
        try:
            yield
        finally:
            for key in keys:
                waiters = table.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del table[key]

    @property
    def queues(self) -> frozenset[str | None]:
        """The queues someone is subscribed to."""
        return frozenset(self._queue_waiters)

    def notify(self, key: str) -> None:
        """Wake the subscribers of ``key`` and those of every key."""
        for event in (*self._waiters.get(key, ()), *self._waiters.get(None, ())):
            event.set()

    def notify_queue(self, queue: str | None) -> None:
        """Wake the subscribers of ``queue``."""
        for event in self._queue_waiters.get(queue, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake everyone (after a reconnect, when notifications may have been missed)."""
        for table in (self._waiters, self._queue_waiters):
            for waiters in table.values():
                for event in waiters:
                    event.set()


class Database(abc.ABC):
    """A store reached through SQLAlchemy's async engine.

    Args:
        url: the SQLAlchemy URL (driver included); its password is never logged.
        poll_interval: seconds between polls for work made by other processes, or None
            when wake-ups always arrive (sqlite in one process, Postgres LISTEN).

    .. versionadded:: 0.1
    """

    #: Seconds between polls when the caller sets none (None: never poll).
    default_poll_interval: float | None = None

    #: Whether an insert that skips duplicates can report the rows it inserted (RETURNING),
    #: which claiming at insert time needs.
    claims_on_insert = True

    #: Seconds a store operation keeps retrying while the server is unreachable.
    reconnect_deadline: float = 120.0

    def __init__(self, *, url: URL, poll_interval: float | None = None) -> None:
        self.url = url
        # Injectable for tests of the back-off.
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.clock: Callable[[], float] = time.monotonic
        self.poll_interval = (
            poll_interval if poll_interval is not None else self.default_poll_interval
        )
        self.notifier = Notifier()
        self._engine: AsyncEngine | None = None

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
        upgrade = asyncio.ensure_future(self._ensure_schema())
        try:
            with self.wrap_exceptions():
                await asyncio.shield(upgrade)
        except BaseException:
            # Let a cancelled upgrade finish its transaction before the engine goes.
            await asyncio.wait([upgrade])
            await self.aclose()
            raise

    async def _ensure_schema(self) -> None:
        from .migrations import upgrade_to_head

        await upgrade_to_head(self.engine)

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

    @abc.abstractmethod
    def _insert_ignore(self, table: sa.Table) -> Any:
        """An INSERT that silently skips rows whose unique key exists."""

    async def _notify_work(  # noqa: B027
        self, conn: AsyncConnection, run_id: str, queues: Collection[str | None] = ()
    ) -> None:
        """Tell other processes, at commit, that ``run_id`` changed and that ``queues`` (the
        hosts whose ready step runs the transaction made; None: standalone) may have work.
        No-op by default."""

    @contextmanager
    def wrap_exceptions(self) -> Iterator[None]:
        """Translate SQLAlchemy and driver errors into aeventor errors, chained."""
        try:
            yield
        except IntegrityError as exc:
            raise UniqueViolation(
                f"duplicate row: {exc.orig}", constraint=self._constraint_name(exc)
            ) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated or self._is_disconnect(exc):
                raise ConnectionLost(f"lost the connection to {self!r}: {exc.orig}") from exc
            raise DatabaseError(f"{self!r}: {exc.orig}") from exc
        except OSError as exc:
            raise ConnectionLost(f"cannot reach {self!r}: {exc}") from exc
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{self!r}: {exc}") from exc

    def _is_disconnect(self, exc: DBAPIError) -> bool:
        return False

    def _constraint_name(self, exc: IntegrityError) -> str | None:
        return getattr(exc.orig, "constraint_name", None)

    # -- programs and runs --------------------------------------------------------------

    @retry_on_disconnect
    async def register_program(self, program: ProgramDef, *, signature: str | None = None) -> int:
        """Store a program definition (once per version) and return its id.

        A signature given for a version stored unsigned is added to it.
        """
        version = program.version
        async with self.transaction() as conn:
            await conn.execute(
                self._insert_ignore(t.program).values(
                    name=program.name,
                    version=version,
                    definition=program.canonical_json(),
                    created=t.utcnow(),
                    signature=signature,
                )
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

    @retry_on_disconnect
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

    @retry_on_disconnect
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

    @retry_on_disconnect
    async def create_run(
        self,
        graph: Graph,
        *,
        program_id: int,
        triggers: Sequence[tuple[str, str]],
        run_id: str | None = None,
        take: Taker | None = None,
        mode: str = "standalone",
        submitted_by: str | None = None,
        signature: str | None = None,
    ) -> tuple[str, Advance]:
        """Create a run and fire its initial ``(event, sequence)`` triggers, in one transaction.

        Args:
            mode: ``standalone`` (the calling process drives the run) or ``distributed``
                (step runs are queued for their hosts' agents).
            signature: the run's HMAC with the cluster key (distributed mode).
        """
        run_id = run_id or uuid.uuid4().hex
        async with self.transaction() as conn:
            await conn.execute(
                t.run.insert().values(
                    id=run_id,
                    program_id=program_id,
                    program_name=graph.program.name,
                    status=RunStatus.running.value,
                    stopped=False,
                    recovery=0,
                    created=t.utcnow(),
                    mode=mode,
                    submitted_by=submitted_by,
                    signature=signature,
                )
            )
            ready = 0
            claims: list[Claim] = []
            for sequence, events in _group_by_sequence(triggers).items():
                if take is not None:
                    take = dataclasses.replace(take, budget=take.budget - len(claims))
                more, taken = await self._fire(
                    conn,
                    graph,
                    run_id,
                    sequence,
                    0,
                    events,
                    False,
                    take,
                    distributed=mode == "distributed",
                )
                ready += more
                claims += taken
            status = await self._settle(conn, run_id, stopped=False)
            if ready:
                await self._notify_work(conn, run_id)
        return run_id, Advance(ready, status, tuple(claims))

    @retry_on_disconnect
    async def trigger(
        self,
        graph: Graph,
        *,
        run_id: str,
        event: str,
        sequence: str,
        take: Taker | None = None,
    ) -> Advance:
        """Fire ``event`` for ``sequence`` in a live run (idempotent)."""
        async with self.transaction() as conn:
            run = await self._lock_run(conn, run_id)
            if run.status != RunStatus.running.value:
                return Advance(0, RunStatus(run.status))
            ready, claims = await self._fire(
                conn,
                graph,
                run_id,
                sequence,
                run.recovery,
                [event],
                run.stopped,
                take,
                distributed=run.mode == "distributed",
            )
            if ready:
                await self._notify_work(conn, run_id)
        return Advance(ready, RunStatus.running, tuple(claims))

    async def _lock_run(self, conn: AsyncConnection, run_id: str) -> Any:
        row = (await conn.execute(_LOCK_RUN, {"run_id": run_id})).one_or_none()
        if row is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return row

    async def _fire(
        self,
        conn: AsyncConnection,
        graph: Graph,
        run_id: str,
        sequence: str,
        recovery: int,
        events: Iterable[str],
        stopped: bool,
        take: Taker | None = None,
        *,
        distributed: bool = False,
    ) -> tuple[int, list[Claim]]:
        """Fire events for one sequence.

        Returns how many step runs became ready for claimers, and those taken for ``take``.
        In a distributed run each step run is queued for its host's agents.
        """
        events = list(events)
        if not events:
            return 0, []
        needed = sorted(graph.facts_needed(events))
        fired = {
            r.event
            for r in await conn.execute(
                _FIRED,
                {"run_id": run_id, "sequence": sequence, "recovery": recovery, "events": needed},
            )
        }
        plan = graph.fire(fired, events)
        now = t.utcnow()
        if plan.events:
            await conn.execute(
                self._insert_ignore(t.trigger),
                [
                    {
                        "run_id": run_id,
                        "event": e,
                        "sequence": sequence,
                        "recovery": recovery,
                        "created": now,
                    }
                    for e in plan.events
                ],
            )
        if not plan.steps:
            return 0, []

        def row(step: str, status: StepStatus) -> dict[str, Any]:
            return {
                "run_id": run_id,
                "step": step,
                "sequence": sequence,
                "recovery": recovery,
                "attempt": 1,
                "status": status.value,
                "host": graph.program.steps[step].host,
                "queue": graph.program.steps[step].host if distributed else None,
                "worker": None,
                "started": None,
                "lease_until": None,
                "created": now,
                "ended": None,
            }

        if stopped:
            # A stopped run records the steps its events asked for, as skipped: nothing
            # that happened is lost, nothing new starts.
            rows = [row(s, StepStatus.skipped) | {"ended": now} for s in plan.steps]
            await conn.execute(self._insert_ignore(t.step_run), rows)
            return 0, []
        mine: list[str] = []
        rest: list[str] = []
        for step in plan.steps:
            if (
                take is not None
                and self.claims_on_insert
                and len(mine) < take.budget
                and (take.hosts is None or graph.program.steps[step].host in take.hosts)
            ):
                mine.append(step)
            else:
                rest.append(step)
        if rest:
            await conn.execute(
                self._insert_ignore(t.step_run), [row(s, StepStatus.ready) for s in rest]
            )
        claims: list[Claim] = []
        if mine:
            assert take is not None
            rows = [
                row(s, StepStatus.active)
                | {"worker": take.worker, "started": now, "lease_until": now + take.lease}
                for s in mine
            ]
            inserted = await conn.execute(
                self._insert_ignore(t.step_run).returning(t.step_run.c.id, t.step_run.c.step),
                rows,
            )
            claims = [Claim(r.id, run_id, r.step, sequence, recovery, 1) for r in inserted.all()]
        return len(rest), claims

    async def _settle(self, conn: AsyncConnection, run_id: str, *, stopped: bool) -> RunStatus:
        """End the run if nothing is ready or active any more; return its status."""
        pending = (await conn.execute(_PENDING, {"run_id": run_id})).scalar_one()
        status = final_run_status(pending=pending, stopped=stopped, cancelled=False)
        if status is not RunStatus.running:
            await conn.execute(
                t.run.update()
                .where(t.run.c.id == run_id, t.run.c.status == RunStatus.running.value)
                .values(status=status.value, ended=t.utcnow())
            )
            await self._notify_work(conn, run_id)
        return status

    # -- claiming and completing --------------------------------------------------------

    @retry_on_disconnect
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
        """
        if limit <= 0:
            return []
        step_run = t.step_run

        def is_ready() -> sa.ColumnElement[bool]:
            # Inline, not a bound parameter: a prepared statement's generic plan could not
            # use the partial index on status = 'ready' (a full scan at a million rows).
            return step_run.c.status == sa.literal(StepStatus.ready.value, literal_execute=True)

        def candidates(*columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
            query = sa.select(*columns).where(is_ready())
            if run_id is not None:
                query = query.where(step_run.c.run_id == run_id)
            if hosts is not None:
                query = query.where(step_run.c.queue.in_(list(hosts)))
            return query.order_by(step_run.c.id).limit(limit).with_for_update(skip_locked=True)

        now = t.utcnow()
        take = {
            "status": StepStatus.active.value,
            "worker": worker,
            "started": now,
            "lease_until": now + lease,
        }
        columns = (
            step_run.c.id,
            step_run.c.run_id,
            step_run.c.step,
            step_run.c.sequence,
            step_run.c.recovery,
            step_run.c.attempt,
        )
        async with self.transaction() as conn:
            if conn.dialect.update_returning:
                # Postgres and sqlite: one statement. Postgres locks the candidates in the
                # subquery (SKIP LOCKED passes over rows other claimers hold) and rechecks
                # status = 'ready' on the row's latest version; sqlite has no FOR UPDATE,
                # its write lock (BEGIN IMMEDIATE) serialises claimers.
                picked = candidates(step_run.c.id)
                # Postgres: "= ANY(ARRAY(subquery))", an InitPlan run once. With IN the
                # planner may make a semi join that re-runs the locking subquery for every
                # ready row of every run, and may then take more than ``limit`` rows.
                chosen = (
                    step_run.c.id == sa.any_(sa.func.array(picked.scalar_subquery()))
                    if conn.dialect.name == "postgresql"
                    else step_run.c.id.in_(picked)
                )
                taken = await conn.execute(
                    step_run.update().where(chosen, is_ready()).values(take).returning(*columns)
                )
                rows = sorted(taken.all(), key=lambda row: row.id)
            else:
                # MariaDB/MySQL: no UPDATE ... RETURNING, and no LIMIT in an IN subquery.
                # Lock the candidates, then take them all in one UPDATE.
                rows = list((await conn.execute(candidates(*columns))).all())
                if not rows:
                    return []
                ids = [row.id for row in rows]
                result = await conn.execute(
                    step_run.update().where(step_run.c.id.in_(ids), is_ready()).values(take)
                )
                if result.rowcount != len(ids):
                    # Not expected (this transaction holds the rows' locks), but never hand
                    # out a row that another claimer took: keep only those taken here.
                    mine = set(
                        (
                            await conn.execute(
                                sa.select(step_run.c.id).where(
                                    step_run.c.id.in_(ids),
                                    step_run.c.worker == worker,
                                    step_run.c.started == now,
                                )
                            )
                        ).scalars()
                    )
                    rows = [row for row in rows if row.id in mine]
        return [Claim(r.id, r.run_id, r.step, r.sequence, r.recovery, r.attempt) for r in rows]

    @retry_on_disconnect
    async def started(self, graph: Graph, claim: Claim, *, pid: int | None = None) -> Advance:
        """Record a claimed step's process and fire its ``active`` triggers.

        Returns how many step runs those triggers made ready (for the caller to claim).
        """
        events = graph.trigger_events(claim.step, StepStatus.active)
        ready = 0
        if not events and pid is None:
            return Advance(0, RunStatus.running)
        async with self.transaction() as conn:
            if pid is not None:
                await conn.execute(
                    t.step_run.update().where(t.step_run.c.id == claim.id).values(pid=pid)
                )
            if events:
                run = await self._lock_run(conn, claim.run_id)
                if run.status == RunStatus.running.value:
                    ready, _ = await self._fire(
                        conn,
                        graph,
                        claim.run_id,
                        claim.sequence,
                        claim.recovery,
                        events,
                        run.stopped,
                        distributed=run.mode == "distributed",
                    )
                    if ready:
                        await self._notify_work(conn, claim.run_id)
        return Advance(ready, RunStatus.running)

    @retry_on_disconnect
    async def complete(
        self,
        graph: Graph,
        claim: Claim,
        *,
        status: StepStatus,
        result: Any = None,
        error: str | None = None,
        take: Taker | None = None,
        only_if_lapsed: bool = False,
    ) -> Advance:
        """Record a step's end and everything it causes, in one transaction.

        Returns the number of step runs made ready, those claimed for ``take``, and the
        run's status afterwards. A step run that is no longer active (its run was cancelled
        meanwhile) is left as it is.
        """
        outcome = graph.step_outcome(claim.step, status)
        async with self.transaction() as conn:
            run = await self._lock_run(conn, claim.run_id)
            updated = await conn.execute(
                _END_LAPSED_STEP if only_if_lapsed else _END_STEP,
                {
                    "claim_id": claim.id,
                    "new_status": status.value,
                    "new_result": None if result is None else json.dumps(result),
                    "new_error": error,
                    "now": t.utcnow(),
                },
            )
            if updated.rowcount != 1 or run.status != RunStatus.running.value:
                return Advance(0, RunStatus(run.status))
            stopped = bool(run.stopped)
            if outcome.stop_run and not stopped:
                stopped = True
                await self._stop_run(
                    conn,
                    claim.run_id,
                    f"step {claim.step}[{claim.sequence}] failed and fires no failure trigger",
                )
            ready, claims = await self._fire(
                conn,
                graph,
                claim.run_id,
                claim.sequence,
                claim.recovery,
                outcome.events,
                stopped,
                take,
                distributed=run.mode == "distributed",
            )
            # A run that just gained step runs cannot have ended.
            run_status = (
                RunStatus.running
                if ready or claims
                else await self._settle(conn, claim.run_id, stopped=stopped)
            )
            if ready:
                await self._notify_work(conn, claim.run_id)
        return Advance(ready, run_status, tuple(claims))

    async def _stop_run(self, conn: AsyncConnection, run_id: str, reason: str) -> None:
        """Nothing new starts in the run: ready step runs are skipped, running ones finish."""
        await conn.execute(
            t.run.update().where(t.run.c.id == run_id).values(stopped=True, reason=reason)
        )
        await conn.execute(
            t.step_run.update()
            .where(
                t.step_run.c.run_id == run_id,
                t.step_run.c.status == StepStatus.ready.value,
            )
            .values(status=StepStatus.skipped.value, ended=t.utcnow())
        )

    @retry_on_disconnect
    async def fail_untrusted(self, claim: Claim, *, error: str) -> Advance:
        """Fail a step run whose program is not trusted, and stop its run.

        No trigger fires: the program that would say what a failure causes is the one that
        failed verification.
        """
        async with self.transaction() as conn:
            run = await self._lock_run(conn, claim.run_id)
            await conn.execute(
                _END_STEP,
                {
                    "claim_id": claim.id,
                    "new_status": StepStatus.failure.value,
                    "new_result": None,
                    "new_error": error,
                    "now": t.utcnow(),
                },
            )
            if run.status != RunStatus.running.value:
                return Advance(0, RunStatus(run.status))
            if not run.stopped:
                await self._stop_run(
                    conn, claim.run_id, f"step {claim.step}[{claim.sequence}]: {error}"
                )
            status = await self._settle(conn, claim.run_id, stopped=True)
        return Advance(0, status)

    @retry_on_disconnect
    async def cancel_run(self, run_id: str, *, reason: str) -> None:
        """Mark a run cancelled with its ready and active step runs (the caller kills those)."""
        async with self.transaction() as conn:
            run = await self._lock_run(conn, run_id)
            now = t.utcnow()
            await conn.execute(
                t.step_run.update()
                .where(
                    t.step_run.c.run_id == run_id,
                    t.step_run.c.status.in_([s.value for s in PENDING]),
                )
                .values(status=StepStatus.cancelled.value, ended=now, lease_until=None)
            )
            if run.status == RunStatus.running.value:
                await conn.execute(
                    t.run.update()
                    .where(t.run.c.id == run_id)
                    .values(status=RunStatus.cancelled.value, ended=now, reason=reason)
                )
            await self._notify_work(conn, run_id)

    # -- agents: heartbeats, leases, provenance ----------------------------------------

    @retry_on_disconnect
    async def agent_heartbeat(
        self, *, agent_id: str, hostname: str, pid: int, hosts: Sequence[str], lease: timedelta
    ) -> set[int]:
        """One batched beat: the agent's row, and the leases of all its active step runs.

        Returns the ids of this agent's step runs that were cancelled meanwhile, so the agent
        can terminate them.
        """
        now = t.utcnow()
        async with self.transaction() as conn:
            updated = await conn.execute(
                t.agent.update()
                .where(t.agent.c.id == agent_id)
                .values(heartbeat=now, hosts=json.dumps(list(hosts)), stopped=None)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    t.agent.insert().values(
                        id=agent_id,
                        hostname=hostname,
                        pid=pid,
                        hosts=json.dumps(list(hosts)),
                        started=now,
                        heartbeat=now,
                    )
                )
            await conn.execute(
                t.step_run.update()
                .where(
                    t.step_run.c.worker == agent_id,
                    t.step_run.c.status == StepStatus.active.value,
                )
                .values(lease_until=now + lease)
            )
            cancelled = await conn.execute(
                sa.select(t.step_run.c.id).where(
                    t.step_run.c.worker == agent_id,
                    t.step_run.c.status == StepStatus.cancelled.value,
                    t.step_run.c.ended >= now - 2 * lease,
                )
            )
            return {r.id for r in cancelled}

    @retry_on_disconnect
    async def agent_stopped(self, agent_id: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                t.agent.update().where(t.agent.c.id == agent_id).values(stopped=t.utcnow())
            )

    @retry_on_disconnect
    async def lapsed_leases(self, *, limit: int = 100) -> list[Claim]:
        """Active step runs whose lease ran out: their worker is gone."""
        async with self.reading() as conn:
            rows = await conn.execute(
                sa.select(
                    t.step_run.c.id,
                    t.step_run.c.run_id,
                    t.step_run.c.step,
                    t.step_run.c.sequence,
                    t.step_run.c.recovery,
                    t.step_run.c.attempt,
                )
                .where(
                    t.step_run.c.status == StepStatus.active.value,
                    t.step_run.c.lease_until < t.utcnow(),
                )
                .limit(limit)
            )
            return [Claim(r.id, r.run_id, r.step, r.sequence, r.recovery, r.attempt) for r in rows]

    @retry_on_disconnect
    async def run_provenance(self, run_id: str) -> tuple[ProgramDef, dict[str, Any]]:
        """A run's program definition and what proves where it came from.

        Returns the definition and a dict with the program id, name, version, stored
        definition text, the program's and the run's signatures, and the run's mode.
        """
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        t.run.c.program_id,
                        t.run.c.mode,
                        t.run.c.signature.label("run_signature"),
                        t.program.c.name,
                        t.program.c.version,
                        t.program.c.definition,
                        t.program.c.signature.label("program_signature"),
                    )
                    .select_from(t.run.join(t.program, t.run.c.program_id == t.program.c.id))
                    .where(t.run.c.id == run_id)
                )
            ).one_or_none()
        if row is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return ProgramDef.from_json(json.loads(row.definition)), dict(row._mapping)

    # -- reading ------------------------------------------------------------------------

    @retry_on_disconnect
    async def run_status(self, run_id: str) -> RunStatus:
        async with self.reading() as conn:
            status = (
                await conn.execute(sa.select(t.run.c.status).where(t.run.c.id == run_id))
            ).scalar_one_or_none()
        if status is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return RunStatus(status)

    @retry_on_disconnect
    async def load_result(self, run_id: str) -> RunResult:
        """The run and every step run it made, in creation order."""
        async with self.reading() as conn:
            run = (await conn.execute(sa.select(t.run).where(t.run.c.id == run_id))).one_or_none()
            if run is None:
                raise NoResult(f"no run {run_id!r} in {self!r}")
            rows = (
                await conn.execute(
                    sa.select(t.step_run)
                    .where(t.step_run.c.run_id == run_id)
                    .order_by(t.step_run.c.id)
                )
            ).all()
        steps = [
            StepRun(
                id=r.id,
                run_id=r.run_id,
                step=r.step,
                sequence=r.sequence,
                recovery=r.recovery,
                attempt=r.attempt,
                status=StepStatus(r.status),
                host=r.host,
                worker=r.worker,
                pid=r.pid,
                result=None if r.result is None else json.loads(r.result),
                error=r.error,
                created=r.created,
                started=r.started,
                ended=r.ended,
            )
            for r in rows
        ]
        return RunResult(
            run_id=run.id,
            program=run.program_name,
            status=RunStatus(run.status),
            reason=run.reason,
            created=run.created,
            ended=run.ended,
            steps=steps,
        )

    @retry_on_disconnect
    async def fired_events(self, run_id: str) -> list[tuple[str, str]]:
        """Every ``(event, sequence)`` fired in a run, in firing order."""
        async with self.reading() as conn:
            rows = await conn.execute(
                sa.select(t.trigger.c.event, t.trigger.c.sequence)
                .where(t.trigger.c.run_id == run_id)
                .order_by(t.trigger.c.id)
            )
            return [(r.event, r.sequence) for r in rows]


def _group_by_sequence(triggers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for event, sequence in triggers:
        grouped.setdefault(sequence, []).append(event)
    return grouped
