"""The one worker: claim -> lease -> execute -> record, in every mode.

A standalone run is driven by a worker scoped to that run, in the caller's process; an agent
runs one worker per store, scoped to its hosts' queues. Both are this class, configured
differently (:class:`WorkerConfig`, :class:`Scope`); lease renewal, reaping, draining,
concurrency limits, cancellation and "execute one claim and record its outcome" exist only
here.

One :class:`asyncio.TaskGroup` owns the heartbeat, the reaper and every step task. The claim
loop never sleeps on a fixed interval: it wakes when a step of its own ends (each transaction
says how many step runs it made ready), when another process NOTIFYs, or when the store's
poll interval passes for stores that cannot push wake-ups.

Leases: every claimed step run is leased to the worker for ``lease`` seconds under a fencing
token of its own, and the heartbeat (one transaction: the worker's row and lease, and the
leases of the step runs it holds) renews them every ``heartbeat`` seconds. Leases are set and
judged on the database server's clock. A step run is lost only when its lease and its
worker's lapsed: a reaper (every agent; a run's own worker for that run) then records it
``lost`` and its failure triggers fire, or requeues it when it never started (no pid). A
reaper acts only after a full lease of uninterrupted heartbeats of its own, so after a
database outage every live owner renews what it holds before anyone reaps. The heartbeat
returns the held step runs that are no longer the worker's (cancelled from anywhere, or
taken while it could not renew them); the worker terminates those, and a completion under a
stale token is refused by the store and logged.

Faults: an agent's worker serves through store errors (it logs them and backs off); a claim
it cannot load or verify fails that step run alone, with the reason recorded.

Logs: each run's program log (:class:`~aeventor.dispatch.logs.RunLog`) is appended by a log
writer task within :data:`LOG_BATCH` seconds of its lines, one write per batch, in a
thread; what is left is written when the worker closes.

Stopping: when ``stop`` is set the worker stops claiming, lets running steps finish for
``grace`` seconds, then terminates them. An agent records each terminated step as a failure
(``record_abandoned``); a standalone run is cancelled as a whole by its owner.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..context import StepContext, launch_env
from ..exceptions import (
    AeventorError,
    ConnectionLost,
    ExecutorError,
    NoResult,
    ProgramDefinitionError,
)
from ..logs import get_logger
from ..program.model import ProgramDef, RunStatus, StepDef, StepStatus
from ..utils import describe_exception, wait_any
from . import transactions
from ._state import Graph
from .claims import Advance, Claim, Taker
from .executor import ExecResult, Executor, StepLaunch
from .logs import STARTED, RunLog, run_log_dir, step_log_path
from .store import Store
from .trust import Programs, Refused

__all__ = ("Scope", "Worker", "WorkerConfig", "new_worker_id")

log = get_logger("aeventor.worker")

#: Claim batch size when concurrency is unlimited.
_UNLIMITED = 64
#: With unlimited concurrency, the most step runs claimed and not yet begun, or ended and
#: not yet recorded, before the claim loop claims more (see :meth:`Worker._free`). Smaller
#: bounds make smaller group commits: 512 made a 5,000-step AND fan-out ~40% slower.
RECORD_BACKLOG = 1024
#: Seconds between looks at a run when none of its steps runs here.
IDLE_POLL = 1.0
#: Seconds after a retry's due time (on this process's clock) its worker looks for it.
DUE_SLACK = 0.005
#: Seconds a program log line may wait for others to be written with it.
LOG_BATCH = 0.02


def step_is_command(graph: Graph, claim: Claim) -> bool:
    """Whether the claim's step is a command (its result is its exit code)."""
    return graph.program.steps[claim.step].executor == "command"


def new_worker_id() -> str:
    """Host name, pid and a random tag: unique among the live workers of a cluster."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Scope:
    """What a worker claims: the step runs of one run, or those queued for some hosts.

    .. versionadded:: 0.1
    """

    run_id: str | None = None
    hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.run_id is None) == (self.hosts is None):
            raise ValueError("a worker's scope is one run (run_id=...) or some hosts (hosts=...)")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker claims and leases.

    Attributes:
        concurrency: most step runs executing at once (None: no limit).
        lease: seconds a claim holds without renewal; a worker that stops renewing (dead or
            hung) loses its step runs to a reaper once their lease lapses.
        heartbeat: seconds between renewals (default: a third of the lease, at most 5 s).
        grace: seconds running steps get to finish once the worker is asked to stop.
        reap: whether this worker records other workers' lapsed step runs as lost.
        record_abandoned: record a step terminated by this worker's shutdown as failed
            (agents); a standalone run is cancelled by its owner instead.
        log_dir: where run and step logs go.
        deterministic_logs: logs without timestamps, pids and run ids (runs can be diffed;
            see :mod:`aeventor.dispatch.logs`).
        log_level: level of the program log and of the steps' loggers (process and
            in-loop steps).
        until_idle: (a run's worker) return once nothing of the run runs or is due now,
            leaving later delays and retries for a later worker (``aeventor continue``).

    .. versionadded:: 0.1
    """

    concurrency: int | None = None
    lease: float = 30.0
    heartbeat: float | None = None
    grace: float = 30.0
    reap: bool = False
    record_abandoned: bool = False
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "aeventor_logs")
    deterministic_logs: bool = False
    log_level: int = logging.INFO
    until_idle: bool = False

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency!r}: at least 1, or None")
        if self.lease <= 0 or self.grace < 0:
            raise ValueError(f"lease={self.lease!r} must be > 0 and grace={self.grace!r} >= 0")
        if self.heartbeat is not None and not 0 < self.heartbeat < self.lease:
            raise ValueError(
                f"heartbeat={self.heartbeat!r} must be > 0 and shorter than lease={self.lease!r}"
            )

    @property
    def beat_every(self) -> float:
        return self.heartbeat if self.heartbeat is not None else min(5.0, self.lease / 3)


#: Picks the executor of a step (and may adapt the step, e.g. in-loop -> process on agents).
Router = Callable[[StepDef], tuple[Executor, StepDef]]


class Worker:
    """Claims, leases, executes and records step runs within its :class:`Scope`.

    Args:
        store: the store.
        scope: one run (standalone) or some hosts' queues (agent).
        config: limits, leases and logs.
        programs: where the program of a claim comes from, and what may run.
        route: the executor of each step.
        funcs: live callables of in-loop steps (the defining process only).
        on_status: called with a run's status whenever it is known to change (a run-scoped
            worker's own run).
        worker_id: default :func:`new_worker_id`.
        monotonic: the clock of the worker's own timing (tests pass a fake one).
        random: draws the jitter of retries' backoffs, in [0, 1) (tests pass their own).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        store: Store,
        scope: Scope,
        config: WorkerConfig,
        programs: Programs,
        route: Router,
        funcs: Mapping[str, Callable[..., Any]] | None = None,
        on_status: Callable[[RunStatus], None] | None = None,
        worker_id: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.scope = scope
        self.config = config
        self.programs = programs
        self.route = route
        self.funcs = dict(funcs or {})
        self.on_status = on_status
        self.id = worker_id or new_worker_id()
        self.log = log.bind(worker=self.id)
        #: The status of the scoped run (run-scoped workers).
        self.status = RunStatus.running
        #: (``until_idle``) nothing of the run runs or is due now: the worker returns.
        self.idle = False
        self._hosts = None if scope.hosts is None else frozenset[str | None](scope.hosts)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: The claims of the tasks, by step run id.
        self._claims: dict[int, Claim] = {}
        self._pending: list[Claim] = []
        #: Step runs no longer ours (cancelled, or taken): terminated, nothing recorded.
        self._revoked: set[int] = set()
        #: When the heartbeats became regular again (monotonic): the reaper waits a lease.
        self._monotonic = monotonic
        self._random = random
        #: When retries this worker made become claimable (its monotonic clock), a heap.
        self._due: list[float] = []
        self._healthy_since = monotonic()
        self._last_beat: float | None = None
        self._run_logs: dict[str, RunLog] = {}
        #: Set when a program log has lines to write (the log writer's wake-up).
        self._logs_dirty = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._stopping = False
        self._maybe_work = True
        #: Delays may be due (at start: some may have come due while nobody ran).
        self._maybe_delays = True
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        #: Outcomes waiting for the committer, each with its waiting step task's future.
        self._outcomes: list[tuple[transactions.Completion, asyncio.Future[Advance]]] = []
        self._outcomes_queued = asyncio.Event()
        self._committer = False
        #: Step tasks that ended their step and wait for its outcome to be recorded.
        self._recording = 0
        #: The step runs whose tasks have not begun yet.
        self._unbegun: set[int] = set()

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.scope}>"

    # -- what callers see -----------------------------------------------------------------

    @property
    def running(self) -> int:
        """How many step runs this worker is executing."""
        return len(self._tasks) + len(self._pending)

    def taker(self, *, freeing: int = 0, ready: bool = False) -> Taker | None:
        """Lets a transaction claim the step runs it makes ready, up to our free capacity.

        Args:
            freeing: slots the caller is about to free (a completing step frees its own).
            ready: the transaction also claims step runs that were ready already, with
                what its budget has left (a group commit, while there may be such).
        """
        if self._stopping:
            return None
        free = (
            _UNLIMITED
            if self.config.concurrency is None
            else self.config.concurrency - self.running + freeing
        )
        return Taker(
            worker=self.id,
            budget=max(free, 0),
            hosts=self._hosts,
            lease=timedelta(seconds=self.config.lease),
            run_id=self.scope.run_id,
            ready=ready,
        )

    def apply(self, run_id: str, advance: Advance) -> None:
        """Take in what a transaction changed, and start the step runs it claimed for us."""
        for claim in advance.claims:
            self._start(claim)
        if advance.ready:
            self._maybe_work = True
        self._expect(advance)
        if (
            run_id == self.scope.run_id
            and advance.run_status is not self.status
            # An ended run does not run again under this worker (a group commit's earlier
            # completions may be taken in after the one that ended it).
            and self.status is RunStatus.running
        ):
            self.status = advance.run_status
            if self.on_status is not None:
                self.on_status(self.status)
        self._wake.set()

    async def trigger(self, graph: Graph, run_id: str, event: str, sequence: str) -> Advance:
        """Fire an event into a live run (from a handle or an in-loop step)."""
        self.run_log(graph.program, run_id).event(event, sequence)
        advance = await self.store.trigger(
            graph, run_id=run_id, event=event, sequence=sequence, take=self.taker()
        )
        self.apply(run_id, advance)
        return advance

    def run_log(self, program: ProgramDef, run_id: str) -> RunLog:
        """The program log of a run (``<log_dir>/<program>/<run_id>/program.log``).

        Its lines are appended soon after they are logged, by the worker's log writer
        (while the worker runs), and when the worker closes.
        """
        run_log = self._run_logs.get(run_id)
        if run_log is None:
            run_log = self._run_logs[run_id] = RunLog(
                run_log_dir(self.config.log_dir, program.name, run_id) / "program.log",
                run_id=run_id,
                program=program,
                level=self.config.log_level,
                deterministic=self.config.deterministic_logs,
                on_line=self._logs_dirty.set,
            )
        return run_log

    # -- the loop -------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event | None = None, *, ready: asyncio.Event | None = None
    ) -> None:
        """Work until ``stop`` is set (then drain) or, scoped to a run, until it ends."""
        if stop is not None:
            self._stop = stop
        notifier = self.store.notifier
        # A run's worker hears its run; an agent's only the queues of its hosts.
        wakeups = (
            notifier.subscribe(self.scope.run_id)
            if self.scope.hosts is None
            else notifier.subscribe_queues(self.scope.hosts)
        )
        try:
            with wakeups as remote:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    await self._beat()
                    side = [
                        tg.create_task(self._heartbeat_loop(), name="aeventor heartbeat"),
                        tg.create_task(self._reaper_loop(), name="aeventor reaper"),
                        tg.create_task(self._log_writer_loop(), name="aeventor log writer"),
                        tg.create_task(self._commit_loop(), name="aeventor committer"),
                    ]
                    pending, self._pending = self._pending, []
                    for claim in pending:
                        self._start(claim)
                    self.log.debug("worker.ready", scope=str(self.scope))
                    if ready is not None:
                        ready.set()
                    await self._claim_loop(remote)
                    if self._stop.is_set():
                        await self._drain()
                    elif self._tasks:
                        # The run ended. Its last step's task is only tidying up; a step
                        # still running here was cancelled from elsewhere (its run ended
                        # without it): one more beat tells us, and terminates it.
                        await self._round("heartbeat", self._beat)
                    for task in side:
                        task.cancel()
        finally:
            self._tg = None
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self.config.record_abandoned:
            await self._record_unrun()
        for run_log in self._run_logs.values():
            await run_log.flush()
        try:
            await self.store.worker_stopped(self.id)
        except AeventorError as exc:
            self.log.warning("worker.stop_not_recorded", error=str(exc))

    def _done(self) -> bool:
        return (
            self._stop.is_set()
            or self.idle
            or (self.scope.run_id is not None and self.status is not RunStatus.running)
        )

    def _free(self) -> int:
        """How many step runs the claim loop may claim now.

        Without a concurrency limit, a wide fan-out is claimed faster than its step tasks
        begin, and than the outcomes of its steps are recorded: every claimed step's task
        (its frame, context, logger) would stay alive until its outcome commits, thousands
        at once. The claim loop claims no more than :data:`RECORD_BACKLOG` such step runs
        instead: the step runs it leaves ready begin as soon as the loop and the store
        catch up, and the running steps are never counted (nor ever wait).
        """
        if self.config.concurrency is None:
            return max(min(_UNLIMITED, RECORD_BACKLOG - self._backlog), 0)
        return self.config.concurrency - self.running

    @property
    def _backlog(self) -> int:
        """Step runs claimed whose tasks have not begun, and ended whose outcomes are not
        yet recorded."""
        return len(self._unbegun) + self._recording

    @property
    def _serves(self) -> bool:
        """An agent's worker serves for ever: a store error is logged, never fatal. A run's
        worker fails its run with it instead (after the store's own retries)."""
        return self.scope.hosts is not None

    async def _round(self, what: str, action: Callable[[], Awaitable[object]]) -> None:
        """One round of a loop (claim, heartbeat, reap). A serving worker survives its
        errors: it logs them and backs off; a run's worker lets them end the run."""
        try:
            await action()
        except Exception as exc:
            if not self._serves:
                raise
            await self._survive(what, exc)

    async def _survive(self, what: str, exc: Exception) -> None:
        """Log an error of a serving worker and back off before it goes on (looking for work
        again: what failed may have been a claim).

        A store error is expected (an outage, a deadlock past its retries); anything else is
        a bad row or a bug, logged with its traceback, and still never stops the agent.
        """
        self._maybe_work = True
        self.log.error(
            f"worker.{what}_failed",
            error=str(exc),
            error_type=type(exc).__name__,
            exc_info=not isinstance(exc, AeventorError),
        )
        await wait_any(self._stop, poll=min(5.0, self.config.lease / 4))

    async def _claim_loop(self, remote: asyncio.Event) -> None:
        while not self._done():
            await self._round("claim", lambda: self._claim_once(remote))

    async def _claim_once(self, remote: asyncio.Event) -> None:
        """Reach due delays; claim what there is room for, or wait for a reason to look
        again."""
        if self._maybe_delays and not self._stopping:
            self._maybe_delays = False
            await self._mature_due()
        free = self._free()
        if free > 0 and self._maybe_work:
            self._maybe_work = False
            claims = await self.store.claim(
                worker=self.id,
                limit=free,
                run_id=self.scope.run_id,
                hosts=self.scope.hosts,
                lease=timedelta(seconds=self.config.lease),
            )
            if len(claims) == free:
                self._maybe_work = True
            for claim in claims:
                self._start(claim)
            if self.scope.run_id is not None and not claims and not self._tasks:
                # Nothing runs and nothing is ready: the run may have ended in a
                # transaction we did not see (cancelled, or advanced by another
                # process). Read it back.
                status = await self.store.run_status(self.scope.run_id)
                self.apply(self.scope.run_id, Advance(0, status))
                if self.config.until_idle and status is RunStatus.running:
                    due = await self.store.next_delay(run_id=self.scope.run_id)
                    # Nothing is due now (a delay due now is reached on the next round).
                    self.idle = due is None or due > 0
                return
            if self._maybe_work:
                return
        await self._wait(remote)

    async def _mature_due(self) -> None:
        """Reach the targets of the delays that are due (of our run, or of distributed runs
        for an agent), then set a timer for the next one."""
        for delay in await self.store.due_delays(run_id=self.scope.run_id):
            try:
                graph = await self._graph_for_run(delay.run_id)
            except (Refused, NoResult) as exc:
                self.log.error("delay.refused", run_id=delay.run_id, reason=str(exc))
                continue
            advance = await self.store.mature(graph, delay, take=self.taker())
            if advance.recorded:
                self.log.info(
                    "delay.reached",
                    run_id=delay.run_id,
                    after=delay.event,
                    target=delay.target,
                    sequence=delay.sequence,
                )
            self.apply(delay.run_id, advance)
        self._expect(
            Advance(
                0, RunStatus.running, due_in=await self.store.next_delay(run_id=self.scope.run_id)
            )
        )

    async def _graph_for_run(self, run_id: str) -> Graph:
        """The program of a run; :class:`Refused` if it cannot be trusted or read."""
        try:
            return await self.programs.graph_for(run_id)
        except AeventorError:  # Refused, NoResult, a store error: the caller's to judge
            raise
        except Exception as exc:
            raise Refused(
                f"run {run_id}: its program cannot be loaded ({type(exc).__name__}: {exc})"
            ) from exc

    async def _wait(self, remote: asyncio.Event) -> None:
        poll = self.store.poll_interval
        if self.scope.run_id is not None and not self._tasks:
            # Nothing of ours runs, yet the run goes on: only another process (or a change
            # we were not told of) can move it. Never wait for that unboundedly.
            poll = min(poll or IDLE_POLL, IDLE_POLL)
        if self._due:
            # A retry becomes claimable then: be there.
            until = max(self._due[0] - self._monotonic(), 0.0)
            poll = until if poll is None else min(poll, until)
        await wait_any(self._wake, remote, self._stop, poll=poll)
        due = False
        while self._due and self._due[0] <= self._monotonic():
            heapq.heappop(self._due)
            due = True
        if due or not self._wake.is_set():
            # A retry's or a delay's time, or the poll interval: delays may be due.
            self._maybe_delays = True
        if due or remote.is_set() or not self._wake.is_set():
            # Woken by another process, a retry's time, or the poll interval: look for work.
            self._maybe_work = True
        remote.clear()
        self._wake.clear()

    async def _drain(self) -> None:
        """Stop claiming; give running steps ``grace`` seconds, then terminate them."""
        self._stopping = True
        running = list(self._tasks.values())
        if not running:
            return
        self.log.info("worker.draining", running=len(running), grace=self.config.grace)
        _, pending = await asyncio.wait(running, timeout=self.config.grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- one claim --------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        if self._tg is None:
            # Claimed before the loop started (by the run's first transaction).
            self._pending.append(claim)
            return
        self._claims[claim.id] = claim
        self._unbegun.add(claim.id)
        self._tasks[claim.id] = self._tg.create_task(
            self._execute(claim), name=f"aeventor step {claim.step}[{claim.sequence}]"
        )

    async def _execute(self, claim: Claim) -> None:
        """Execute one claim and record its outcome with everything it causes."""
        self._unbegun.discard(claim.id)
        bound = self.log.bind(run_id=claim.run_id, step=claim.step, sequence=claim.sequence)
        graph: Graph | None = None
        try:
            try:
                graph = await self._graph_for(claim)
                try:
                    self.programs.check_claim(graph, claim)
                except Refused:
                    # Its run may have moved to another program version since we last read
                    # it (a forced recovery): judge it by the run's program as it is now.
                    if not self.programs.forget(claim.run_id):
                        raise
                    graph = await self._graph_for(claim)
                    self.programs.check_claim(graph, claim)
                self.programs.check_step(graph.program, claim.step)
            except (Refused, NoResult) as exc:
                bound.error("step.refused", reason=str(exc))
                await self.store.fail_untrusted(claim, error=f"refused by worker {self.id}: {exc}")
                return
            run_log = self.run_log(graph.program, claim.run_id)
            result = await self._launch(graph, claim, run_log, bound)
            if result is None:
                # Taken from us before we could start it (requeued or reaped while we
                # were cut off): whoever holds it now runs it. Nothing ran, nothing to record.
                bound.warning(
                    "step.not_started",
                    reason="the step run is no longer this worker's; it was not started",
                )
                return
            status = StepStatus.success if result.ok else StepStatus.failure
            retry_after = self._retry_after(
                graph,
                claim,
                status,
                exit_code=result.value if step_is_command(graph, claim) else None,
                error=result.error,
            )
            outcome = transactions.Completion(
                graph, claim, status, result.value, result.error, retry_after
            )
            while True:
                try:
                    advance = await self._record(outcome)
                    break
                except ConnectionLost as exc:
                    # The database has been gone longer than the store retries. An agent
                    # holds on to the outcome (and the lease, once the database is back)
                    # and tries again; the retry recognises a commit it cannot have heard.
                    if not self._serves or self._stop.is_set():
                        raise
                    await self._survive("complete", exc)
            if not advance.recorded:
                # Cancelled meanwhile, or our lease was taken (reaped, requeued): the store
                # keeps the outcome it has; ours came under a stale fencing token.
                bound.warning(
                    "step.outcome_refused",
                    status=status.value,
                    reason="the step run is no longer this worker's (cancelled, or its "
                    "lease was taken)",
                )
            bound.info("step.ended", status=status.value)
            run = {"recovery": claim.recovery, "attempt": claim.attempt}
            if result.ok:
                run_log.step(claim.step, claim.sequence, "success", **run)
            else:
                last = (result.error or "").strip().splitlines()[-1:] or [""]
                run_log.step(
                    claim.step, claim.sequence, f"failure: {last[0]}", level=logging.ERROR, **run
                )
                if advance.due_in is not None:
                    # The backoff's jitter is random: not in a log meant to be diffed.
                    when = "" if self.config.deterministic_logs else f" in {advance.due_in:.3g}s"
                    run_log.step(claim.step, claim.sequence, f"retried{when}", **run)
            self.apply(claim.run_id, advance)
        except asyncio.CancelledError:
            if graph is not None and self.config.record_abandoned:
                await asyncio.shield(self._record_abandoned(graph, claim, bound))
            raise
        except Exception as exc:
            if not self._serves:
                raise
            # The store failed us for this step run only (a value it cannot hold, a row it
            # cannot read): record that, and serve on. If even that fails, the step run is
            # no longer held, its lease lapses and the reaper records it lost.
            bound.error("step.unrecorded", error=str(exc), error_type=type(exc).__name__)
            await asyncio.shield(self._fail_quietly(claim, f"{type(exc).__name__}: {exc}"))
        finally:
            self._tasks.pop(claim.id, None)
            self._claims.pop(claim.id, None)
            self._revoked.discard(claim.id)
            self._wake.set()
            forgotten = self._forget_run_log(claim.run_id)
            if forgotten is not None:
                await asyncio.shield(forgotten.flush())

    async def _record(self, outcome: transactions.Completion) -> Advance:
        """Record a step run's end through the committer; its advance."""
        future: asyncio.Future[Advance] = asyncio.get_running_loop().create_future()
        self._outcomes.append((outcome, future))
        self._outcomes_queued.set()
        self._recording += 1
        try:
            if not self._committer:
                # The committer has stopped (the worker is closing): commit ourselves.
                await self._commit(self._take_outcomes())
            return await future
        finally:
            self._recording -= 1

    def _take_outcomes(self) -> list[tuple[transactions.Completion, asyncio.Future[Advance]]]:
        self._outcomes_queued.clear()
        batch, self._outcomes = self._outcomes, []
        return batch

    async def _commit_loop(self) -> None:
        """Group commit: record every outcome queued while the previous transaction ran in
        one transaction (each step's end still commits with all it causes)."""
        self._committer = True
        try:
            while True:
                await self._outcomes_queued.wait()
                batch = self._take_outcomes()
                if batch:
                    await self._commit(batch)
        finally:
            self._committer = False
            # What was queued as it stopped is committed by its own tasks (_record).
            if self._outcomes:
                self._outcomes_queued.set()

    async def _commit(
        self, batch: list[tuple[transactions.Completion, asyncio.Future[Advance]]]
    ) -> None:
        # While the claim loop found more ready than it had room for, the batch's
        # transaction fills the room the batch frees: one transaction a round, not two.
        fill = self._maybe_work
        if len(batch) > 1 or fill:
            take = self.taker(freeing=len(batch), ready=fill)
            try:
                advances = await self.store.complete_many(
                    [outcome for outcome, _ in batch], take=take
                )
            except ConnectionLost as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            except Exception as exc:  # noqa: BLE001 - each outcome is tried alone below
                # One outcome the store refuses (a value it cannot hold, a statement
                # timeout) must not fail the others: record them one by one.
                self.log.info("step.group_commit_split", size=len(batch), error=str(exc))
            else:
                if take is not None and take.ready:
                    # Less than asked for: nothing more is ready (until someone says so).
                    taken = sum(len(advance.claims) for advance in advances)
                    self._maybe_work = taken >= take.budget
                for (_, future), advance in zip(batch, advances, strict=True):
                    if not future.done():
                        future.set_result(advance)
                return
        for index, (outcome, future) in enumerate(batch):
            try:
                advance = await self.store.complete(
                    outcome.graph,
                    outcome.claim,
                    status=outcome.status,
                    result=outcome.result,
                    error=outcome.error,
                    take=self.taker(freeing=len(batch) - index),
                    retry_after=outcome.retry_after,
                )
            except Exception as exc:  # noqa: BLE001 - raised in the step's own task
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(advance)

    async def _graph_for(self, claim: Claim) -> Graph:
        """The program of a claim; :class:`Refused` if it cannot be trusted or read, or
        does not have the claimed step (one bad row fails its step run, nothing more)."""
        graph = await self._graph_for_run(claim.run_id)
        if claim.step not in graph.program.steps:
            raise Refused(f"step {claim.step!r} is not in program {graph.program.name!r}")
        return graph

    def _forget_run_log(self, run_id: str) -> RunLog | None:
        """An agent serves runs for ever: keep a run's program log only while it has step
        runs here (a run-scoped worker keeps its one log until it closes). The log let go
        of, for the caller to flush (a step's end never creates a task for nothing)."""
        if run_id == self.scope.run_id or any(c.run_id == run_id for c in self._claims.values()):
            return None
        return self._run_logs.pop(run_id, None)

    async def _record_abandoned(self, graph: Graph, claim: Claim, bound: Any) -> None:
        if claim.id in self._revoked:
            return  # cancelled in the store, or taken from us: nothing of ours to record
        reason = (
            f"terminated: worker {self.id} shut down and the step outlived the "
            f"{self.config.grace:g}s grace period"
            if self._stopping
            else f"terminated: worker {self.id} was cancelled"
        )
        bound.warning("step.terminated", reason=reason)
        await self.store.complete(graph, claim, status=StepStatus.failure, error=reason)

    async def _record_unrun(self) -> None:
        """Record as terminated the step runs still leased to us once none of ours runs.

        A store operation runs to its end even when its caller is cancelled, so a cancel can
        cost us the claims a committed transaction (a claim, a step's start or end) made for
        us; and a step cancelled while its program loads has nothing to record its end with.
        Such step runs would stay active, unrecorded, until a reaper finds their lease lapsed.
        """
        try:
            for claim in await self.store.active_claims(worker=self.id):
                reason = f"terminated: worker {self.id} stopped before it ran the step to its end"
                self.log.warning(
                    "step.terminated", run_id=claim.run_id, step=claim.step, reason=reason
                )
                await self._give_up(claim, reason, status=StepStatus.failure)
        except AeventorError as exc:
            # Their leases lapse, and a reaper records them lost.
            self.log.warning("worker.unrun_not_recorded", error=str(exc))

    async def _launch(
        self, graph: Graph, claim: Claim, run_log: RunLog, bound: Any
    ) -> ExecResult | None:
        """Run the step; None if it was not started because the claim is no longer ours."""
        executor, step = self.route(graph.program.steps[claim.step])
        program = graph.program.name
        env = launch_env(claim, step, program=program, logger_name=f"{program}.step")

        def log_started(pid: int | None = None) -> None:
            what = (
                "started" if pid is None or self.config.deterministic_logs else f"started pid={pid}"
            )
            run_log.step(
                claim.step,
                claim.sequence,
                what,
                recovery=claim.recovery,
                attempt=claim.attempt,
                phase=STARTED,
            )

        async def on_started(pid: int) -> None:
            bound.info("step.started", pid=pid, host=step.host)
            log_started(pid)
            self.apply(claim.run_id, await self.store.started(graph, claim, pid=pid))

        fenced_out = False

        async def fence(pid: int) -> bool:
            """The start's one transaction, once the process exists (see below)."""
            nonlocal fenced_out
            advance = await self.store.started(graph, claim, pid=pid)
            if not advance.recorded:
                fenced_out = True
                return False
            bound.info("step.started", pid=pid, host=step.host)
            log_started(pid)
            self.apply(claim.run_id, advance)
            return True

        async def fire(event: str, sequence: str) -> None:
            """An event the step fires (in-loop, or from its process over its channel)."""
            if event not in graph.program.events:
                raise ProgramDefinitionError(
                    f"step {claim.step!r} fired undefined event {event!r}; define it with "
                    f"ev.add_event({event!r})"
                )
            advance = await self.trigger(graph, claim.run_id, event, sequence)
            if not advance.recorded:
                raise AeventorError(
                    f"run {claim.run_id} has ended ({advance.run_status.value}); "
                    f"event {event!r} was not fired"
                )

        context = None
        if step.executor == "inloop":
            context = StepContext(
                run_id=claim.run_id,
                program=program,
                step=claim.step,
                sequence=claim.sequence,
                recovery=claim.recovery,
                attempt=claim.attempt,
                env=env,
                _trigger=fire,
            )
        spawns = step.executor in ("warm", "process", "command") and (
            step.target is not None or step.argv is not None
        )
        # An executor that can hold a forked process back before it runs any of the step's
        # code (the warm pool) fences the start itself, in one transaction instead of two:
        # ``started`` records the real pid while the claim is still ours (the same check as
        # ``launching``), and the process runs the step only once that committed. Until
        # then the row has no pid, so a worker that dies meanwhile has its claim requeued:
        # right, as nothing of the step ran (its held-back process dies with the worker,
        # through its lifeline). Killing a step never needs the recorded pid: the worker
        # terminates what it runs, and its lifeline what a dead worker ran.
        fences = getattr(executor, "fences", None)
        fenced_by_executor = spawns and fences is not None and bool(fences(step))
        if not spawns:
            bound.info("step.started", host=step.host)
            log_started()
            self.apply(claim.run_id, await self.store.started(graph, claim))
        elif not fenced_by_executor and not await self.store.launching(claim):
            # Fencing at the start: only while the claim is still ours does the store mark
            # it started (before the process exists), so a reaper records it lost instead
            # of requeueing it, and a worker whose claim was taken never starts it.
            return None
        launch = StepLaunch(
            claim=claim,
            step=step,
            program=program,
            env=env,
            log_path=step_log_path(
                run_log.path.parent,  # the run's log directory
                claim.step,
                claim.sequence,
                claim.attempt,
                claim.recovery,
            ),
            deterministic_logs=self.config.deterministic_logs,
            log_level=self.config.log_level,
            on_started=on_started,
            func=self.funcs.get(claim.step) if step.executor == "inloop" else None,
            context=context,
            on_trigger=fire,
            fence=fence if fenced_by_executor else None,
        )
        try:
            if step.timeout is None:
                result = await executor.run(launch)
            else:
                async with asyncio.timeout(step.timeout) as limit:
                    result = await executor.run(launch)
            return None if fenced_out else result
        except ExecutorError as exc:
            if fenced_out:
                return None
            return ExecResult(ok=False, error=await describe_exception(exc))
        except TimeoutError:
            if step.timeout is None or not limit.expired():
                raise  # not ours: whatever raised it is the step's failure to report
            bound.warning("step.timed_out", timeout=step.timeout)
            return ExecResult(
                ok=False,
                error=f"TimeoutError: step {claim.step}[{claim.sequence}] ran longer than its "
                f"timeout of {step.timeout:g}s and was terminated",
            )

    # -- leases -----------------------------------------------------------------------------

    def _held(self) -> dict[int, str | None]:
        """The step runs this worker holds (running, or about to), by id, with their token."""
        held = {claim.id: claim.token for claim in self._claims.values()}
        held.update((claim.id, claim.token) for claim in self._pending)
        return held

    async def _beat(self) -> None:
        revoked = await self.store.heartbeat(
            worker=self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            hosts=list(self.scope.hosts or ()),
            lease=timedelta(seconds=self.config.lease),
            held=self._held(),
        )
        now = self._monotonic()
        if self._last_beat is not None and now - self._last_beat > self.config.lease / 2:
            # Our beats stopped for a while (a database outage, or this process was frozen):
            # others' leases could not be renewed either. Let their owners renew them first.
            self._healthy_since = now
        self._last_beat = now
        for step_run_id, status in revoked.items():
            self.revoke(step_run_id, status)

    def revoke(self, step_run_id: int, status: StepStatus = StepStatus.cancelled) -> None:
        """The step run is no longer ours (``status`` says what it became): terminate it if
        it runs here, and record nothing of it."""
        task = self._tasks.get(step_run_id)
        if task is None or step_run_id in self._revoked:
            return
        self._revoked.add(step_run_id)
        # Cancelled before it began, its task never runs a line of its own.
        self._unbegun.discard(step_run_id)
        if status is StepStatus.cancelled:
            self.log.info("step.cancelled", step_run_id=step_run_id)
        else:
            self.log.warning(
                "step.lease_lost",
                step_run_id=step_run_id,
                status=status.value,
                reason="its lease was taken while this worker could not renew it; "
                "terminating the step",
            )
        task.cancel()

    def holding(self, run_id: str, step: str, sequence: str) -> int | None:
        """The id of the step run of ``step`` for ``sequence`` of the run, if it runs here."""
        for claim in self._claims.values():
            if (claim.run_id, claim.step, claim.sequence) == (run_id, step, sequence):
                return claim.id
        return None

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.beat_every)
            await self._round("heartbeat", self._beat)

    async def _log_writer_loop(self) -> None:
        """Append the program logs' new lines soon after they are logged, off the loop.

        One write per log per round, :data:`LOG_BATCH` seconds after the first line of the
        round: a wide fan-out costs a few writes a second, not one per line or per step.
        """
        while True:
            await self._logs_dirty.wait()
            # Let the lines of what ends about now join this write.
            await asyncio.sleep(LOG_BATCH)
            self._logs_dirty.clear()
            await self._round("log", self._flush_run_logs)

    async def _flush_run_logs(self) -> None:
        for run_log in list(self._run_logs.values()):
            await run_log.flush()

    async def _reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease / 2)
            await self._round("reap", self.reap)
            await self._round("admit", self._admit_waiting)

    async def _admit_waiting(self) -> None:
        """Give waiting step runs the slots of holders that died (their leases lapsed, no
        release recorded yet), and look for the work that makes ready."""
        if not self._may_reap():
            return
        if self.scope.run_id is not None:
            # A run whose program takes no slots has nothing waiting for any.
            graph = await self._graph_for_run(self.scope.run_id)
            if not graph.slots:
                return
        if await self.store.admit_waiting(run_id=self.scope.run_id):
            self._maybe_work = True
            self._wake.set()

    async def reap(self) -> int:
        """Deal with the step runs nobody will finish; return how many were recorded.

        An agent (``reap``) looks at every worker's; a run's worker at its run's, which can
        only be its own (or a dead predecessor's). A step run that started is recorded
        ``lost`` (its failure triggers fire); one that never started is requeued. Nothing
        is reaped until this worker has beaten regularly for a whole lease (see
        :meth:`_beat`).
        """
        if self.scope.run_id is None and not self.config.reap:
            return 0
        if not self._may_reap():
            return 0
        reaped = 0
        lapsed = await self.store.lapsed_leases(run_id=self.scope.run_id, worker=self.id)
        held = self._held()
        for claim in lapsed:
            # Asked again for each: the query may have waited out an outage, during which
            # nobody could renew anything.
            if not self._may_reap():
                break
            if claim.id in held:
                continue  # ours and running: the next beat renews it
            self.log.warning(
                "step.lost", run_id=claim.run_id, step=claim.step, started=claim.pid is not None
            )
            try:
                reaped += await self._give_up(
                    claim,
                    "lost: its worker stopped renewing its lease (it died, hung or lost the "
                    "database) while the step ran",
                    status=StepStatus.lost,
                    only_if_lapsed=True,
                )
            except ConnectionLost:
                raise
            except Exception as exc:
                if not self._serves:
                    raise
                # One step run that cannot be recorded does not keep the others lapsed.
                self.log.error(
                    "step.loss_not_recorded",
                    run_id=claim.run_id,
                    step=claim.step,
                    error=str(exc),
                    exc_info=not isinstance(exc, AeventorError),
                )
        return reaped

    def _may_reap(self) -> bool:
        """Whether this worker's own heartbeats have been regular for a whole lease, up to
        now: only then can it tell a dead owner from one that could not renew either."""
        now = self._monotonic()
        return (
            self._last_beat is not None
            and now - self._last_beat < self.config.lease / 2
            and now - self._healthy_since >= self.config.lease
        )

    async def _give_up(
        self, claim: Claim, error: str, *, status: StepStatus, only_if_lapsed: bool = False
    ) -> bool:
        """A step run its worker will not finish: requeued if it never started (no pid),
        else recorded with ``status`` (its failure triggers fire)."""
        if claim.pid is None:
            advance = await self.store.requeue(claim, only_if_lapsed=only_if_lapsed)
            if advance.ready:
                self._maybe_work = True
                self._wake.set()
            return advance.recorded
        return await self._fail(claim, error, status=status, only_if_lapsed=only_if_lapsed)

    async def _fail_quietly(self, claim: Claim, error: str) -> None:
        try:
            await self._fail(claim, error)
        except AeventorError as exc:
            self.log.error("step.failure_not_recorded", step_run_id=claim.id, error=str(exc))

    async def _fail(
        self,
        claim: Claim,
        error: str,
        *,
        status: StepStatus = StepStatus.failure,
        only_if_lapsed: bool = False,
    ) -> bool:
        """Record a step run nobody will finish with ``status`` (its failure triggers fire,
        unless its program cannot be trusted or read: then its run stops); whether it was
        recorded."""
        try:
            graph = await self._graph_for(claim)
            # A row nobody signed must not make us fire its failure triggers (and sign what
            # they make ready).
            self.programs.check_claim(graph, claim, executing=False)
        except Refused:
            refused = await self.store.fail_untrusted(
                claim, error=error, status=status, only_if_lapsed=only_if_lapsed
            )
            return refused.recorded
        except NoResult:
            return False
        advance = await self.store.complete(
            graph,
            claim,
            status=status,
            error=error,
            only_if_lapsed=only_if_lapsed,
            retry_after=self._retry_after(graph, claim, status, exit_code=None, error=error),
        )
        if advance.ready:
            # What the failure made ready may be ours; our own NOTIFY does not wake us.
            self._maybe_work = True
            self._wake.set()
        self._expect(advance)
        return advance.recorded

    def _retry_after(
        self,
        graph: Graph,
        claim: Claim,
        status: StepStatus,
        *,
        exit_code: Any,
        error: str | None,
    ) -> float | None:
        """The backoff before the next attempt, if the step's retry policy retries this
        outcome (the transaction checks the attempt count again)."""
        retry = graph.program.steps[claim.step].retry
        if retry is None or not retry.retries(
            claim.attempt,
            status,
            exit_code=exit_code if isinstance(exit_code, int) else None,
            error=error,
        ):
            return None
        return retry.delay(claim.attempt, self._random())

    def _expect(self, advance: Advance) -> None:
        """Remember when a step run an advance made (a retry) becomes claimable."""
        if advance.due_in is not None:
            # A little after: the store's clock decides, and it may be a moment behind.
            heapq.heappush(self._due, self._monotonic() + advance.due_in + DUE_SLACK)
            self._wake.set()
