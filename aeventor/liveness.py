"""Is the process that drives a run still alive?

Recovery must never take a run from a live owner, and should not make anyone wait for a
lease to lapse when the owner is known to be gone. Every worker (a standalone run's, or an
agent's) records its host name, pid and start time in the store with its first heartbeat.
Its liveness is then judged, in this order:

- it recorded that it stopped: gone;
- it ran on this host: alive exactly when a process with its pid exists, is not a zombie,
  and started before the worker's row was written (a later process reuses the pid);
- it ran on another host: gone once its lease lapsed on the store's clock.

A worker with no heartbeat row is judged by the leases of the step runs it holds.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .dispatch.claims import RunWorkers, WorkerState
from .dispatch.store import Store
from .exceptions import RunStillRunning

__all__ = ("Verdict", "abandoned", "judge", "local_pids", "process_gone")

#: How much later than its worker's recorded start a process may have started and still be
#: that worker: covers clocks read at slightly different moments, never a reused pid (pids
#: cycle through millions before one comes back).
START_SLACK = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Which of a run's workers are gone, and why the others may still be alive.

    Attributes:
        dead: the ids of the workers that are gone.
        alive: one line per worker that may be alive, saying where and why.
    """

    dead: frozenset[str]
    alive: tuple[str, ...]


def process_gone(pid: int, started: datetime) -> str | None:
    """Why the process ``pid`` of this host, recorded as started at ``started``, is gone;
    None while it lives. Reads ``/proc`` (blocking: call it off the event loop)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"no process {pid} on this host"
    except PermissionError:
        pass  # it exists, as another user's
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None  # no /proc (not Linux): the pid exists, so it may be the worker
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return f"process {pid} on this host has exited (a zombie)"
    began = datetime.fromtimestamp(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), UTC)
    if began > started + START_SLACK:
        return f"process {pid} on this host is another process (pid reused)"
    return None


def judge(
    workers: RunWorkers,
    *,
    hostname: str | None = None,
    gone: dict[str, str | None] | None = None,
) -> Verdict:
    """Judge the controller and the holders of a run (:meth:`Store.run_workers`).

    Args:
        hostname: this host's name (default: :func:`socket.gethostname`).
        gone: :func:`process_gone`'s answers for the workers of this host, by worker id,
            computed by the caller off the event loop (see :func:`local_pids`).
    """
    here = socket.gethostname() if hostname is None else hostname
    gone = gone or {}
    dead: set[str] = set()
    alive: list[str] = []
    ids = set(workers.holders)
    if workers.controller is not None:
        ids.add(workers.controller)
    for worker in sorted(ids):
        state = workers.known.get(worker)
        why = _why_alive(worker, state, here, workers, gone)
        if why is None:
            dead.add(worker)
        else:
            alive.append(why)
    return Verdict(frozenset(dead), tuple(alive))


def local_pids(workers: RunWorkers, *, hostname: str | None = None) -> dict[str, WorkerState]:
    """The workers of ``workers`` that ran on this host and did not record a stop."""
    here = socket.gethostname() if hostname is None else hostname
    return {
        id_: state
        for id_, state in workers.known.items()
        if state.hostname == here and state.stopped is None
    }


def _why_alive(
    worker: str,
    state: WorkerState | None,
    here: str,
    workers: RunWorkers,
    gone: dict[str, str | None],
) -> str | None:
    if state is None:
        if worker in workers.holders and worker not in workers.unleased:
            return f"{worker} holds step runs whose leases have not lapsed"
        return None
    if state.stopped is not None:
        return None
    if state.hostname == here:
        if worker in gone and gone[worker] is not None:
            return None
        return f"{worker} is alive: process {state.pid} on this host"
    if state.lease_lapsed:
        return None
    return (
        f"{worker} on host {state.hostname} (pid {state.pid}) still holds its lease; if it "
        "died, its lease lapses within the lease time (30 s by default): try again then"
    )


async def abandoned(store: Store, run_id: str) -> tuple[RunWorkers, frozenset[str]]:
    """The run's controller and workers, and the ids of those that are gone.

    Raises:
        RunStillRunning: one of them may be alive; the message says who and where.
    """
    workers = await store.run_workers(run_id)
    gone = {
        id_: await asyncio.to_thread(process_gone, state.pid, state.started)
        for id_, state in local_pids(workers).items()
    }
    verdict = judge(workers, gone=gone)
    if verdict.alive:
        raise RunStillRunning(
            f"run {run_id} is still running: "
            + "; ".join(verdict.alive)
            + f". `aeventor cancel {run_id[:8]}` stops it"
        )
    return workers, verdict.dead
