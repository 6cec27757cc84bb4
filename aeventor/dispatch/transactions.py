"""The transactions that advance a run, written once against :class:`~.store.StoreTx`.

Each function is the body of one write transaction: it locks the run row first, reads the few
facts the state machine (:mod:`._state`) needs, and writes its answer. Completing a step,
firing its triggers, evaluating the expressions they satisfy and making steps ready commit
together, so any process holding the store can advance any run, and a transaction retried
after a lost connection cannot apply twice (its writes are conditional).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import NoResult, NothingToRecover, RunStillRunning
from ..program.model import RunStatus, StepStatus
from . import pools
from ._state import Graph, final_run_status
from .claims import Advance, Claim, Delay, NewStepRun, Recovery, StepEnd, StepRunState, Taker

if TYPE_CHECKING:
    from .store import StoreTx

__all__ = (
    "admit_waiting",
    "cancel_run",
    "cancel_step",
    "complete",
    "complete_many",
    "create_run",
    "fail_untrusted",
    "mature",
    "recover_run",
    "requeue",
    "started",
    "take_over",
    "trigger",
)


async def create_run(
    tx: StoreTx,
    graph: Graph,
    *,
    program_id: int,
    triggers: Sequence[tuple[str, str]],
    run_id: str | None,
    take: Taker | None,
    mode: str,
    submitted_by: str | None,
    signature: str | None,
    controller: str | None = None,
    log_dir: str | None = None,
) -> tuple[str, Advance]:
    run_id = run_id or uuid.uuid4().hex
    if tx.retried:
        # The first attempt may have created the run before its acknowledgement was lost.
        try:
            run = await tx.lock_run(run_id)
        except NoResult:
            pass
        else:
            earlier = await _claimed_earlier(tx, take, [])
            return run_id, Advance(1, run.status, tuple(earlier))
    await tx.insert_run(
        run_id=run_id,
        program_id=program_id,
        program_name=graph.program.name,
        mode=mode,
        submitted_by=submitted_by,
        signature=signature,
        controller=controller,
        log_dir=log_dir,
    )
    ready = 0
    claims: list[Claim] = []
    queues: set[str | None] = set()
    for sequence, events in _group_by_sequence(triggers).items():
        budget = (
            None if take is None else dataclasses.replace(take, budget=take.budget - len(claims))
        )
        more, taken, more_queues = await _fire(
            tx, graph, run_id, sequence, 0, events, stopped=False, take=budget, mode=mode
        )
        ready += more
        claims += taken
        queues |= more_queues
    status = await _settle(tx, run_id, stopped=False)
    if ready:
        tx.notify(run_id, queues)
    return run_id, Advance(ready, status, tuple(claims), due_in=tx.earliest_delay)


async def trigger(
    tx: StoreTx,
    graph: Graph,
    *,
    run_id: str,
    event: str,
    sequence: str,
    take: Taker | None,
) -> Advance:
    run = await tx.lock_run(run_id)
    if run.status is not RunStatus.running:
        return Advance(0, run.status, recorded=False)
    ready, claims, queues = await _fire(
        tx,
        graph,
        run_id,
        sequence,
        run.recovery,
        [event],
        run.stopped,
        take,
        mode=run.mode,
        replay=run.replay,
    )
    if ready:
        tx.notify(run_id, queues)
    if tx.retried:
        claims = await _claimed_earlier(tx, take, claims)
        ready = ready or 1  # what the first attempt made ready: look for it
    return Advance(ready, RunStatus.running, tuple(claims), due_in=tx.earliest_delay)


async def started(tx: StoreTx, graph: Graph, claim: Claim, *, pid: int | None) -> Advance:
    """Record a claimed step's process and fire its ``active`` triggers."""
    if pid is not None and not await tx.set_pid(claim.id, pid, token=claim.token):
        # No longer ours (cancelled, or taken): its active triggers are not ours to fire.
        return Advance(0, RunStatus.running, recorded=False)
    events = graph.trigger_events(claim.step, StepStatus.active)
    if not events:
        return Advance(0, RunStatus.running)
    run = await tx.lock_run(claim.run_id)
    if run.status is not RunStatus.running:
        return Advance(0, run.status)
    ready, _, queues = await _fire(
        tx,
        graph,
        claim.run_id,
        claim.sequence,
        claim.recovery,
        events,
        run.stopped,
        mode=run.mode,
        replay=run.replay,
    )
    if ready:
        tx.notify(claim.run_id, queues)
    return Advance(ready, RunStatus.running, due_in=tx.earliest_delay)


async def complete(
    tx: StoreTx,
    graph: Graph,
    claim: Claim,
    *,
    status: StepStatus,
    result: Any,
    error: str | None,
    take: Taker | None,
    only_if_lapsed: bool,
    retry_after: float | None = None,
    settle: bool = True,
    ended: bool | None = None,
) -> Advance:
    """Record a step's end and everything it causes.

    Only the holder of the claim's fencing token can: a step run that is no longer active
    under it (its run was cancelled, a reaper recorded it lost, it was requeued and claimed
    again) is left as it is, and the advance says ``recorded=False``. Retried after a lost
    connection, a completion that finds its own earlier commit returns what it claimed.

    With ``retry_after`` (seconds), a failed or lost attempt that its step's retry policy
    allows another attempt fires nothing: the next attempt is made ready, claimable after
    that backoff, and the advance's ``due_in`` says when.

    ``settle=False`` does not look whether the run ended: the caller knows another step run
    of it is still active in this transaction (see :func:`complete_many`). ``ended`` says
    whether the caller has ended the step run already (:meth:`StoreTx.end_steps`).
    """
    outcome = graph.step_outcome(claim.step, status)
    run = None
    if ended is None and not only_if_lapsed:
        # Where the store can, one statement locks the run and ends the step run.
        run = await tx.end_step_locking_run(
            claim.run_id,
            claim.id,
            token=claim.token,
            status=status,
            result=_encoded(result),
            error=error,
        )
        if run is not None:
            ended = True
    if run is None:
        run = await tx.lock_run(claim.run_id)
    if ended is None:
        ended = await tx.end_step(
            claim.id,
            token=claim.token,
            status=status,
            result=_encoded(result),
            error=error,
            only_if_lapsed=only_if_lapsed,
        )
    if not ended:
        if await _ended_earlier(tx, claim, status):
            return Advance(1, run.status, tuple(await _claimed_earlier(tx, take, [])))
        return Advance(0, run.status, recorded=False)
    # Its slots go back in the transaction that records its end (a retry waits anew).
    freed = await _release(tx, graph, claim.run_id, ended=(claim.id, claim.step))
    if run.status is not RunStatus.running:
        return Advance(freed, run.status)
    retry = graph.program.steps[claim.step].retry
    if (
        retry_after is not None
        and retry is not None
        and status in (StepStatus.failure, StepStatus.lost)
        and claim.attempt < retry.attempts
        and not run.stopped
    ):
        advance = await _retry(tx, graph, claim, run.mode, retry_after)
        return dataclasses.replace(advance, ready=advance.ready + freed)
    stopped = run.stopped
    if outcome.stop_run and not stopped:
        stopped = True
        await tx.stop_run(
            claim.run_id,
            f"step {claim.step}[{claim.sequence}] failed and fires no failure trigger",
        )
        # Its waiting and ready step runs were skipped: their slots go back.
        freed += await _release(tx, graph, claim.run_id)
    ready, claims, queues = await _fire(
        tx,
        graph,
        claim.run_id,
        claim.sequence,
        claim.recovery,
        outcome.events,
        stopped,
        take,
        mode=run.mode,
        replay=run.replay,
    )
    ready += freed
    # A run that just gained step runs cannot have ended.
    run_status = (
        RunStatus.running
        if ready or claims or not settle
        else await _settle(tx, claim.run_id, stopped=stopped, graph=graph)
    )
    if ready:
        tx.notify(claim.run_id, queues)
    return Advance(ready, run_status, tuple(claims), due_in=tx.earliest_delay)


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One step run's end, as :func:`complete` takes it (for :func:`complete_many`)."""

    graph: Graph
    claim: Claim
    status: StepStatus
    result: Any = None
    error: str | None = None
    retry_after: float | None = None


async def complete_many(
    tx: StoreTx, items: Sequence[Completion], *, take: Taker | None
) -> list[Advance]:
    """Record several step runs' ends in one transaction (group commit), each with
    everything it causes, exactly as :func:`complete` records one: a step's end, the events
    it fires and the steps it makes ready still commit together.

    Runs are locked in id order, so two such transactions never wait on each other in a
    cycle. Whether a run ended is asked once, after its completions (until the last is
    recorded, the run has an active step run); the last advance of the run says it. What
    ``take`` claims comes back in the last advance.
    """
    advances: list[Advance | None] = [None] * len(items)
    by_run: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_run.setdefault(item.claim.run_id, []).append(index)
    claimed: dict[int, Claim] = {}
    # The runs first (in id order, as anyone locks a run before its step runs), then every
    # step run of the batch in id order, as the heartbeat renews them: no transaction
    # waits on this one in a cycle.
    for run_id in sorted(by_run):
        await tx.lock_run(run_id)
    ended = await tx.end_steps(
        [
            StepEnd(item.claim.id, item.claim.token, item.status, _encoded(item.result), item.error)
            for item in items
        ]
    )
    for run_id in sorted(by_run):
        indexes = by_run[run_id]
        moved = recorded = False
        for index in indexes:
            item = items[index]
            advance = await complete(
                tx,
                item.graph,
                item.claim,
                status=item.status,
                result=item.result,
                error=item.error,
                take=take,
                only_if_lapsed=False,
                retry_after=item.retry_after,
                settle=False,
                ended=item.claim.id in ended,
            )
            moved = moved or bool(advance.ready or advance.claims)
            recorded = recorded or advance.recorded
            for claim in advance.claims:
                claimed.setdefault(claim.id, claim)
            if take is not None:
                take.budget = max(take.budget - len(advance.claims), 0)
            advances[index] = dataclasses.replace(advance, claims=())
        # Whether the run ended is asked once, after its last completion here (whichever
        # of them was recorded: one cancelled meanwhile is not).
        run = await tx.lock_run(run_id)
        if recorded and not moved and run.status is RunStatus.running:
            status = await _settle(tx, run_id, stopped=run.stopped, graph=items[indexes[-1]].graph)
            last = advances[indexes[-1]]
            assert last is not None
            advances[indexes[-1]] = dataclasses.replace(last, run_status=status)
    if take is not None and take.ready and take.budget > 0:
        # Room the batch freed, filled in the same transaction (SKIP LOCKED: it waits for
        # nobody, so it adds no lock to wait on in a cycle).
        for claim in await tx.claim_ready(take):
            claimed.setdefault(claim.id, claim)
    done = [advance for advance in advances if advance is not None]
    if claimed and done:
        done[-1] = dataclasses.replace(done[-1], claims=tuple(claimed.values()))
    return done


def _encoded(result: Any) -> str | None:
    """A step's result as stored (JSON)."""
    return None if result is None else json.dumps(result)


async def _retry(tx: StoreTx, graph: Graph, claim: Claim, mode: str, delay: float) -> Advance:
    """Make the next attempt of a failed step run ready, claimable after ``delay``."""
    row = _new_step_run(
        graph,
        claim.run_id,
        claim.step,
        claim.sequence,
        claim.recovery,
        StepStatus.ready,
        mode=mode,
        attempt=claim.attempt + 1,
    )
    await tx.add_step_runs([dataclasses.replace(row, delay=max(delay, 0.0))])
    # Nobody can claim it before its backoff: its worker wakes then (Advance.due_in), other
    # claimers find it when they next look. (Needing slots, it waits for them behind the
    # step runs that waited before it, and holds them through its backoff.)
    admitted = (
        await _admit(tx, [r.key for r in row.needs], count_for=claim.run_id) if row.needs else 0
    )
    return Advance(admitted, RunStatus.running, due_in=max(delay, 0.0))


async def fail_untrusted(
    tx: StoreTx,
    claim: Claim,
    *,
    error: str,
    status: StepStatus = StepStatus.failure,
    only_if_lapsed: bool = False,
) -> Advance:
    """Fail a step run whose program is not trusted, and stop its run.

    No trigger fires: the program that would say what a failure causes is the one that
    failed verification.
    """
    run = await tx.lock_run(claim.run_id)
    ended = await tx.end_step(
        claim.id,
        token=claim.token,
        status=status,
        result=None,
        error=error,
        only_if_lapsed=only_if_lapsed,
    )
    if not ended:
        return Advance(0, run.status, recorded=await _ended_earlier(tx, claim, status))
    await _release_all_ended(tx, claim.run_id)
    if run.status is not RunStatus.running:
        return Advance(0, run.status)
    if not run.stopped:
        await tx.stop_run(claim.run_id, f"step {claim.step}[{claim.sequence}]: {error}")
        await _release_all_ended(tx, claim.run_id)
    return Advance(0, await _settle(tx, claim.run_id, stopped=True))


async def requeue(tx: StoreTx, claim: Claim, *, only_if_lapsed: bool = False) -> Advance:
    """Put a claimed step run that never started back to ready, for any claimer.

    Its worker stopped (or died) before it launched the step. In a run that stopped
    meanwhile, it is skipped instead, as the run's other ready step runs were.
    """
    run = await tx.lock_run(claim.run_id)
    if not await tx.requeue_step(claim.id, token=claim.token, only_if_lapsed=only_if_lapsed):
        mine = tx.retried and await tx.step_state(claim.id) == (StepStatus.ready, None)
        return Advance(0, run.status, recorded=mine)
    if run.status is not RunStatus.running:
        return Advance(0, run.status)
    if run.stopped:
        await tx.stop_run(claim.run_id, None)
        await _release_all_ended(tx, claim.run_id)
        return Advance(0, await _settle(tx, claim.run_id, stopped=True))
    tx.notify(claim.run_id, {claim.queue})
    return Advance(1, RunStatus.running)


async def cancel_run(tx: StoreTx, run_id: str, *, reason: str) -> None:
    """Mark a run cancelled with its ready and active step runs (their workers kill those)."""
    run = await tx.lock_run(run_id)
    await tx.cancel_step_runs(run_id)
    if run.status is RunStatus.running:
        await tx.end_run(run_id, RunStatus.cancelled, reason)
    await _release_all_ended(tx, run_id)
    tx.notify(run_id)


async def cancel_step(
    tx: StoreTx, graph: Graph, run_id: str, step: str, sequence: str, *, reason: str
) -> Advance:
    """Cancel the ready or running step run of ``step`` for ``sequence``.

    It is recorded ``cancelled`` (its worker terminates it at its next heartbeat, and no
    outcome of its is recorded after that), and the run reacts as to a failure of it: its
    failure triggers fire, and without one the run stops. ``recorded`` is False when the run
    has ended or the step has no ready or running step run.
    """
    run = await tx.lock_run(run_id)
    if run.status is not RunStatus.running:
        return Advance(0, run.status, recorded=False)
    found = await tx.pending_step_run(run_id, step, sequence)
    if found is None or not await tx.cancel_step_run(found[0], reason):
        return Advance(0, run.status, recorded=False)
    freed = await _release(tx, graph, run_id, ended=(found[0], step))
    outcome = graph.step_outcome(step, StepStatus.cancelled)
    stopped = run.stopped
    if outcome.stop_run and not stopped:
        stopped = True
        await tx.stop_run(run_id, f"step {step}[{sequence}] was cancelled ({reason})")
        freed += await _release(tx, graph, run_id)
    ready, _, queues = await _fire(
        tx,
        graph,
        run_id,
        sequence,
        found[1],
        outcome.events,
        stopped,
        mode=run.mode,
        replay=run.replay,
    )
    ready += freed
    status = RunStatus.running if ready else await _settle(tx, run_id, stopped=stopped, graph=graph)
    tx.notify(run_id, queues)
    return Advance(ready, status, due_in=tx.earliest_delay)


async def take_over(tx: StoreTx, run_id: str, *, expected: str | None, controller: str) -> Advance:
    """Make ``controller`` the run's controller in place of ``expected`` (judged dead), in
    the same generation (``aeventor continue``). :class:`RunStillRunning` if another
    process took the run meanwhile; ``recorded`` False if it has ended."""
    run = await tx.lock_run(run_id)
    if run.status is not RunStatus.running:
        return Advance(0, run.status, recorded=False)
    if run.controller != expected:
        raise RunStillRunning(
            f"run {run_id} was taken over meanwhile by {run.controller}; "
            f"`aeventor show {run_id[:8]}` shows it"
        )
    await tx.set_controller(run_id, controller)
    return Advance(1, RunStatus.running)


async def mature(tx: StoreTx, graph: Graph, delay: Delay, *, take: Taker | None) -> Advance:
    """Reach a due delay's target: fire its event, or make its step ready, in the run's
    current recovery generation; exactly once, whoever else tries (``recorded`` False)."""
    run = await tx.lock_run(delay.run_id)
    if run.status is not RunStatus.running or not await tx.take_delay(delay.id):
        return Advance(0, run.status, recorded=False)
    run_id, sequence, recovery = delay.run_id, delay.sequence, run.recovery
    if delay.kind == "event":
        ready, claims, queues = await _fire(
            tx,
            graph,
            run_id,
            sequence,
            recovery,
            [delay.target],
            run.stopped,
            take,
            mode=run.mode,
            replay=run.replay,
        )
    else:
        make = [delay.target]
        if run.replay == "recover" and recovery > 0:
            make = await _not_kept(tx, graph, run_id, sequence, recovery, make)
        ready, claims, queues = await _make_ready(
            tx, graph, run_id, sequence, recovery, make, run.stopped, take, mode=run.mode
        )
        if make and not run.stopped:
            more, _, more_queues = await _fire(
                tx,
                graph,
                run_id,
                sequence,
                recovery,
                graph.trigger_events(delay.target, StepStatus.ready),
                False,
                mode=run.mode,
                replay=run.replay,
            )
            ready, queues = ready + more, queues | more_queues
    status = (
        RunStatus.running
        if ready or claims
        else await _settle(tx, run_id, stopped=run.stopped, graph=graph)
    )
    if ready:
        tx.notify(run_id, queues)
    return Advance(ready, status, tuple(claims), due_in=tx.earliest_delay)


async def admit_waiting(tx: StoreTx, *, run_id: str | None) -> int:
    """Admit what waits for slots that came free without a release (a dead holder)."""
    pools_waited = await tx.waiting_pools(run_id)
    return await _admit(tx, pools_waited) if pools_waited else 0


#: The step-run statuses recovery runs again (policy permitting): what did not succeed.
RERUNNABLE = frozenset(
    {StepStatus.failure, StepStatus.lost, StepStatus.cancelled, StepStatus.skipped}
)


async def recover_run(
    tx: StoreTx,
    graph: Graph,
    run_id: str,
    *,
    generation: int,
    dead: frozenset[str],
    rerun: tuple[str, str] | None,
    take: Taker | None,
    controller: str | None,
    program: tuple[int, str | None] | None,
) -> Recovery:
    """Continue a run in a new recovery generation, ``generation + 1``.

    The caller read the run at ``generation`` and judged the workers in ``dead`` gone; if
    the run moved on meanwhile (another process recovered it) or a worker of it not in
    ``dead`` holds one of its step runs, nothing changes and :class:`RunStillRunning` is
    raised: two recoveries at once recover once.

    Every event fired so far stays fired in the new generation (it is carried over), so
    only what the rerun step runs cause fires again. Without ``rerun`` (recover), the step
    runs that did not succeed are made ready again unless their step's recovery policy is
    ``skip``, and a step that succeeded before is never run again (see :func:`_fire`). With
    ``rerun=(step, sequence)``, that step run is made ready again whatever its outcome, and
    the events it can cause are forgotten for its sequence so that what follows it runs
    again too. A dead controller's pending step runs are closed first (active: ``lost``,
    ready: ``cancelled``).
    """
    run = await tx.lock_run(run_id)
    new = generation + 1
    if run.recovery != generation:
        if tx.retried and run.recovery == new and run.controller == controller:
            # Our first attempt committed; only its acknowledgement was lost.
            earlier = await _claimed_earlier(tx, take, [])
            return Recovery(new, (), 0, Advance(1, run.status, tuple(earlier)))
        raise RunStillRunning(
            f"run {run_id} was recovered meanwhile by another process (it is at recovery "
            f"{run.recovery}, not {generation}); `aeventor show {run_id[:8]}` shows it"
        )
    superseded = 0
    if run.status is RunStatus.running:
        alive = (await tx.holders(run_id) | {run.controller} - {None}) - dead
        if alive:
            raise RunStillRunning(
                f"run {run_id} is running: {', '.join(sorted(str(w) for w in alive))} "
                "still drive(s) it"
            )
        superseded = await tx.supersede_step_runs(
            run_id, f"its worker died; the run was recovered as recovery {new}"
        )
        await _release(tx, graph, run_id)
    states = await tx.step_run_states(run_id)
    latest: dict[tuple[str, str], StepRunState] = {}
    for state in states:
        key = (state.step, state.sequence)
        if key not in latest or (state.recovery, state.attempt) > (
            latest[key].recovery,
            latest[key].attempt,
        ):
            latest[key] = state
    steps = graph.program.steps
    if rerun is None:
        if run.status is RunStatus.success:
            raise NothingToRecover(
                f"run {run_id} succeeded: nothing to recover; `aeventor rerun {run_id[:8]} "
                "STEP` runs a step and what follows it again"
            )
        again = [
            key
            for key, state in latest.items()
            if state.status in RERUNNABLE and steps[state.step].recovery == "rerun"
        ]
        if not again and run.status is not RunStatus.running:
            # (A run whose controller died with only delays pending goes on: its new
            # controller reaches them.)
            kept = sorted(f"{s}[{q}]" for (s, q), st in latest.items() if st.status in RERUNNABLE)
            raise NothingToRecover(
                f"run {run_id}: no step run to run again"
                + (f" ({', '.join(kept)} did not succeed, but recovery='skip')" if kept else "")
            )
    else:
        if rerun not in latest:
            have = ", ".join(sorted(f"{s}[{q}]" for s, q in latest))
            raise NoResult(
                f"run {run_id} has no step run {rerun[0]}[{rerun[1]}] to rerun; it has: {have}"
            )
        again = [rerun]
    again.sort(key=lambda key: latest[key].id)
    # Carry the fired events over: the new generation starts where the last one ended.
    forget = graph.downstream(rerun[0]) if rerun is not None else frozenset()
    carried: dict[str, list[str]] = {}
    for sequence, event in await tx.fired_in(run_id, generation):
        if rerun is not None and sequence == rerun[1] and event in forget:
            continue
        carried.setdefault(sequence, []).append(event)
    for sequence, events in carried.items():
        await tx.add_triggers(run_id, sequence, new, events)
    await tx.resume_run(
        run_id,
        recovery=new,
        replay="recover" if rerun is None else "rerun",
        controller=controller,
        program=program,
    )
    ready = 0
    claims: list[Claim] = []
    queues: set[str | None] = set()
    by_sequence: dict[str, list[str]] = {}
    for step, sequence in again:
        by_sequence.setdefault(sequence, []).append(step)
    for sequence, make in by_sequence.items():
        budget = (
            None if take is None else dataclasses.replace(take, budget=take.budget - len(claims))
        )
        more, taken, more_queues = await _make_ready(
            tx, graph, run_id, sequence, new, make, False, budget, mode=run.mode
        )
        ready, claims, queues = ready + more, claims + taken, queues | more_queues
        # What their being ready fires (forgotten for a rerun step, carried otherwise).
        ready_events = [e for s in make for e in graph.trigger_events(s, StepStatus.ready)]
        more, taken, more_queues = await _fire(
            tx,
            graph,
            run_id,
            sequence,
            new,
            ready_events,
            False,
            None,
            mode=run.mode,
            replay="recover" if rerun is None else "rerun",
        )
        ready, queues = ready + more, queues | more_queues
    tx.notify(run_id, queues)
    return Recovery(
        new,
        tuple(again),
        superseded,
        Advance(ready, RunStatus.running, tuple(claims), due_in=tx.earliest_delay),
    )


# -- the shared steps of the transactions above ---------------------------------------------


async def _fire(
    tx: StoreTx,
    graph: Graph,
    run_id: str,
    sequence: str,
    recovery: int,
    events: Iterable[str],
    stopped: bool,
    take: Taker | None = None,
    *,
    mode: str,
    replay: str | None = None,
) -> tuple[int, list[Claim], set[str | None]]:
    """Fire events for one sequence.

    Returns how many step runs became ready for claimers, those taken for ``take``, and the
    queues the ready ones wait in. In a distributed run each step run is queued for its
    host's agents; in a standalone run for the run's own worker (queue None).

    In a recovered generation (``replay="recover"``), a step that succeeded in an earlier
    generation (or whose recovery policy is ``skip`` and that ran before) is not run again.
    """
    events = list(events)
    if not events:
        return 0, [], set()
    groups = graph.fact_groups(events)
    fired = None
    if all(group.issubset(events) for group in groups):
        # Firing consults nothing but the events themselves (a chain's link): record them
        # and learn which had fired before in one statement, where the store can.
        fired = await tx.fire_new(run_id, sequence, recovery, events)
    if fired is None:
        fired = await tx.fired(run_id, sequence, recovery, groups)
    plan = graph.fire(fired, events)
    if plan.events:
        await tx.add_triggers(run_id, sequence, recovery, plan.events)
    if plan.delays and not stopped:
        # A stopped run starts nothing new: what a delay would reach, it would only skip.
        await tx.add_delays(run_id, sequence, recovery, plan.delays)
    make = list(plan.steps)
    if make and replay == "recover" and recovery > 0:
        make = await _not_kept(tx, graph, run_id, sequence, recovery, make)
    return await _make_ready(tx, graph, run_id, sequence, recovery, make, stopped, take, mode=mode)


async def _not_kept(
    tx: StoreTx, graph: Graph, run_id: str, sequence: str, recovery: int, make: list[str]
) -> list[str]:
    """``make`` without the steps a recovered generation keeps: those that succeeded in an
    earlier generation, or ran there and say ``recovery="skip"``."""
    earlier = await tx.earlier_outcomes(run_id, sequence, recovery, make)
    steps = graph.program.steps
    return [
        s
        for s in make
        if s not in earlier
        or (earlier[s] is not StepStatus.success and steps[s].recovery == "rerun")
    ]


async def _make_ready(
    tx: StoreTx,
    graph: Graph,
    run_id: str,
    sequence: str,
    recovery: int,
    make: Sequence[str],
    stopped: bool,
    take: Taker | None,
    *,
    mode: str,
) -> tuple[int, list[Claim], set[str | None]]:
    """Create the step runs of ``make`` for one sequence: ready, or claimed for ``take`` (as
    :func:`_fire` returns them); skipped in a stopped run."""
    if not make:
        return 0, [], set()
    distributed = mode == "distributed"
    steps = graph.program.steps

    def row(step: str, status: StepStatus) -> NewStepRun:
        return _new_step_run(graph, run_id, step, sequence, recovery, status, mode=mode)

    if stopped:
        # A stopped run records the steps its events asked for, as skipped: nothing that
        # happened is lost, nothing new starts.
        await tx.add_step_runs([row(s, StepStatus.skipped) for s in make])
        return 0, [], set()
    mine: list[str] = []
    rest: list[str] = []
    waiting: list[str] = []
    for step in make:
        if step in graph.slots:
            waiting.append(step)  # ready once it holds its slots
        elif (
            take is not None
            and tx.claims_on_insert
            and len(mine) < take.budget
            and (take.hosts is None or steps[step].host in take.hosts)
        ):
            mine.append(step)
        else:
            rest.append(step)
    if rest:
        await tx.add_step_runs([row(s, StepStatus.ready) for s in rest])
    admitted = 0
    if waiting:
        rows = [row(s, StepStatus.waiting) for s in waiting]
        await tx.add_step_runs(rows)
        admitted = await _admit(tx, [r.key for new in rows for r in new.needs], count_for=run_id)
    claims: list[Claim] = []
    if mine:
        assert take is not None
        claims = await tx.add_claimed_step_runs(
            [row(s, StepStatus.active) for s in mine],
            worker=take.worker,
            lease=take.lease,
            token=take.token,
        )
    queues = {steps[s].host if distributed else None for s in rest}
    return len(rest) + admitted, claims, queues


def _new_step_run(
    graph: Graph,
    run_id: str,
    step: str,
    sequence: str,
    recovery: int,
    status: StepStatus,
    *,
    mode: str,
    attempt: int = 1,
) -> NewStepRun:
    """A new step run: in a distributed run queued for its host's agents and signed (the
    MAC agents verify before they run it: only a holder of the cluster key makes work for
    them); in a standalone run for the run's own worker."""
    host = graph.program.steps[step].host
    queue = host if mode == "distributed" else None
    mac = (
        graph.sign(
            run_id=run_id,
            step=step,
            sequence=sequence,
            recovery=recovery,
            attempt=attempt,
            host=host,
            queue=queue,
        )
        if mode == "distributed"
        else None
    )
    wanted = graph.slots.get(step)
    needs = () if wanted is None else pools.requests(wanted, run_id=run_id, host=host)
    return NewStepRun(
        run_id=run_id,
        step=step,
        sequence=sequence,
        recovery=recovery,
        status=StepStatus.waiting if needs and status is StepStatus.ready else status,
        host=host,
        queue=queue,
        attempt=attempt,
        mac=mac,
        needs=needs,
        priority=graph.program.steps[step].priority,
    )


async def _settle(
    tx: StoreTx, run_id: str, *, stopped: bool, graph: Graph | None = None
) -> RunStatus:
    """End the run if nothing is waiting, ready or active any more, and (unless it stopped)
    no delay is pending; return its status. (A stopped run's pending delays wait for a
    recovery.) An ended run gives back every slot it still holds."""
    pending = await tx.pending(run_id, delays=not stopped)
    status = final_run_status(pending=pending, stopped=stopped, cancelled=False)
    if status is not RunStatus.running:
        await tx.end_run(run_id, status)
        if graph is None or graph.slots:
            await _release_all_ended(tx, run_id)
        tx.notify(run_id)
    return status


async def _release(
    tx: StoreTx, graph: Graph, run_id: str, *, ended: tuple[int, str] | None = None
) -> int:
    """Give back the slots of the run's step runs that ended (``ended``: the one that just
    did, ``(id, step)``, whose ``releases`` apply), and admit who waited for them; return
    how many step runs of the run that made ready."""
    if not graph.slots:
        return 0
    if ended is not None:
        step = graph.program.steps[ended[1]]
        if step.releases is not None:
            await _hand_over(tx, graph, run_id, ended[0], step.name)
    return await _release_all_ended(tx, run_id, count_for=run_id)


async def _hand_over(tx: StoreTx, graph: Graph, run_id: str, step_run_id: int, step: str) -> None:
    """A step with its own ``releases``: what it acquired and does not release stays with
    the run; what it releases beyond that comes out of what the run kept."""
    definition = graph.program.steps[step]
    program_pools = graph.program.pools
    host = definition.host

    def key(pool: str) -> str:
        return pools.pool_key(program_pools[pool].scope, pool, run_id=run_id, host=host)

    acquired = {key(p): n for p, n in definition.acquires}
    released = {key(p): n for p, n in definition.releases or ()}
    keep = {k: n - released.get(k, 0) for k, n in acquired.items() if n > released.get(k, 0)}
    more = {k: n - acquired.get(k, 0) for k, n in released.items() if n > acquired.get(k, 0)}
    await tx.hand_over_slots(run_id, step_run_id, keep=keep, release=more)


async def _release_all_ended(tx: StoreTx, run_id: str, *, count_for: str | None = None) -> int:
    """Free the slots of the run's ended step runs (all of them once the run ended), admit
    the step runs waiting for those pools; return how many of ``count_for``'s it admitted."""
    freed = await tx.release_slots(run_id)
    if not freed:
        return 0
    return await _admit(tx, freed, count_for=count_for)


async def _admit(tx: StoreTx, keys: Iterable[str], *, count_for: str | None = None) -> int:
    """Admit the step runs waiting for the pools ``keys`` that can now hold all their slots
    (:func:`.pools.admit`, under the pools' locks): they become ready, and their workers are
    woken. Returns how many of them belong to ``count_for`` (default: any run)."""
    held, waiters = await tx.slot_waiters(sorted(set(keys)))
    admitted = pools.admit(waiters, held)
    if not admitted:
        return 0
    mine = 0
    for run_id, queue in await tx.admit_step_runs(admitted):
        if count_for is None or run_id == count_for:
            mine += 1
            tx.notify(run_id, {queue})
        else:
            tx.notify(run_id, {queue}, here=True)
    return mine


async def _ended_earlier(tx: StoreTx, claim: Claim, status: StepStatus) -> bool:
    """Whether an earlier attempt of ours already ended the step run with ``status``: it
    committed, only its acknowledgement was lost. (Asked on every refusal, not only in a
    retried transaction: a worker that outlived the store's retries tries again anew.)"""
    return await tx.step_state(claim.id) == (status, claim.token)


async def _claimed_earlier(tx: StoreTx, take: Taker | None, claims: list[Claim]) -> list[Claim]:
    """``claims`` and what an earlier attempt of this transaction claimed for ``take``."""
    if take is None:
        return claims
    known = {claim.id for claim in claims}
    earlier = await tx.claimed(worker=take.worker, token=take.token)
    return claims + [claim for claim in earlier if claim.id not in known]


def _group_by_sequence(triggers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for event, sequence in triggers:
        grouped.setdefault(sequence, []).append(event)
    return grouped
