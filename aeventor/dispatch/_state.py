"""The engine's pure state machine: no I/O, no event loop, no clock.

The async layer reads a few facts from the database (which events already fired for a
sequence), asks this module what follows, and writes the answer in the same transaction. Every
decision about events, expressions, triggers and the end of a run is taken here, so it can be
unit-tested exhaustively and reused by any process that advances a run.

Work is proportional to what a change affects: :meth:`Graph.fire` walks only the events
reachable from the ones being fired, and :meth:`Graph.facts_needed` tells the caller which
fired-event facts that walk can consult, so the caller reads only those rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from ..program import expr as _expr
from ..program.model import ProgramDef, RunStatus, StepStatus
from . import pools as _pools

__all__ = (
    "FirePlan",
    "Graph",
    "StepOutcome",
    "StepRunSigner",
    "check_transition",
    "final_run_status",
)


class StepRunSigner(Protocol):
    """Makes the MAC of a step run (:func:`aeventor.signing.step_run_signer`)."""

    def __call__(
        self,
        *,
        run_id: str,
        version: str,
        step: str,
        sequence: str,
        recovery: int,
        attempt: int,
        host: str | None,
        queue: str | None,
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What firing some events causes, for one sequence.

    Attributes:
        events: the events that newly fire, in firing order (already-fired ones excluded).
        steps: the steps to make ready, in order, each once.
        delays: the delayed associations of the events that fired, as ``(event, kind,
            target, seconds)``: to be stored, and their targets reached when due.
    """

    events: tuple[str, ...]
    steps: tuple[str, ...]
    delays: tuple[tuple[str, str, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What a step's new status causes.

    Attributes:
        events: the events its triggers fire for that status.
        stop_run: True when this is a failure that fires no failure (or complete) trigger
            and the program stops on exceptions: nothing new may start in the run.
    """

    events: tuple[str, ...]
    stop_run: bool


# Which status may follow which. ``ready`` rows are created, never entered.
_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.waiting: frozenset({StepStatus.ready, StepStatus.skipped, StepStatus.cancelled}),
    StepStatus.ready: frozenset({StepStatus.active, StepStatus.skipped, StepStatus.cancelled}),
    StepStatus.active: frozenset(
        {
            StepStatus.success,
            StepStatus.failure,
            StepStatus.cancelled,
            StepStatus.lost,
            # Claimed but never started (its worker stopped first): queued again.
            StepStatus.ready,
        }
    ),
    StepStatus.success: frozenset(),
    StepStatus.failure: frozenset(),
    StepStatus.skipped: frozenset(),
    StepStatus.cancelled: frozenset(),
    StepStatus.lost: frozenset(),
}

#: Step-run statuses that keep a run alive.
PENDING = (StepStatus.ready, StepStatus.active, StepStatus.waiting)


def check_transition(current: StepStatus, new: StepStatus) -> bool:
    """Whether a step run may move from ``current`` to ``new``."""
    return new in _TRANSITIONS.get(current, frozenset())


def final_run_status(*, pending: int, stopped: bool, cancelled: bool) -> RunStatus:
    """The status of a run given how many step runs are still ready or active.

    There are three cases: a cancelled run is cancelled as soon as it is asked (its step runs
    are terminated by the caller); a run with pending step runs is still running; otherwise it
    ended, in failure if an unhandled step failure stopped it and in success if not.
    """
    if cancelled:
        return RunStatus.cancelled
    if pending:
        return RunStatus.running
    return RunStatus.failure if stopped else RunStatus.success


class _Seen(AbstractSet[str]):
    """The events of a sequence seen during one :meth:`Graph.fire`: those that had fired
    before (read, not copied) and those it fires."""

    __slots__ = ("before", "new")

    def __init__(self, before: AbstractSet[str]) -> None:
        self.before = before
        self.new: set[str] = set()

    def __contains__(self, event: object) -> bool:
        return event in self.new or event in self.before

    def __iter__(self) -> Iterator[str]:
        yield from self.before
        yield from (e for e in self.new if e not in self.before)

    def __len__(self) -> int:
        return len(self.before) + sum(1 for e in self.new if e not in self.before)

    def add(self, event: str) -> None:
        self.new.add(event)


class Graph:
    """Indexes of a program for the state machine; immutable once built.

    Args:
        program: the program.
        signer: makes the MAC of each step run a transaction creates for a distributed run
            (the cluster key's holders: submitters and agents). Without one, such step runs
            carry no MAC, and agents refuse them.
    """

    def __init__(self, program: ProgramDef, *, signer: StepRunSigner | None = None) -> None:
        self.program = program
        self._signer = signer
        self._version: str | None = None
        self._fanout: dict[str, tuple[tuple[str, str], ...]] = dict(program.assocs)
        self._delayed = dict(program.delays)
        #: Per step, the pools and limits its step runs take slots of (none: not listed).
        self.slots = _pools.templates(program)
        dependents: dict[str, list[str]] = {}
        self._exprs: dict[str, _expr.Expr] = {}
        for event in program.events.values():
            if event.expr is None:
                continue
            self._exprs[event.name] = event.expr
            for ref in dict.fromkeys(_expr.names(event.expr)):
                dependents.setdefault(ref, []).append(event.name)
        self._dependents = {k: tuple(v) for k, v in dependents.items()}
        #: Per event: what firing it may reach, and the derived events among that.
        self._reach_cache: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {}
        #: Per derived event, the events its expression names (shared by every event that
        #: reaches it: a join of n steps keeps one set of n names, not one per step).
        self._operands = {name: frozenset(_expr.names(expr)) for name, expr in self._exprs.items()}
        #: Per derived event that is an AND or OR of event names only (the usual join):
        #: its operands in order, checked without building sets (see :meth:`_holds`).
        self._flat: dict[str, tuple[bool, tuple[str, ...]]] = {}
        for name, expr in self._exprs.items():
            if not isinstance(expr, str) and all(isinstance(o, str) for o in expr.operands):
                operands = tuple(dict.fromkeys(o for o in expr.operands if isinstance(o, str)))
                self._flat[name] = (isinstance(expr, _expr.And), operands)
        #: Per flat AND, where its last check found an operand that had not fired: the next
        #: check starts there. Only a hint (any run may move it, each check verifies it), so
        #: a run's n-step join checks about 2n operands in all, not n each time.
        self._blocker: dict[str, int] = {}

    @property
    def version(self) -> str:
        """The program's version, hashed once (:attr:`ProgramDef.version` hashes the whole
        definition at each use: never per step run)."""
        if self._version is None:
            self._version = self.program.version
        return self._version

    @property
    def signs(self) -> bool:
        """Whether this graph signs the step runs it makes (it holds the cluster key)."""
        return self._signer is not None

    def sign(
        self,
        *,
        run_id: str,
        step: str,
        sequence: str,
        recovery: int,
        attempt: int,
        host: str | None,
        queue: str | None,
    ) -> str | None:
        """The MAC of a new step run of this program version (None without a signer)."""
        if self._signer is None:
            return None
        return self._signer(
            run_id=run_id,
            version=self.version,
            step=step,
            sequence=sequence,
            recovery=recovery,
            attempt=attempt,
            host=host,
            queue=queue,
        )

    # -- triggers -----------------------------------------------------------------------

    def trigger_events(self, step: str, status: StepStatus) -> tuple[str, ...]:
        """The events a step's triggers fire when it enters ``status``.

        Success and failure also fire the ``complete`` triggers; a lost step run, and one
        cancelled on its own (not with its run), fire what a failure fires.
        """
        if status in (StepStatus.lost, StepStatus.cancelled):
            status = StepStatus.failure
        triggers = self.program.steps[step].triggers
        events = list(triggers.get(status, ()))
        if status in (StepStatus.success, StepStatus.failure):
            events.extend(triggers.get(StepStatus.complete, ()))
        return tuple(dict.fromkeys(events))

    def step_outcome(self, step: str, status: StepStatus) -> StepOutcome:
        """What a step entering ``status`` fires, and whether it stops the run."""
        events = self.trigger_events(step, status)
        own = self.program.steps[step].stop_on_exception
        stop = (
            status in (StepStatus.failure, StepStatus.lost, StepStatus.cancelled)
            and (self.program.stop_on_exception if own is None else own)
            and not self._handles_failure(step)
        )
        return StepOutcome(events, stop)

    def _handles_failure(self, step: str) -> bool:
        triggers = self.program.steps[step].triggers
        return bool(triggers.get(StepStatus.failure) or triggers.get(StepStatus.complete))

    # -- firing -------------------------------------------------------------------------

    def fire(self, fired: AbstractSet[str], new: Iterable[str]) -> FirePlan:
        """Fire ``new`` events for one sequence in which ``fired`` already fired.

        Follows associations (to steps and to events), the ready triggers of the steps made
        ready, and derived events whose expressions come to hold; each event fires once.
        ``fired`` must contain at least :meth:`facts_needed` of ``new`` (it may hold any other
        event that fired in the sequence); it is read, never copied: a firing costs what it
        reaches, not the size of the sequence's history.
        """
        seen = _Seen(fired)
        events: list[str] = []
        steps: dict[str, None] = {}
        delays: list[tuple[str, str, str, float]] = []
        queue = deque(new)
        while queue:
            event = queue.popleft()
            if event in seen:
                continue
            seen.add(event)
            events.append(event)
            delays.extend(
                (event, kind, target, s) for kind, target, s in self._delayed.get(event, ())
            )
            for kind, target in self._fanout.get(event, ()):
                if kind == "event":
                    queue.append(target)
                elif target not in steps:
                    steps[target] = None
                    queue.extend(self.trigger_events(target, StepStatus.ready))
            for derived in self._dependents.get(event, ()):
                if derived not in seen and self._holds(derived, event, seen):
                    queue.append(derived)
        return FirePlan(tuple(events), tuple(steps), tuple(delays))

    def _holds(self, derived: str, because: str, seen: _Seen) -> bool:
        """Whether ``derived`` holds now that ``because`` (one of its operands) fired."""
        flat = self._flat.get(derived)
        if flat is None:
            return _expr.holds(self._exprs[derived], seen)
        conjunction, operands = flat
        if not conjunction:
            return True  # an OR of names, one of which (``because``) just fired
        n = len(operands)
        start = self._blocker.get(derived, 0) % n
        for k in range(n):
            index = (start + k) % n
            if operands[index] not in seen:
                self._blocker[derived] = index
                return False
        return True

    def downstream(self, step: str) -> frozenset[str]:
        """The events a run of ``step`` can cause, directly or not: those its triggers fire
        (for any status), what they fan out to, the triggers of the steps those make ready,
        and the derived events that depend on any of them.

        Rerunning the step forgets these for its sequence, so that they fire again.
        """
        reached: set[str] = set()
        queue = deque(e for events in self.program.steps[step].triggers.values() for e in events)
        while queue:
            event = queue.popleft()
            if event in reached:
                continue
            reached.add(event)
            for kind, target in self.program.targets(event):
                if kind == "event":
                    queue.append(target)
                else:
                    queue.extend(
                        e for events in self.program.steps[target].triggers.values() for e in events
                    )
            queue.extend(self._dependents.get(event, ()))
        return frozenset(reached)

    def facts_needed(self, events: Iterable[str]) -> frozenset[str]:
        """The events whose fired-state :meth:`fire` may consult when firing ``events``."""
        return frozenset().union(*self.fact_groups(events))

    def fact_groups(self, events: Iterable[str]) -> tuple[frozenset[str], ...]:
        """:meth:`facts_needed` as the sets whose union it is, each shared by every caller
        that needs it (a join's operands are one set, whichever of them fires): a reader
        that remembers which groups it read asks only for new ones."""
        groups: dict[frozenset[str], None] = {}
        for event in events:
            reached, derived = self._reach(event)
            groups[reached] = None
            for name in derived:
                groups[self._operands[name]] = None
        return tuple(groups)

    def _reach(self, start: str) -> tuple[frozenset[str], tuple[str, ...]]:
        """What firing ``start`` may reach (at once), and the derived events among it."""
        cached = self._reach_cache.get(start)
        if cached is not None:
            return cached
        reachable: set[str] = set()
        queue = deque([start])
        while queue:
            event = queue.popleft()
            if event in reachable:
                continue
            reachable.add(event)
            for kind, target in self._fanout.get(event, ()):
                if kind == "event":
                    queue.append(target)
                else:
                    queue.extend(self.trigger_events(target, StepStatus.ready))
            queue.extend(self._dependents.get(event, ()))
        result = (frozenset(reachable), tuple(e for e in reachable if e in self._operands))
        self._reach_cache[start] = result
        return result
