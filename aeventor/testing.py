"""Test doubles for programs built on aeventor: an in-memory store and a scripted executor.

:class:`InMemoryStore` implements the store interface of :mod:`aeventor.dispatch.store` in
plain dicts, with the same semantics as the SQL stores (leases, unique keys, conditional
writes, ``ended`` timestamps) and an injectable clock (:class:`FakeClock`), so lease expiry
can be tested without waiting. :class:`FakeExecutor` runs no code: each step run waits until
the test says how it ends.

Example, in a user's test (pytest-asyncio)::

    import asyncio
    from pathlib import Path

    import aeventor as evr
    from aeventor.dispatch import Graph
    from aeventor.dispatch.trust import OwnProgram
    from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
    from aeventor.testing import FakeExecutor, InMemoryStore

    async def test_a_then_b(tmp_path: Path) -> None:
        ev = evr.Eventor(name="prog", store=":memory:")
        ev.add_event("start")
        ev.add_event("go")
        ev.add_step("a", triggers={evr.StepStatus.success: ("go",)})
        ev.add_step("b")
        ev.add_assoc("start", "a")
        ev.add_assoc("go", "b")
        graph = Graph(ev.program)
        store, fake = InMemoryStore(), FakeExecutor()
        program_id = await store.register_program(graph.program)
        run_id, _ = await store.create_run(graph, program_id=program_id,
                                           triggers=[("start", "0")])
        worker = Worker(store=store, scope=Scope(run_id=run_id),
                        config=WorkerConfig(log_dir=tmp_path), programs=OwnProgram(graph),
                        route=lambda step: (fake, step))
        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            tg.create_task(worker.run())
            await fake.started("a")
            fake.finish("a", value=1)
            fake.finish("b")
        assert (await store.load_result(run_id)).ok

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self, TypeVar

from .dispatch import PENDING
from .dispatch.claims import (
    Delay,
    RunWorkers,
    StepEnd,
    StepRunState,
    Taker,
    WorkerState,
    new_token,
)
from .dispatch.executor import ExecResult, StepLaunch
from .dispatch.pools import Waiter
from .dispatch.store import (
    Claim,
    NewStepRun,
    Notifier,
    RunLock,
    RunOrigin,
    Store,
    StoredProgram,
    StoreTx,
)
from .exceptions import NoResult, UniqueViolation
from .program.model import ProgramDef, RunStatus, StepStatus
from .records import DelayedTarget, ProgramSummary, RunResult, Slots, StepRun, run_log_dir

__all__ = ("FakeClock", "FakeExecutor", "InMemoryStore")

_T = TypeVar("_T")

#: The first pid :class:`FakeExecutor` reports for a process or command step.
FAKE_PID = 40000


class FakeClock:
    """A clock that moves only when told: ``clock.advance(seconds)``.

    Pass it as ``InMemoryStore(clock=...)`` to make leases lapse without waiting.

    .. versionadded:: 0.1
    """

    def __init__(self, start: datetime | None = None) -> None:
        self.now = self.start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self.now.tzinfo is None:
            raise ValueError(f"start={start!r}: pass an aware datetime (tzinfo=UTC)")

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += timedelta(seconds=seconds)

    def monotonic(self) -> float:
        """Seconds since the start, as :func:`time.monotonic` (a worker's ``monotonic``)."""
        return (self.now - self.start).total_seconds()


class _Changes:
    """Wakes waiters whenever something changed; each rechecks its own predicate."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def changed(self) -> None:
        for event in self._waiters:
            event.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            event = asyncio.Event()
            self._waiters.add(event)
            try:
                await event.wait()
            finally:
                self._waiters.discard(event)


# -- the in-memory tables ---------------------------------------------------------------------


@dataclass(slots=True)
class _Program:
    id: int
    name: str
    version: str
    definition: str
    created: datetime
    signature: str | None


@dataclass(slots=True)
class _Run:
    id: str
    program_id: int
    program_name: str
    status: RunStatus
    stopped: bool
    recovery: int
    reason: str | None
    created: datetime
    ended: datetime | None
    mode: str
    submitted_by: str | None
    signature: str | None
    controller: str | None = None
    log_dir: str | None = None
    replay: str | None = None


def _summary(run: _Run) -> RunResult:
    """A run without its step runs, as the SQL stores read it."""
    return RunResult(
        run_id=run.id,
        program=run.program_name,
        status=run.status,
        reason=run.reason,
        created=run.created,
        ended=run.ended,
        steps=(),
        log_dir=None
        if run.log_dir is None
        else run_log_dir(Path(run.log_dir), run.program_name, run.id),
        recovery=run.recovery,
    )


@dataclass(slots=True)
class _StepRun:
    id: int
    run_id: str
    step: str
    sequence: str
    recovery: int
    attempt: int
    status: StepStatus
    host: str | None
    queue: str | None
    worker: str | None
    pid: int | None
    lease_until: datetime | None
    token: str | None
    mac: str | None
    result: str | None
    error: str | None
    created: datetime
    started: datetime | None
    ended: datetime | None
    not_before: datetime | None = None


@dataclass(slots=True)
class _Agent:
    id: str
    hostname: str
    pid: int
    hosts: list[str]
    started: datetime
    heartbeat: datetime
    stopped: datetime | None = None
    lease_until: datetime | None = None


@dataclass(slots=True)
class _Slot:
    pool: str
    run_id: str
    step_run_id: int | None
    slots: int
    size: int
    priority: int
    held: bool


@dataclass(slots=True)
class _Tables:
    programs: dict[int, _Program] = field(default_factory=dict)
    runs: dict[str, _Run] = field(default_factory=dict)
    #: (run_id, sequence, recovery, event) -> trigger id: the unique key; insertion order is
    #: firing order.
    triggers: dict[tuple[str, str, int, str], int] = field(default_factory=dict)
    step_runs: dict[int, _StepRun] = field(default_factory=dict)
    #: (run_id, step, sequence, recovery, attempt) -> step run id: the unique key.
    step_run_keys: dict[tuple[str, str, str, int, int], int] = field(default_factory=dict)
    #: (run_id, sequence, recovery, event, kind, target) -> [id, due, done]
    delays: dict[tuple[str, str, int, str, str, str], list[Any]] = field(default_factory=dict)
    agents: dict[str, _Agent] = field(default_factory=dict)
    #: slot id -> its row (see :mod:`aeventor.dispatch.pools`)
    slots: dict[int, _Slot] = field(default_factory=dict)
    #: table -> last id given (each table counts on its own, as SQL sequences do)
    last_ids: dict[str, int] = field(default_factory=dict)

    def new_id(self, table: str) -> int:
        self.last_ids[table] = id_ = self.last_ids.get(table, 0) + 1
        return id_


def _take_ready(
    tables: _Tables,
    now: datetime,
    *,
    worker: str,
    limit: int,
    run_id: str | None,
    hosts: Collection[str | None] | None,
    lease: timedelta,
    token: str,
) -> list[Claim]:
    """Claim up to ``limit`` ready step runs, in id order (the in-memory claim)."""
    claimed: list[Claim] = []
    for row in tables.step_runs.values():  # in id order
        if len(claimed) >= limit:
            break
        if row.status is not StepStatus.ready:
            continue
        if row.not_before is not None and row.not_before > now:
            continue
        if run_id is not None and row.run_id != run_id:
            continue
        if hosts is not None and row.queue not in hosts:
            continue
        row.status = StepStatus.active
        row.worker = worker
        row.started = now
        row.lease_until = now + lease
        row.token = token
        claimed.append(Claim.from_row(row))
    return claimed


class InMemoryStore(Store):
    """A store in plain dicts, for tests: same semantics as the SQL stores, no database.

    Writes are serialised by one :class:`asyncio.Lock`. A transaction works on a copy of the
    tables that replaces them only when it returns, so one that raises (or is cancelled)
    changes nothing, and readers never see half a transaction. Copying costs time linear in
    the store's size, which suits tests, not production.

    Commits wake :attr:`notifier` subscribers of the runs and queues they changed, as Postgres NOTIFY
    does, so several workers on one store (standing for several processes) wake each other
    and :attr:`poll_interval` is None.

    Args:
        clock: returns the current time as an aware UTC datetime; leases are measured with
            it (default: the wall clock). Pass a :class:`FakeClock` to expire leases at will.

    .. versionadded:: 0.1
    """

    claims_on_insert = True

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.poll_interval = None
        self.notifier = Notifier()
        self._lock = asyncio.Lock()
        self._lost_acks = 0
        self._changes = _Changes()
        self._t = _Tables()

    def __repr__(self) -> str:
        return f"<InMemoryStore runs={len(self._t.runs)} step_runs={len(self._t.step_runs)}>"

    # -- lifecycle (nothing to open; present so it can stand in for a Database) ------------

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    # -- transactions ---------------------------------------------------------------------

    def lose_acknowledgements(self, count: int = 1) -> None:
        """Make the next ``count`` writes (transactions and claims) commit, then lose their
        acknowledgement: each runs again as a retry after a lost connection would (the
        transaction with ``tx.retried``), and its caller gets what the retry returns."""
        self._lost_acks += count

    async def write(self, operation: Callable[[StoreTx], Awaitable[_T]]) -> _T:
        async with self._lock:
            tx = MemoryTx(copy.deepcopy(self._t), self.clock)
            value = await operation(tx)
            self._t = tx.tables
            self._changes.changed()
            if self._lost_acks:
                self._lost_acks -= 1
                first = tx
                tx = MemoryTx(copy.deepcopy(self._t), self.clock, retried=True)
                value = await operation(tx)
                self._t = tx.tables
                tx.notifications = first.notifications | tx.notifications
        for run_id, queues in tx.notifications.items():
            self.notifier.notify(run_id)
            for queue in queues:
                self.notifier.notify_queue(queue)
        return value

    # -- claims and leases ------------------------------------------------------------------

    async def claim(
        self,
        *,
        worker: str,
        limit: int,
        run_id: str | None = None,
        hosts: Sequence[str] | None = None,
        lease: timedelta = timedelta(seconds=30),
    ) -> list[Claim]:
        if limit <= 0:
            return []
        async with self._lock:
            now = self.clock()
            token = new_token()
            claimed = _take_ready(
                self._t,
                now,
                worker=worker,
                limit=limit,
                run_id=run_id,
                hosts=hosts,
                lease=lease,
                token=token,
            )
            if claimed:
                self._changes.changed()
            if self._lost_acks:
                # The retry finds what the first attempt claimed by its token.
                self._lost_acks -= 1
                claimed = [
                    Claim.from_row(row)
                    for row in self._t.step_runs.values()
                    if row.status is StepStatus.active
                    and row.worker == worker
                    and row.token == token
                ]
        return claimed

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
        async with self._lock:
            now = self.clock()
            agent = self._t.agents.get(worker)
            if agent is None:
                agent = self._t.agents[worker] = _Agent(
                    worker, hostname, pid, list(hosts), now, now
                )
            else:
                agent.heartbeat, agent.hosts, agent.stopped = now, list(hosts), None
            agent.lease_until = now + lease
            revoked: dict[int, StepStatus] = {}
            for id_, token in held.items():
                row = self._t.step_runs.get(id_)
                if row is None:
                    revoked[id_] = StepStatus.cancelled
                elif (
                    row.worker == worker
                    and row.token == token
                    and row.status
                    in (
                        StepStatus.active,
                        StepStatus.success,
                        StepStatus.failure,
                    )
                ):
                    # Active (renewed), or ended by the worker's own completion.
                    if row.status is StepStatus.active:
                        row.lease_until = now + lease
                else:
                    revoked[id_] = row.status
            self._changes.changed()
        return revoked

    async def worker_stopped(self, worker: str) -> None:
        async with self._lock:
            agent = self._t.agents.get(worker)
            if agent is not None:
                agent.stopped, agent.lease_until = self.clock(), None

    async def lapsed_leases(
        self, *, limit: int = 100, run_id: str | None = None, worker: str | None = None
    ) -> list[Claim]:
        now = self.clock()

        def alive(row: _StepRun) -> bool:
            agent = self._t.agents.get(row.worker or "")
            return (
                agent is not None
                and agent.stopped is None
                and agent.lease_until is not None
                and agent.lease_until >= now
            )

        return [
            Claim.from_row(row)
            for row in self._t.step_runs.values()
            if row.status is StepStatus.active
            and row.lease_until is not None
            and row.lease_until < now
            and (run_id is None or row.run_id == run_id)
            and (not alive(row) or (worker is not None and row.worker == worker))
        ][:limit]

    async def active_claims(self, *, worker: str) -> list[Claim]:
        return [
            Claim.from_row(row)
            for row in self._t.step_runs.values()
            if row.status is StepStatus.active and row.worker == worker
        ]

    # -- programs and runs ------------------------------------------------------------------

    async def register_program(self, program: ProgramDef, *, signature: str | None = None) -> int:
        """Store a program definition (once per version) and return its id.

        A signature given for a version stored unsigned is added to it.
        """
        version = program.version
        async with self._lock:
            for stored in self._t.programs.values():
                if (stored.name, stored.version) == (program.name, version):
                    if signature is not None and stored.signature is None:
                        stored.signature = signature
                    return stored.id
            id_ = self._t.new_id("program")
            self._t.programs[id_] = _Program(
                id_, program.name, version, program.canonical_json(), self.clock(), signature
            )
            return id_

    async def load_program(self, program_id: int) -> ProgramDef:
        return ProgramDef.from_json(json.loads(self._program(program_id).definition))

    async def latest_program(self, name: str) -> ProgramDef:
        """The newest registered version of program ``name``."""
        found = [p for p in self._t.programs.values() if p.name == name]
        if not found:
            raise NoResult(f"no program {name!r} is registered in {self!r}")
        newest = max(found, key=lambda p: (p.created, p.id))
        return ProgramDef.from_json(json.loads(newest.definition))

    async def stored_program(self, program_id: int) -> StoredProgram:
        p = self._program(program_id)
        return StoredProgram(p.id, p.name, p.version, p.definition, p.signature)

    async def run_origin(self, run_id: str) -> RunOrigin:
        run = self._run(run_id)
        return RunOrigin(run.id, run.program_id, run.mode, run.signature)

    async def run_status(self, run_id: str) -> RunStatus:
        return self._run(run_id).status

    async def load_result(self, run_id: str) -> RunResult:
        """The run and every step run it made, in creation order."""
        run = self._run(run_id)
        steps = [
            StepRun(
                id=r.id,
                run_id=r.run_id,
                step=r.step,
                sequence=r.sequence,
                recovery=r.recovery,
                attempt=r.attempt,
                status=r.status,
                host=r.host,
                worker=r.worker,
                pid=r.pid,
                result=None if r.result is None else json.loads(r.result),
                error=r.error,
                created=r.created,
                started=r.started,
                ended=r.ended,
            )
            for r in self._t.step_runs.values()
            if r.run_id == run_id
        ]
        return dataclasses.replace(_summary(run), steps=steps)

    async def fired_events(self, run_id: str) -> list[tuple[str, str]]:
        """Every ``(event, sequence)`` fired in a run, once, in firing order."""
        return list(
            dict.fromkeys(
                (event, seq) for (run, seq, _, event) in self._t.triggers if run == run_id
            )
        )

    async def run_delays(self, run_id: str) -> list[DelayedTarget]:
        """A run's delayed associations that fired, by due time (as the SQL stores')."""
        found = [
            (due, id_, DelayedTarget(key[3], key[1], key[2], key[4], key[5], due, done))
            for key, (id_, due, done) in self._t.delays.items()
            if key[0] == run_id
        ]
        return [delay for _, _, delay in sorted(found, key=lambda item: item[:2])]

    async def run_slots(self, run_id: str) -> list[Slots]:
        """The slots a run's step runs wait for or hold (as the SQL stores')."""
        found = []
        for _, slot in sorted(self._t.slots.items()):
            row = self._t.step_runs.get(slot.step_run_id or 0)
            if slot.run_id == run_id:
                step = None if row is None else row.step
                sequence = None if row is None else row.sequence
                found.append(Slots(slot.pool, step, sequence, slot.slots, slot.held))
        return found

    def _pending_delays(self, run_id: str | None) -> list[tuple[Delay, datetime]]:
        found = []
        for key, (id_, due, done) in self._t.delays.items():
            run = self._t.runs[key[0]]
            if done is not None or run.status is not RunStatus.running:
                continue
            if (run_id is None and run.mode != "distributed") or (
                run_id is not None and run.id != run_id
            ):
                continue
            found.append((Delay(id_, *key), due))
        return sorted(found, key=lambda item: (item[1], item[0].id))

    async def due_delays(self, *, run_id: str | None = None, limit: int = 100) -> list[Delay]:
        now = self.clock()
        return [delay for delay, due in self._pending_delays(run_id) if due <= now][:limit]

    async def next_delay(self, *, run_id: str | None = None) -> float | None:
        pending = self._pending_delays(run_id)
        if not pending:
            return None
        return max((pending[0][1] - self.clock()).total_seconds(), 0.0)

    async def run_workers(self, run_id: str) -> RunWorkers:
        run = self._run(run_id)
        now = self.clock()
        leases: dict[str, list[datetime | None]] = {}
        for row in self._t.step_runs.values():
            if row.run_id == run_id and row.status is StepStatus.active and row.worker:
                leases.setdefault(row.worker, []).append(row.lease_until)
        ids = set(leases) | ({run.controller} - {None})
        known = {
            a.id: WorkerState(
                a.id,
                a.hostname,
                a.pid,
                a.started,
                a.stopped,
                a.lease_until is None or a.lease_until < now,
            )
            for a in self._t.agents.values()
            if a.id in ids
        }
        return RunWorkers(
            controller=run.controller,
            holders=frozenset(leases),
            known=known,
            unleased=frozenset(
                w for w, until in leases.items() if all(u is not None and u < now for u in until)
            ),
        )

    async def list_runs(
        self,
        *,
        program: str | None = None,
        limit: int = 20,
        status: RunStatus | None = None,
        since: datetime | None = None,
        id_prefix: str | None = None,
    ) -> list[RunResult]:
        """The newest runs first, without their step runs (as the SQL stores' list_runs)."""
        runs = [
            r
            for r in self._t.runs.values()
            if (program is None or r.program_name == program)
            and (status is None or r.status is status)
            and (since is None or r.created >= since)
            and (id_prefix is None or r.id.startswith(id_prefix))
        ]
        runs.sort(key=lambda r: (r.created, r.id), reverse=True)
        return [_summary(r) for r in runs[:limit]]

    async def list_programs(self) -> list[ProgramSummary]:
        """Every registered program by name, as the SQL stores' list_programs."""
        found = []
        for name in sorted({p.name for p in self._t.programs.values()}):
            versions = [p for p in self._t.programs.values() if p.name == name]
            newest = max(versions, key=lambda p: (p.created, p.id))
            runs = [r for r in self._t.runs.values() if r.program_name == name]
            last = max(runs, key=lambda r: (r.created, r.id)) if runs else None
            found.append(
                ProgramSummary(
                    name=name,
                    versions=len(versions),
                    latest_version=newest.version,
                    registered=newest.created,
                    runs=len(runs),
                    last_run_id=None if last is None else last.id,
                    last_status=None if last is None else last.status,
                    last_run=None if last is None else last.created,
                )
            )
        return found

    # -- for tests ---------------------------------------------------------------------------

    def step_runs(self, run_id: str) -> list[tuple[str, str, int, int, StepStatus]]:
        """The run's step runs now, as ``(step, sequence, recovery, attempt, status)`` in
        creation order: what :meth:`wait_until` predicates can look at."""
        return [
            (r.step, r.sequence, r.recovery, r.attempt, r.status)
            for r in self._t.step_runs.values()
            if r.run_id == run_id
        ]

    def lease_until(self, step_run_id: int) -> datetime | None:
        """Until when a step run's lease holds (None when it is not active)."""
        row = self._t.step_runs.get(step_run_id)
        if row is None:
            raise NoResult(f"no step run {step_run_id} in {self!r}")
        return row.lease_until

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is checked after every change to the store.

        Bound the wait with ``asyncio.timeout``.
        """
        await self._changes.wait_for(predicate)

    async def wait_for_run(self, run_id: str) -> RunResult:
        """Wait until the run has ended; return its result."""
        await self.wait_until(lambda: self._run(run_id).status is not RunStatus.running)
        return await self.load_result(run_id)

    def _run(self, run_id: str) -> _Run:
        run = self._t.runs.get(run_id)
        if run is None:
            raise NoResult(f"no run {run_id!r} in {self!r}")
        return run

    def _program(self, program_id: int) -> _Program:
        program = self._t.programs.get(program_id)
        if program is None:
            raise NoResult(f"no program with id {program_id} in {self!r}")
        return program


class MemoryTx:
    """:class:`~aeventor.dispatch.store.StoreTx` on a private copy of the tables."""

    claims_on_insert = True

    def __init__(
        self, tables: _Tables, clock: Callable[[], datetime], *, retried: bool = False
    ) -> None:
        self.tables = tables
        self.clock = clock
        self.retried = retried
        self.earliest_delay: float | None = None
        #: run ids to wake at commit
        self.notifications: dict[str, set[str | None]] = {}
        self._handed_over: set[str] = set()

    async def lock_run(self, run_id: str) -> RunLock:
        run = self.tables.runs.get(run_id)
        if run is None:
            raise NoResult(f"no run {run_id!r} in the in-memory store")
        return RunLock(run.status, run.stopped, run.recovery, run.mode, run.replay, run.controller)

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
        if run_id in self.tables.runs:
            raise UniqueViolation(f"duplicate run id {run_id!r}", constraint="pk_aeventor_run")
        if program_id not in self.tables.programs:
            raise NoResult(f"no program with id {program_id}; register_program() it first")
        self.tables.runs[run_id] = _Run(
            id=run_id,
            program_id=program_id,
            program_name=program_name,
            status=RunStatus.running,
            stopped=False,
            recovery=0,
            reason=None,
            created=self.clock(),
            ended=None,
            mode=mode,
            submitted_by=submitted_by,
            signature=signature,
            controller=controller,
            log_dir=log_dir,
        )

    def _held(self, claim_id: int, token: str | None, only_if_lapsed: bool) -> _StepRun | None:
        row = self.tables.step_runs.get(claim_id)
        if row is None or row.status is not StepStatus.active or row.token != token:
            return None
        if only_if_lapsed and not (row.lease_until is not None and row.lease_until < self.clock()):
            return None
        return row

    async def end_steps(self, ends: Sequence[StepEnd]) -> set[int]:
        # (The store's lock serialises its transactions: nothing to lock.)
        return {
            end.claim_id
            for end in sorted(ends, key=lambda end: end.claim_id)
            if await self.end_step(
                end.claim_id,
                token=end.token,
                status=end.status,
                result=end.result,
                error=end.error,
            )
        }

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
        row = self._held(claim_id, token, only_if_lapsed)
        if row is None:
            return False
        row.status, row.result, row.error = status, result, error
        row.ended, row.lease_until = self.clock(), None
        return True

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
        return None  # two calls, as stores without UPDATE ... FROM ... RETURNING

    async def requeue_step(
        self, claim_id: int, *, token: str | None, only_if_lapsed: bool = False
    ) -> bool:
        row = self._held(claim_id, token, only_if_lapsed)
        if row is None or row.pid is not None:
            return False
        row.status, row.worker, row.token, row.pid = StepStatus.ready, None, None, None
        row.started, row.lease_until = None, None
        return True

    async def step_state(self, step_run_id: int) -> tuple[StepStatus, str | None] | None:
        row = self.tables.step_runs.get(step_run_id)
        return None if row is None else (row.status, row.token)

    async def claimed(self, *, worker: str, token: str) -> list[Claim]:
        return [
            Claim.from_row(row)
            for row in self.tables.step_runs.values()
            if row.status is StepStatus.active and row.worker == worker and row.token == token
        ]

    async def claim_ready(self, take: Taker) -> list[Claim]:
        return _take_ready(
            self.tables,
            self.clock(),
            worker=take.worker,
            limit=take.budget,
            run_id=take.run_id,
            hosts=take.hosts,
            lease=take.lease,
            token=take.token,
        )

    async def set_pid(self, step_run_id: int, pid: int, *, token: str | None) -> bool:
        row = self._held(step_run_id, token, False)
        if row is None:
            return False
        row.pid = pid
        return True

    async def fire_new(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> AbstractSet[str] | None:
        return None  # reads first, as stores without INSERT ... RETURNING do

    async def fired(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        groups: Iterable[AbstractSet[str]],
    ) -> AbstractSet[str]:
        triggers = self.tables.triggers
        return {e for group in groups for e in group if (run_id, sequence, recovery, e) in triggers}

    async def add_triggers(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> None:
        for event in events:
            key = (run_id, sequence, recovery, event)
            if key not in self.tables.triggers:
                self.tables.triggers[key] = self.tables.new_id("trigger")

    async def add_step_runs(self, rows: Sequence[NewStepRun]) -> None:
        now = self.clock()
        for row in rows:
            inserted = self._insert(row, now)
            if inserted is None:
                continue
            for need in row.needs:
                self.tables.slots[self.tables.new_id("slot")] = _Slot(
                    need.key, row.run_id, inserted.id, need.slots, need.size, row.priority, False
                )

    async def slot_waiters(self, keys: Sequence[str]) -> tuple[dict[str, int], list[Waiter]]:
        # (The store's lock serialises transactions: nothing to lock here.)
        now = self.clock()
        slots = self.tables.slots.values()
        waiting = {s.step_run_id for s in slots if s.pool in keys and not s.held}
        pools = set(keys) | {s.pool for s in slots if s.step_run_id in waiting and not s.held}

        def lapsed(step_run_id: int | None) -> bool:
            row = self.tables.step_runs.get(step_run_id or 0)
            if row is None or row.status is not StepStatus.active:
                return False
            agent = self.tables.agents.get(row.worker or "")
            alive = (
                agent is not None
                and agent.stopped is None
                and agent.lease_until is not None
                and agent.lease_until >= now
            )
            return row.lease_until is not None and row.lease_until < now and not alive

        held: dict[str, int] = {}
        for slot in slots:
            if slot.pool in pools and slot.held and not lapsed(slot.step_run_id):
                held[slot.pool] = held.get(slot.pool, 0) + slot.slots
        waiting = {s.step_run_id for s in slots if s.pool in pools and not s.held}
        wanted: dict[int, dict[str, tuple[int, int]]] = {}
        order: dict[int, tuple[int, int]] = {}
        for slot in slots:
            row = self.tables.step_runs.get(slot.step_run_id or 0)
            if slot.held or slot.step_run_id not in waiting or row is None:
                continue
            if row.status is not StepStatus.waiting:
                continue
            wanted.setdefault(row.id, {})[slot.pool] = (slot.slots, slot.size)
            order[row.id] = (-slot.priority, row.id)
        return held, [
            Waiter(id_, wanted[id_], complete=pools.issuperset(wanted[id_]))
            for id_ in sorted(wanted, key=order.__getitem__)
        ]

    async def admit_step_runs(self, step_run_ids: Sequence[int]) -> list[tuple[str, str | None]]:
        ids = set(step_run_ids)
        for slot in self.tables.slots.values():
            if slot.step_run_id in ids:
                slot.held = True
        admitted = []
        for id_ in step_run_ids:
            row = self.tables.step_runs[id_]
            if row.status is StepStatus.waiting:
                row.status = StepStatus.ready
            admitted.append((row.run_id, row.queue))
        return admitted

    async def waiting_pools(self, run_id: str | None) -> set[str]:
        return {
            s.pool
            for s in self.tables.slots.values()
            if not s.held and (run_id is None or s.run_id == run_id)
        }

    async def release_slots(self, run_id: str) -> set[str]:
        ended = self.tables.runs[run_id].status is not RunStatus.running
        freed = set()
        for id_, slot in list(self.tables.slots.items()):
            if slot.run_id != run_id:
                continue
            row = self.tables.step_runs.get(slot.step_run_id or 0)
            if ended or (row is not None and row.status not in PENDING):
                freed.add(slot.pool)
                del self.tables.slots[id_]
        freed |= self._handed_over
        self._handed_over = set()
        return freed

    async def hand_over_slots(
        self,
        run_id: str,
        step_run_id: int,
        *,
        keep: Mapping[str, int],
        release: Mapping[str, int],
    ) -> None:
        for slot in self.tables.slots.values():
            if slot.step_run_id == step_run_id and slot.held and slot.pool in keep:
                slot.step_run_id, slot.slots = None, keep[slot.pool]
        for key, count in release.items():
            for id_, slot in sorted(self.tables.slots.items()):
                if count <= 0:
                    break
                if slot.run_id == run_id and slot.pool == key and slot.step_run_id is None:
                    taken = min(count, slot.slots)
                    slot.slots -= taken
                    count -= taken
                    if slot.slots == 0:
                        del self.tables.slots[id_]
            self._handed_over.add(key)

    async def add_claimed_step_runs(
        self, rows: Sequence[NewStepRun], *, worker: str, lease: timedelta, token: str
    ) -> list[Claim]:
        now = self.clock()
        inserted: list[Claim] = []
        for new in rows:
            row = self._insert(new, now)
            if row is not None:
                row.worker, row.started, row.lease_until = worker, now, now + lease
                row.token = token
                inserted.append(Claim.from_row(row))
        return inserted

    def _insert(self, new: NewStepRun, now: datetime) -> _StepRun | None:
        """Insert a step run unless its unique key exists (then None)."""
        key = (new.run_id, new.step, new.sequence, new.recovery, new.attempt)
        if key in self.tables.step_run_keys:
            return None
        id_ = self.tables.new_id("step_run")
        row = _StepRun(
            id=id_,
            run_id=new.run_id,
            step=new.step,
            sequence=new.sequence,
            recovery=new.recovery,
            attempt=new.attempt,
            status=new.status,
            host=new.host,
            queue=new.queue,
            worker=None,
            pid=None,
            lease_until=None,
            token=None,
            mac=new.mac,
            result=None,
            error=None,
            created=now,
            started=None,
            ended=now if new.status in (StepStatus.skipped, StepStatus.cancelled) else None,
            not_before=None if new.delay is None else now + timedelta(seconds=new.delay),
        )
        self.tables.step_runs[id_] = row
        self.tables.step_run_keys[key] = id_
        return row

    async def pending(self, run_id: str, *, delays: bool = True) -> int:
        count = sum(
            1 for r in self.tables.step_runs.values() if r.run_id == run_id and r.status in PENDING
        )
        if count or not delays:
            return count
        return sum(
            1 for key, (_, _, done) in self.tables.delays.items() if key[0] == run_id and not done
        )

    async def add_delays(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        delays: Sequence[tuple[str, str, str, float]],
    ) -> None:
        now = self.clock()
        for event, kind, target, seconds in delays:
            key = (run_id, sequence, recovery, event, kind, target)
            if key not in self.tables.delays:
                due = now + timedelta(seconds=seconds)
                self.tables.delays[key] = [self.tables.new_id("delay"), due, None]
            if self.earliest_delay is None or seconds < self.earliest_delay:
                self.earliest_delay = seconds

    async def take_delay(self, delay_id: int) -> bool:
        for entry in self.tables.delays.values():
            if entry[0] == delay_id and entry[2] is None:
                entry[2] = self.clock()
                return True
        return False

    async def stop_run(self, run_id: str, reason: str | None) -> None:
        run = self.tables.runs.get(run_id)
        if run is not None:
            run.stopped = True
            if reason is not None:
                run.reason = reason
        now = self.clock()
        for row in self.tables.step_runs.values():
            if row.run_id == run_id and row.status in (StepStatus.ready, StepStatus.waiting):
                row.status, row.ended = StepStatus.skipped, now

    async def end_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        run = self.tables.runs.get(run_id)
        if run is None or run.status is not RunStatus.running:
            return
        run.status, run.ended = status, self.clock()
        if reason is not None:
            run.reason = reason

    async def cancel_step_runs(self, run_id: str) -> None:
        now = self.clock()
        for row in self.tables.step_runs.values():
            if row.run_id == run_id and row.status in PENDING:
                row.status, row.ended, row.lease_until = StepStatus.cancelled, now, None

    async def pending_step_run(
        self, run_id: str, step: str, sequence: str
    ) -> tuple[int, int] | None:
        found = [
            r
            for r in self.tables.step_runs.values()
            if r.run_id == run_id
            and r.step == step
            and r.sequence == sequence
            and r.status in PENDING
        ]
        return None if not found else (found[-1].id, found[-1].recovery)

    async def cancel_step_run(self, step_run_id: int, error: str) -> bool:
        row = self.tables.step_runs.get(step_run_id)
        if row is None or row.status not in PENDING:
            return False
        row.status, row.error, row.ended = StepStatus.cancelled, error, self.clock()
        row.lease_until = row.token = None
        return True

    async def set_controller(self, run_id: str, controller: str) -> None:
        self.tables.runs[run_id].controller = controller

    async def holders(self, run_id: str) -> set[str]:
        return {
            row.worker
            for row in self.tables.step_runs.values()
            if row.run_id == run_id and row.status is StepStatus.active and row.worker
        }

    async def supersede_step_runs(self, run_id: str, error: str) -> int:
        now = self.clock()
        closed = 0
        for row in self.tables.step_runs.values():
            if row.run_id != run_id or row.status not in PENDING:
                continue
            if row.status is StepStatus.active:
                row.status, row.error = StepStatus.lost, error
            else:
                row.status = StepStatus.cancelled
            row.ended, row.lease_until, row.token = now, None, None
            closed += 1
        return closed

    async def step_run_states(self, run_id: str) -> list[StepRunState]:
        return [
            StepRunState(r.id, r.step, r.sequence, r.recovery, r.attempt, r.status, r.worker)
            for r in self.tables.step_runs.values()
            if r.run_id == run_id
        ]

    async def fired_in(self, run_id: str, recovery: int) -> list[tuple[str, str]]:
        return [
            (seq, event)
            for (run, seq, rec, event) in self.tables.triggers
            if run == run_id and rec == recovery
        ]

    async def earlier_outcomes(
        self, run_id: str, sequence: str, recovery: int, steps: Sequence[str]
    ) -> dict[str, StepStatus]:
        wanted = set(steps)
        rows = sorted(
            (
                r
                for r in self.tables.step_runs.values()
                if r.run_id == run_id
                and r.sequence == sequence
                and r.recovery < recovery
                and r.step in wanted
            ),
            key=lambda r: (r.recovery, r.attempt),
        )
        return {r.step: r.status for r in rows}

    async def resume_run(
        self,
        run_id: str,
        *,
        recovery: int,
        replay: str,
        controller: str | None,
        program: tuple[int, str | None] | None = None,
    ) -> None:
        run = self.tables.runs[run_id]
        run.status, run.stopped, run.reason, run.ended = RunStatus.running, False, None, None
        run.recovery, run.replay, run.controller = recovery, replay, controller
        if program is not None:
            run.program_id, run.signature = program

    def notify(
        self, run_id: str, queues: Collection[str | None] = (), *, here: bool = False
    ) -> None:
        # (Every notification wakes this process's workers.)
        self.notifications.setdefault(run_id, set()).update(queues)


# -- the executor -----------------------------------------------------------------------------

#: A step run's outcome before it is known: the test decides.
Outcome = Callable[[StepLaunch], ExecResult | None]


class FakeExecutor:
    """An executor that runs nothing: each step run ends when the test says so.

    A launch of ``(step, sequence)`` waits for :meth:`finish` of that pair (an outcome given
    before the launch is kept for it), unless the ``outcome`` function returns a result for
    it. Process and command steps report a fake pid through ``launch.on_started``, as a real
    spawn would. Cancelling a launch (the worker terminating it) records it in
    :attr:`cancelled` and re-raises.

    Args:
        outcome: called with each launch; an :class:`ExecResult` ends it at once, None makes
            it wait for :meth:`finish`. Default: always wait.

    Attributes:
        launches: every launch, in order.
        running: the launches waiting for their outcome now.
        cancelled: the launches that were cancelled.
        results: ``(launch, result)`` of every launch that ended with a result.
        peak: the most launches that ran at once.

    Example::

        fake = FakeExecutor(outcome=lambda launch: ExecResult(ok=True))  # all succeed
        fake = FakeExecutor()                      # each waits:
        launch = await fake.started("a")           # until "a" runs,
        fake.finish("a", ok=False, error="boom")   # then fail it

    .. versionadded:: 0.1
    """

    def __init__(self, *, outcome: Outcome | None = None) -> None:
        self.outcome = outcome
        self.launches: list[StepLaunch] = []
        self.running: list[StepLaunch] = []
        self.cancelled: list[StepLaunch] = []
        self.results: list[tuple[StepLaunch, ExecResult]] = []
        self.peak = 0
        self._ready: dict[tuple[str, str], deque[ExecResult]] = {}
        self._waiting: dict[tuple[str, str], deque[asyncio.Future[ExecResult]]] = {}
        self._changes = _Changes()
        self._next_pid = FAKE_PID

    def finish(
        self,
        step: str,
        sequence: str | int = "0",
        *,
        ok: bool = True,
        value: Any = None,
        error: str | None = None,
    ) -> None:
        """End the running launch of ``step[sequence]``, or the next one to start."""
        result = ExecResult(ok=ok, value=value, error=error)
        key = (step, str(sequence))
        waiting = self._waiting.get(key)
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(result)
                return
        self._ready.setdefault(key, deque()).append(result)

    async def started(
        self, step: str, sequence: str | int | None = None, *, deadline: float = 5.0
    ) -> StepLaunch:
        """Wait until ``step`` (of ``sequence``, or any) has been launched; return the launch.

        Raises:
            TimeoutError: not within ``deadline`` seconds.
        """
        wanted = None if sequence is None else str(sequence)

        def found() -> StepLaunch | None:
            for launch in self.launches:
                if launch.claim.step == step and wanted in (None, launch.claim.sequence):
                    return launch
            return None

        await self.wait_for(lambda: found() is not None, deadline=deadline)
        launch = found()
        assert launch is not None
        return launch

    async def wait_for(self, predicate: Callable[[], bool], *, deadline: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a launch starts or ends.

        Raises:
            TimeoutError: not within ``deadline`` seconds.
        """
        async with asyncio.timeout(deadline):
            await self._changes.wait_for(predicate)

    async def run(self, launch: StepLaunch) -> ExecResult:
        self.launches.append(launch)
        self.running.append(launch)
        self.peak = max(self.peak, len(self.running))
        self._changes.changed()
        try:
            step = launch.step
            if step.executor in ("warm", "process", "command") and (
                step.target is not None or step.argv is not None
            ):
                self._next_pid += 1
                await launch.on_started(self._next_pid)
            result = self.outcome(launch) if self.outcome is not None else None
            if result is None:
                result = await self._await_outcome(launch)
            self.results.append((launch, result))
            return result
        except asyncio.CancelledError:
            self.cancelled.append(launch)
            raise
        finally:
            self.running.remove(launch)
            self._changes.changed()

    async def _await_outcome(self, launch: StepLaunch) -> ExecResult:
        key = (launch.claim.step, launch.claim.sequence)
        ready = self._ready.get(key)
        if ready:
            return ready.popleft()
        future: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(key, deque())
        waiting.append(future)
        try:
            return await future
        finally:
            if future in waiting:
                waiting.remove(future)

    async def aclose(self) -> None:
        return None
