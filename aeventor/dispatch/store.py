"""The narrow store interface the dispatch core is written against.

A store offers two things:

- :class:`StoreTx`, the primitive reads and writes of one transaction (lock a run, end a step
  run, which events fired, insert triggers and step runs, count what is pending, ...). The
  transactions that advance a run (:mod:`aeventor.dispatch.transactions`) are written once,
  against these primitives; every store runs them inside :meth:`Store.write`.
- :class:`Store`, the operations around transactions: claiming, leases and heartbeats,
  reading runs, and wake-ups (:class:`Notifier`).

The SQL stores (:mod:`aeventor.backends.stores`) and the in-memory store of
:mod:`aeventor.testing` implement both; nothing in :mod:`aeventor.dispatch` imports a
concrete store.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import uuid
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ..program.model import ProgramDef, RunStatus, StepStatus
from ..records import RunResult
from . import transactions
from ._state import Graph
from .claims import (
    Advance,
    Claim,
    Delay,
    NewStepRun,
    Recovery,
    RunLock,
    RunOrigin,
    RunWorkers,
    StepEnd,
    StepRunState,
    StoredProgram,
    Taker,
)
from .pools import Waiter

__all__ = (
    "Advance",
    "Claim",
    "NewStepRun",
    "Notifier",
    "Recovery",
    "RunLock",
    "RunOrigin",
    "RunWorkers",
    "StepEnd",
    "StepRunState",
    "Store",
    "StoreTx",
    "StoredProgram",
    "Taker",
)

_T = TypeVar("_T")


class StoreTx(Protocol):
    """The primitives of one write transaction (see the module docstring).

    Every write is conditional where a retry could repeat it: an insert skips rows whose
    unique key exists, a step run ends only while it is active.
    """

    #: Whether inserted step runs can be claimed in the same statement (RETURNING).
    claims_on_insert: bool
    #: True when this transaction runs again after a lost connection: the first attempt may
    #: have committed unacknowledged, and the transaction returns what that commit did.
    retried: bool
    #: Seconds until the earliest delay this transaction stored is due (None: none stored).
    earliest_delay: float | None

    async def lock_run(self, run_id: str) -> RunLock:
        """Lock the run row for the rest of the transaction; NoResult if there is none."""

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
    ) -> None: ...

    async def end_steps(self, ends: Sequence[StepEnd]) -> set[int]:
        """Lock these step runs in id order (where the store has row locks) and end each
        that is active under its fencing token, as :meth:`end_step` does one, in as few
        statements as the store can; the ids it ended."""

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
        """End a step run active under fencing ``token``; False if it is not (cancelled,
        taken from the claimer, already ended), or if ``only_if_lapsed`` and its lease holds
        on the server's clock."""

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
        """:meth:`lock_run` then :meth:`end_step`, in one statement where the store can:
        the run as locked when it ended the step run. None when it did not end it, or
        cannot do both at once (then the caller does both, as usual)."""

    async def requeue_step(
        self, claim_id: int, *, token: str | None, only_if_lapsed: bool = False
    ) -> bool:
        """Put a claimed step run that never started (no pid, not even the 0 of
        :meth:`Store.launching`) back to ready; False as for end_step."""

    async def step_state(self, step_run_id: int) -> tuple[StepStatus, str | None] | None:
        """A step run's status and fencing token (None if there is no such step run)."""

    async def claimed(self, *, worker: str, token: str) -> list[Claim]:
        """The step runs active under ``worker`` with fencing ``token``, by id."""

    async def claim_ready(self, take: Taker) -> list[Claim]:
        """Claim up to ``take.budget`` ready step runs of ``take.run_id`` (or queued for
        ``take.hosts``) for ``take.worker`` under ``take.token``, passing over those other
        claimers hold, as :meth:`Store.claim` does in a transaction of its own."""

    async def set_pid(self, step_run_id: int, pid: int, *, token: str | None) -> bool:
        """Record a claimed step's process, while the claim is still the caller's."""

    async def fired(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        groups: Iterable[AbstractSet[str]],
    ) -> AbstractSet[str]:
        """A set holding which events of ``groups`` (:meth:`Graph.fact_groups`) already
        fired for this run, sequence and recovery; it may hold other events of it that
        fired. The caller only reads it, before the transaction's next statement."""

    async def fire_new(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> AbstractSet[str] | None:
        """Record ``events`` as fired for this run, sequence and recovery, and return those
        of them that had fired before, in one statement; None if the store cannot tell in
        one (then the caller asks :meth:`fired` and calls :meth:`add_triggers`).
        :meth:`add_triggers` does not write them again."""

    async def add_triggers(
        self, run_id: str, sequence: str, recovery: int, events: Sequence[str]
    ) -> None: ...

    async def add_step_runs(self, rows: Sequence[NewStepRun]) -> None:
        """Insert step runs (ready, waiting or skipped), skipping existing ones; a row with
        ``needs`` gets the slots it waits for (once), and their pools exist from then on."""

    async def slot_waiters(self, keys: Sequence[str]) -> tuple[dict[str, int], list[Waiter]]:
        """Lock the pools ``keys`` and those their waiting step runs also need (in key
        order), and return the slots held per pool (a holder whose worker's lease and own
        lease both lapsed holds none) and the waiting step runs in the order they are served
        (priority, then first come)."""

    async def admit_step_runs(self, step_run_ids: Sequence[int]) -> list[tuple[str, str | None]]:
        """Give waiting step runs their slots and make them ready; their ``(run, queue)``."""

    async def waiting_pools(self, run_id: str | None) -> set[str]:
        """The pools step runs (of the run, or of any) wait for."""

    async def release_slots(self, run_id: str) -> set[str]:
        """Free the slots of the run's step runs that ended (every slot of the run once it
        ended); return the pools that gained room."""

    async def hand_over_slots(
        self,
        run_id: str,
        step_run_id: int,
        *,
        keep: Mapping[str, int],
        release: Mapping[str, int],
    ) -> None:
        """A step run with its own ``releases`` ended: its run keeps ``keep`` slots of
        those pools, and gives back ``release`` slots it kept before."""

    async def add_claimed_step_runs(
        self, rows: Sequence[NewStepRun], *, worker: str, lease: timedelta, token: str
    ) -> list[Claim]:
        """Insert step runs already active, leased to ``worker`` under fencing ``token``."""

    async def pending(self, run_id: str, *, delays: bool = True) -> int:
        """Nonzero while the run has something to do: a step run waiting, ready or active,
        or (with ``delays``) a delay not reached yet. Not a count: a store may stop at the
        first it finds."""

    async def add_delays(
        self,
        run_id: str,
        sequence: str,
        recovery: int,
        delays: Sequence[tuple[str, str, str, float]],
    ) -> None:
        """Store fired delayed associations ``(event, kind, target, seconds)``, due that
        many seconds from now on the store's clock (each once: a duplicate is ignored);
        lowers :attr:`earliest_delay`."""

    async def take_delay(self, delay_id: int) -> bool:
        """Mark a delay reached, unless it already was; whether this call did."""

    async def stop_run(self, run_id: str, reason: str | None) -> None:
        """Mark the run stopped and its ready and waiting step runs skipped (None keeps its
        reason)."""

    async def end_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        """Set the final status of a running run."""

    async def cancel_step_runs(self, run_id: str) -> None:
        """Mark every ready and active step run of the run cancelled."""

    async def pending_step_run(
        self, run_id: str, step: str, sequence: str
    ) -> tuple[int, int] | None:
        """The ready or active step run of ``step`` for ``sequence``, as ``(id, recovery)``."""

    async def cancel_step_run(self, step_run_id: int, error: str) -> bool:
        """Mark a ready or active step run cancelled (whoever holds it); whether it was."""

    async def holders(self, run_id: str) -> set[str]:
        """The workers of the run's active step runs."""

    async def set_controller(self, run_id: str, controller: str) -> None:
        """Record the worker now driving the run."""

    async def supersede_step_runs(self, run_id: str, error: str) -> int:
        """Close the run's pending step runs for recovery: active ones ``lost`` (with
        ``error``), ready and waiting ones ``cancelled``; return how many."""

    async def step_run_states(self, run_id: str) -> list[StepRunState]:
        """Every step run of the run, in creation order."""

    async def fired_in(self, run_id: str, recovery: int) -> list[tuple[str, str]]:
        """The ``(sequence, event)`` pairs fired in one recovery generation of the run."""

    async def earlier_outcomes(
        self, run_id: str, sequence: str, recovery: int, steps: Sequence[str]
    ) -> dict[str, StepStatus]:
        """The latest status of each of ``steps`` (for ``sequence``) in the generations
        before ``recovery``; steps without a step run there are absent."""

    async def resume_run(
        self,
        run_id: str,
        *,
        recovery: int,
        replay: str,
        controller: str | None,
        program: tuple[int, str | None] | None = None,
    ) -> None:
        """Start a new recovery generation: running again, not stopped, no reason nor end;
        ``program`` switches the run to another (program id, run signature)."""

    def notify(
        self, run_id: str, queues: Collection[str | None] = (), *, here: bool = False
    ) -> None:
        """Tell other processes, at commit, that the run (and these queues) may have work;
        with ``here``, this process's workers too (work the caller's advance does not
        count: another run's)."""


class Notifier:
    """Wake-ups from other processes (LISTEN/NOTIFY), keyed by run id or by queue.

    Changes made by this process wake its workers directly (each transaction returns
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


class Store(abc.ABC):
    """What the dispatch core needs of a store.

    Subclasses implement the abstract primitives; the transactions that advance a run are
    defined here once, on top of :meth:`write`.

    .. versionadded:: 0.1
    """

    #: Seconds between polls for work made by other processes (None: wake-ups always come).
    poll_interval: float | None
    notifier: Notifier

    #: The largest text value one statement can carry (a step's JSON result or error text,
    #: a program definition), in bytes as :meth:`value_size` counts them; None: no
    #: practical limit. MariaDB/MySQL set it from the server's ``max_allowed_packet`` when
    #: they open. :meth:`complete` never sends a larger value: an oversized result is
    #: recorded as the step's failure, an oversized error text is truncated.
    #:
    #: .. versionadded:: 0.1
    max_value_bytes: int | None = None

    def value_size(self, text: str) -> int:
        """The bytes ``text`` takes against :attr:`max_value_bytes`: its UTF-8 length here;
        a store that escapes values into the statement's text counts the escapes too."""
        # ASCII (a program's canonical definition always is): one byte a character, no copy.
        return len(text) if text.isascii() else len(text.encode())

    def describe_limit(self) -> str:
        """What sets :attr:`max_value_bytes`, for error messages."""
        if self.max_value_bytes is None:
            return "this store has no value size limit"
        return f"this store takes at most {self.max_value_bytes:,} bytes per value"

    def how_to_raise_limit(self) -> str | None:
        """How to raise :attr:`max_value_bytes`, for error messages (None: it cannot be)."""
        return None

    def oversize(self, what: str, text: str, *, fix: str) -> str | None:
        """None when ``text`` fits in :attr:`max_value_bytes`; else why it does not.

        Args:
            what: the value, for the message ("step s1[0]'s result").
            fix: what the user can do besides raising the limit ("return less").
        """
        limit = self.max_value_bytes
        if limit is None:
            return None
        size = self.value_size(text)
        if size <= limit:
            return None
        how = self.how_to_raise_limit()
        return f"{what} is {size:,} bytes; {self.describe_limit()}: {fix}" + (
            f", or {how}" if how else ""
        )

    # -- primitives ---------------------------------------------------------------------

    @abc.abstractmethod
    async def write(self, operation: Callable[[StoreTx], Awaitable[_T]]) -> _T:
        """Run ``operation`` in one write transaction (retried whole on a lost connection)."""

    @abc.abstractmethod
    async def claim(
        self,
        *,
        worker: str,
        limit: int,
        run_id: str | None = None,
        hosts: Sequence[str] | None = None,
        lease: timedelta = timedelta(seconds=30),
    ) -> list[Claim]:
        """Atomically take up to ``limit`` ready step runs (of one run, or of host queues)."""

    @abc.abstractmethod
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
        """Renew the worker's lease and those of the step runs it holds (id -> token).

        Leases are set on the store's clock (the database server's). Returns the held step
        runs that are no longer the worker's, with their status (cancelled from anywhere,
        or taken from it while it could not renew them), for it to terminate.
        """

    @abc.abstractmethod
    async def worker_stopped(self, worker: str) -> None: ...

    @abc.abstractmethod
    async def lapsed_leases(
        self, *, limit: int = 100, run_id: str | None = None, worker: str | None = None
    ) -> list[Claim]:
        """Active step runs nobody will finish: their lease and their worker's lapsed (or,
        ``worker`` being the caller, the caller no longer holds them)."""

    @abc.abstractmethod
    async def active_claims(self, *, worker: str) -> list[Claim]:
        """The step runs still active under ``worker``'s lease, whatever their lease says."""

    @abc.abstractmethod
    async def run_status(self, run_id: str) -> RunStatus: ...

    @abc.abstractmethod
    async def load_result(self, run_id: str) -> RunResult: ...

    @abc.abstractmethod
    async def run_origin(self, run_id: str) -> RunOrigin:
        """The run's program id, mode and signature (NoResult if there is no such run)."""

    @abc.abstractmethod
    async def stored_program(self, program_id: int) -> StoredProgram:
        """A registered program version as stored (NoResult if there is none)."""

    @abc.abstractmethod
    async def register_program(self, program: ProgramDef, *, signature: str | None = None) -> int:
        """Store a program definition (once per version) and return its id."""

    async def run_program(self, run_id: str) -> ProgramDef:
        """The program definition a run was created with (NoResult if there is no run)."""
        origin = await self.run_origin(run_id)
        stored = await self.stored_program(origin.program_id)
        return ProgramDef.from_json(json.loads(stored.definition))

    # -- transactions (written once, in dispatch.transactions) --------------------------

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
        controller: str | None = None,
        log_dir: str | None = None,
    ) -> tuple[str, Advance]:
        """Create a run and fire its initial ``(event, sequence)`` triggers, in one transaction.

        Args:
            mode: ``standalone`` (the calling process drives the run) or ``distributed``
                (step runs are queued for their hosts' agents).
            signature: the run's HMAC with the cluster key (distributed mode).
            controller: the id of the worker driving a standalone run (host and pid), so
                recovery can tell whether it still lives.
            log_dir: where the run's logs are written (``aeventor logs`` reads them there).
        """
        # The id is chosen before the first attempt, so a retry finds the run it created.
        run_id = run_id or uuid.uuid4().hex
        return await self.write(
            lambda tx: transactions.create_run(
                tx,
                graph,
                program_id=program_id,
                triggers=triggers,
                run_id=run_id,
                take=take,
                mode=mode,
                submitted_by=submitted_by,
                signature=signature,
                controller=controller,
                log_dir=log_dir,
            )
        )

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
        return await self.write(
            lambda tx: transactions.trigger(
                tx, graph, run_id=run_id, event=event, sequence=sequence, take=take
            )
        )

    async def started(self, graph: Graph, claim: Claim, *, pid: int | None = None) -> Advance:
        """Record a claimed step's process and fire its ``active`` triggers."""
        if pid is None and not graph.trigger_events(claim.step, StepStatus.active):
            return Advance(0, RunStatus.running)
        return await self.write(lambda tx: transactions.started(tx, graph, claim, pid=pid))

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
        retry_after: float | None = None,
    ) -> Advance:
        """Record a step's end and everything it causes, in one transaction.

        A result larger than :attr:`max_value_bytes` once encoded is not sent: the step is
        recorded as a failure whose error says why; an error text too large is truncated.
        ``retry_after``: see :func:`aeventor.dispatch.transactions.complete`.
        """
        status, result, error = self._fit_outcome(claim, status, result, error)
        return await self.write(
            lambda tx: transactions.complete(
                tx,
                graph,
                claim,
                status=status,
                result=result,
                error=error,
                take=take,
                only_if_lapsed=only_if_lapsed,
                retry_after=retry_after,
            )
        )

    async def complete_many(
        self, items: Sequence[transactions.Completion], *, take: Taker | None = None
    ) -> list[Advance]:
        """Record several step runs' ends in one transaction (group commit; see
        :func:`aeventor.dispatch.transactions.complete_many`), each as :meth:`complete`
        would; one advance per item, in order."""
        fitted = []
        for item in items:
            status, result, error = self._fit_outcome(
                item.claim, item.status, item.result, item.error
            )
            fitted.append(dataclasses.replace(item, status=status, result=result, error=error))
        return await self.write(lambda tx: transactions.complete_many(tx, fitted, take=take))

    def _fit_outcome(
        self, claim: Claim, status: StepStatus, result: Any, error: str | None
    ) -> tuple[StepStatus, Any, str | None]:
        """A step's outcome as the store can hold it: a result larger than
        :attr:`max_value_bytes` once encoded becomes a failure saying why; an error text too
        large is truncated."""
        if self.max_value_bytes is not None:
            # The result is JSON-encoded here to be measured, and again by the transaction
            # (transactions.complete): twice for now, and only on stores with a limit.
            if result is not None:
                too_large = self.oversize(
                    f"step {claim.step}[{claim.sequence}]'s result",
                    json.dumps(result),
                    fix="return less (write large data to a file and return its path)",
                )
                if too_large is not None:
                    status, result, error = StepStatus.failure, None, too_large
            if error is not None:
                error = _fit(error, self.max_value_bytes, self.value_size, self.describe_limit())
        return status, result, error

    async def launching(self, claim: Claim) -> bool:
        """Mark a claimed step run as starting (pid 0 until its process is known), while
        the claim is still the caller's; False if it is not (then it must not start).

        From then on it is never requeued: had it started, it would run twice.
        """
        return await self.write(lambda tx: tx.set_pid(claim.id, 0, token=claim.token))

    async def requeue(self, claim: Claim, *, only_if_lapsed: bool = False) -> Advance:
        """Put a claimed step run that never started back to ready (or skipped, its run
        stopped); ``recorded`` is False when the claim was no longer held."""
        return await self.write(
            lambda tx: transactions.requeue(tx, claim, only_if_lapsed=only_if_lapsed)
        )

    async def fail_untrusted(
        self,
        claim: Claim,
        *,
        error: str,
        status: StepStatus = StepStatus.failure,
        only_if_lapsed: bool = False,
    ) -> Advance:
        """Fail a step run whose program is not trusted (``status``: failure, or lost), and
        stop its run (nothing fires)."""
        return await self.write(
            lambda tx: transactions.fail_untrusted(
                tx, claim, error=error, status=status, only_if_lapsed=only_if_lapsed
            )
        )

    async def cancel_run(self, run_id: str, *, reason: str) -> None:
        """Mark a run cancelled with its ready and active step runs (workers kill those)."""
        await self.write(lambda tx: transactions.cancel_run(tx, run_id, reason=reason))

    async def cancel_step(
        self, graph: Graph, run_id: str, step: str, sequence: str, *, reason: str
    ) -> Advance:
        """Cancel one step run (see :func:`aeventor.dispatch.transactions.cancel_step`)."""
        return await self.write(
            lambda tx: transactions.cancel_step(tx, graph, run_id, step, sequence, reason=reason)
        )

    async def recover(
        self,
        graph: Graph,
        run_id: str,
        *,
        generation: int,
        dead: Collection[str] = (),
        rerun: tuple[str, str] | None = None,
        take: Taker | None = None,
        controller: str | None = None,
        program: tuple[int, str | None] | None = None,
    ) -> Recovery:
        """Start recovery generation ``generation + 1`` of a run (see
        :func:`aeventor.dispatch.transactions.recover_run`)."""
        return await self.write(
            lambda tx: transactions.recover_run(
                tx,
                graph,
                run_id,
                generation=generation,
                dead=frozenset(dead),
                rerun=rerun,
                take=take,
                controller=controller,
                program=program,
            )
        )

    async def take_over(self, run_id: str, *, expected: str | None, controller: str) -> Advance:
        """See :func:`aeventor.dispatch.transactions.take_over`."""
        return await self.write(
            lambda tx: transactions.take_over(tx, run_id, expected=expected, controller=controller)
        )

    async def mature(self, graph: Graph, delay: Delay, *, take: Taker | None = None) -> Advance:
        """Reach a due delay's target (see :func:`aeventor.dispatch.transactions.mature`)."""
        return await self.write(lambda tx: transactions.mature(tx, graph, delay, take=take))

    async def admit_waiting(self, *, run_id: str | None = None) -> int:
        """Admit the step runs (of one run, or of any) waiting for slots that have come free
        without a transaction that gave them back: those of a holder whose worker died, once
        its lease and its worker's lapsed. Returns how many were admitted. The workers call it
        from their reaper's round."""
        return await self.write(lambda tx: transactions.admit_waiting(tx, run_id=run_id))

    @abc.abstractmethod
    async def due_delays(self, *, run_id: str | None = None, limit: int = 100) -> list[Delay]:
        """Delays due now and not reached, of running runs: one run's, or (``run_id`` None)
        those of distributed runs, which their agents reach."""

    @abc.abstractmethod
    async def next_delay(self, *, run_id: str | None = None) -> float | None:
        """Seconds until the earliest pending delay (of one run, or of distributed runs) is
        due, 0 if one is due already; None when none is pending."""

    @abc.abstractmethod
    async def run_workers(self, run_id: str) -> RunWorkers:
        """Who drives the run: its controller and the holders of its active step runs, with
        their heartbeat rows (NoResult if there is no such run)."""


def _fit(text: str, limit: int, size: Callable[[str], int], limit_text: str) -> str:
    """``text`` if it fits in ``limit`` bytes (as ``size`` counts them), else its start and
    end around a note that says how much was cut and why.

    A traceback's start names where it began and its end names the exception: both stay.
    """
    total = size(text)
    if total <= limit:
        return text

    def note(cut: int) -> str:
        return (
            f"\n[... {cut:,} characters cut: the error text is {total:,} bytes; {limit_text} ...]\n"
        )

    budget = limit - size(note(len(text)))
    if budget <= 0:  # a tiny limit: as much of the note as fits
        short = note(len(text)).strip()
        while short and size(short) > limit:
            short = short[:-1]
        return short

    def ends(keep: int) -> tuple[str, str]:
        return text[: keep // 2], text[len(text) - (keep - keep // 2) :]

    def cost(keep: int) -> int:
        head, tail = ends(keep)
        return size(head) + size(tail)

    # A character takes at most 4 bytes (UTF-8; an escaped one 2): start from the share
    # that surely fits, then grow towards the budget in a few measured steps.
    keep = budget // 4
    for _ in range(4):
        used = cost(keep)
        grown = int(keep * budget / max(used, 1) * 0.97)
        if used >= budget * 0.9 or grown <= keep or cost(grown) > budget:
            break
        keep = grown
    head, tail = ends(keep)
    return head + note(len(text) - keep) + tail
