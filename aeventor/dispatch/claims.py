"""The records the dispatch core and its stores exchange: claims, advances, new step runs."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..program.model import RunStatus, StepStatus
from .pools import Request

__all__ = (
    "Advance",
    "Claim",
    "Delay",
    "NewStepRun",
    "Recovery",
    "RunLock",
    "RunOrigin",
    "RunWorkers",
    "StepEnd",
    "StepRunState",
    "StoredProgram",
    "Taker",
    "WorkerState",
    "new_token",
)


def new_token() -> str:
    """A fencing token: names one claim (or one claiming transaction), never reused."""
    return secrets.token_hex(16)


@dataclass(slots=True)
class Taker:
    """Lets a transaction that makes step runs ready claim some of them at once.

    The worker that completes a step usually runs the next one too; inserting that step run
    already active and leased to it saves a claim transaction and a wake-up per hop.

    Attributes:
        worker: who claims.
        budget: how many step runs it may still take.
        hosts: only step runs assigned to these hosts (None: any).
        lease: how long the claim holds before it must be renewed.
        token: the fencing token of the step runs it claims; one per transaction, so a
            transaction retried after a lost acknowledgement finds what its first attempt
            claimed.
        run_id: only step runs of this run (a run's own worker; None: any).
        ready: also take step runs that were ready already (of ``run_id``, or queued for
            ``hosts``), with the budget left at the end of a group commit: a worker that
            has more to do claims it in the transaction that frees its room, not in one of
            its own.
    """

    worker: str
    budget: int
    hosts: frozenset[str | None] | None = None
    lease: timedelta = timedelta(seconds=30)
    token: str = field(default_factory=new_token)
    run_id: str | None = None
    ready: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """A step run a worker took: it is active and leased to that worker.

    Attributes:
        token: the fencing token of this claim. Only the holder of the current token can
            record the step run's outcome; a worker whose lease was taken (reaped, requeued)
            holds a stale one.
        host, queue, mac: where the step run is assigned and who may claim it, and the MAC
            of the row (distributed runs), which an agent verifies before it runs anything.
        pid: the step's process once it started (None: it never started, so a worker that
            gives it up requeues it).
    """

    id: int
    run_id: str
    step: str
    sequence: str
    recovery: int
    attempt: int
    token: str | None = None
    host: str | None = None
    queue: str | None = None
    mac: str | None = None
    pid: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> Claim:
        """The claim of a stored step run: any record with the claim's attributes."""
        return cls(*(getattr(row, name) for name in _CLAIM_FIELDS))


_CLAIM_FIELDS = tuple(f.name for f in dataclasses.fields(Claim))


@dataclass(frozen=True, slots=True)
class Advance:
    """What a transaction changed, for the caller's wake-ups.

    Attributes:
        ready: how many step runs it made ready (and left for claimers).
        run_status: the run's status after it (running until the run ends).
        claims: step runs it made and claimed for the caller's :class:`Taker`.
        recorded: False when the change was not applied (the step run was no longer
            active: cancelled, or reaped).
        due_in: seconds until a step run it made ready may be claimed (a retry's backoff).
    """

    ready: int
    run_status: RunStatus
    claims: tuple[Claim, ...] = ()
    recorded: bool = True
    due_in: float | None = None


@dataclass(frozen=True, slots=True)
class RunLock:
    """The run row, read under the transaction's lock on it."""

    status: RunStatus
    stopped: bool
    recovery: int
    mode: str
    #: How the current recovery generation replays ("recover", "rerun"; None: not recovered).
    replay: str | None = None
    #: The worker driving a standalone run.
    controller: str | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    """A delayed association that fired: its target is reached when it is due."""

    id: int
    run_id: str
    sequence: str
    recovery: int
    event: str
    kind: str
    target: str


@dataclass(frozen=True, slots=True)
class StepRunState:
    """A step run as recovery reads it."""

    id: int
    step: str
    sequence: str
    recovery: int
    attempt: int
    status: StepStatus
    worker: str | None


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A worker (an agent, or the worker of a standalone run) as its heartbeats left it.

    Attributes:
        lease_lapsed: its lease has lapsed on the store's clock (it stopped renewing it).
    """

    id: str
    hostname: str
    pid: int
    started: datetime
    stopped: datetime | None
    lease_lapsed: bool


@dataclass(frozen=True, slots=True)
class RunWorkers:
    """Who drives a run: its controller (standalone) and the workers holding its active
    step runs, with what the store knows of each (a worker that never beat is absent from
    ``known``; ``unleased`` names the holders whose step-run leases all lapsed)."""

    controller: str | None
    holders: frozenset[str]
    known: dict[str, WorkerState]
    unleased: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Recovery:
    """What recovering (or rerunning in) a run did.

    Attributes:
        recovery: the run's new recovery generation.
        rerun: the ``(step, sequence)`` pairs made ready again, in their first runs' order.
        superseded: the ready and active step runs of a dead controller's generation that
            were closed (active ones recorded ``lost``, ready ones ``cancelled``).
    """

    recovery: int
    rerun: tuple[tuple[str, str], ...]
    superseded: int
    advance: Advance


@dataclass(frozen=True, slots=True)
class StepEnd:
    """A step run's end, as a transaction records it (:meth:`StoreTx.end_steps`)."""

    claim_id: int
    #: The fencing token it must still be active under.
    token: str | None
    status: StepStatus
    #: The result, JSON-encoded.
    result: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class NewStepRun:
    """A step run a transaction creates."""

    run_id: str
    step: str
    sequence: str
    recovery: int
    status: StepStatus
    host: str | None
    queue: str | None
    attempt: int = 1
    mac: str | None = None
    #: Seconds from now (the server's clock) before it may be claimed: a retry's backoff.
    delay: float | None = None
    #: The slots it must hold before it may be claimed (made ``waiting`` until it does).
    needs: tuple[Request, ...] = ()
    priority: int = 0


@dataclass(frozen=True, slots=True)
class RunOrigin:
    """Where a run came from: what an agent checks before it runs any of its steps."""

    run_id: str
    program_id: int
    mode: str
    signature: str | None


@dataclass(frozen=True, slots=True)
class StoredProgram:
    """A registered program version, as stored."""

    id: int
    name: str
    version: str
    definition: str
    signature: str | None
    extra: dict[str, Any] = field(default_factory=dict)
