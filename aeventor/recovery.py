"""Recover a run, or rerun one of its step runs, from any process that reaches its store.

:func:`recover` continues a run that failed, was cancelled, or whose controller died: the
same run goes on in a new *recovery generation*. Its step runs that succeeded are kept and
never executed again; those that failed, were lost, cancelled or skipped run again (unless
their step says ``recovery="skip"``), and what they trigger follows. :func:`rerun` runs one
step run again, whatever its outcome, and everything that follows from it.

Both use the program definition stored with the run. A standalone run is driven to its end
by the calling process (its in-loop steps run in the step runner, which imports them by
path, as agents run them); a distributed run's new step runs go to its hosts' agents, and
the call follows the run to its end. ``await ev.run(recover=run_id)`` recovers from the
script itself, with the script's callables (and, with ``force=True``, a changed program).

How a run is recovered (see :func:`aeventor.dispatch.transactions.recover_run`): every event
fired so far stays fired in the new generation, so only what the rerun step runs cause fires
anew; the new step runs are made in the same transaction that starts the generation, which
also checks that nobody recovered the run meanwhile, so two recoveries at once recover once.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL

from ._eventor import Eventor
from .records import RunResult

__all__ = ("continue_run", "recover", "rerun")


async def recover(
    store: str | Path | URL,
    run_id: str,
    *,
    force: bool = False,
    max_concurrency: int | None = None,
    cluster_key: bytes | str | None = None,
) -> RunResult:
    """Recover a run and drive (or, distributed, follow) it to its end.

    A run whose controller is dead is recovered without waiting for its lease to lapse
    when the controller ran on this host (its host and pid are recorded); one on another
    host once its lease lapsed.

    Args:
        store: a URL, sqlite path or store name.
        run_id: the run's id, or a unique prefix of it.
        force: recover even though a newer version of the run's program was registered
            since the run was made (the run's own version is used).
        max_concurrency: most step runs executing at once (standalone runs).
        cluster_key: the key that signs the new step runs of a distributed run (default:
            ``$AEVENTOR_CLUSTER_KEY`` or the key file).

    Returns:
        The run's result after the recovery.

    Raises:
        RunStillRunning: its controller, or a worker running its steps, is alive.
        NothingToRecover: it succeeded, or no step run is to run again.
        ProgramChanged: a newer version of its program exists, and not ``force``.
        NoResult: no run has this id or prefix.

    .. versionadded:: 0.1
    """
    ev = Eventor(
        name="aeventor", store=store, max_concurrency=max_concurrency, cluster_key=cluster_key
    )
    return await ev._recover(run_id, force=force, program=None)


async def rerun(
    store: str | Path | URL,
    run_id: str,
    step: str,
    *,
    sequence: str | int | None = None,
    force: bool = False,
    max_concurrency: int | None = None,
    cluster_key: bytes | str | None = None,
) -> RunResult:
    """Run one step run of an ended run again, and what it triggers.

    Args:
        step: the step.
        sequence: its sequence; may be left out when the step ran for one sequence only.

    Other arguments, the result and the errors are :func:`recover`'s.

    .. versionadded:: 0.1
    """
    ev = Eventor(
        name="aeventor", store=store, max_concurrency=max_concurrency, cluster_key=cluster_key
    )
    where = None if sequence is None else str(sequence)
    return await ev._recover(run_id, force=force, program=None, rerun=(step, where))


async def continue_run(
    store: str | Path | URL, run_id: str, *, max_concurrency: int | None = None
) -> RunResult:
    """Continue a standalone run in its generation (the original's ``RunMode.continue``):
    act on what is due now (its ready step runs, the delays and retries that came due, and
    what they cause) and return, the run still ``running`` if more is due later. Run it
    again, from cron for example, when that comes due. Nothing is run again.

    Raises:
        RunStillRunning: its controller is alive, or left step runs running when it died
            (``aeventor recover`` runs those again).
        NothingToRecover: the run has ended.
        ConfigurationError: a distributed run (its agents continue it).

    .. versionadded:: 0.1
    """
    from ._eventor import _continue_run

    ev = Eventor(name="aeventor", store=store, max_concurrency=max_concurrency)
    return await _continue_run(ev, run_id)
