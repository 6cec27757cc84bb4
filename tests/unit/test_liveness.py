"""Judging whether the workers of a run are gone: by pid and start time on this host, by
lease elsewhere, by a recorded stop anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from aeventor.dispatch.claims import RunWorkers, WorkerState
from aeventor.liveness import judge, local_pids, process_gone

NOW = datetime.now(UTC)


def worker(id_: str, host: str, *, pid: int = 4242, stopped: bool = False, lapsed: bool = False):
    return WorkerState(id_, host, pid, NOW, NOW if stopped else None, lapsed)


def test_this_process_is_alive() -> None:
    assert process_gone(os.getpid(), NOW) is None


def test_an_exited_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(child.pid, NOW) == f"no process {child.pid} on this host"


def test_a_zombie_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = datetime.now(UTC)  # as its worker's row would say: after the process began
    try:
        # Not reaped: it stays a zombie until wait(). Wait on /proc, with a deadline.
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while process_gone(child.pid, started) is None:
            assert datetime.now(UTC) < deadline, "the child never became a zombie"
            os.sched_yield()
        assert "zombie" in (process_gone(child.pid, started) or "")
    finally:
        child.wait()


def test_a_process_that_started_after_the_worker_is_another_one() -> None:
    long_ago = NOW - timedelta(days=1)
    assert process_gone(os.getpid(), long_ago) == (
        f"process {os.getpid()} on this host is another process (pid reused)"
    )


def test_judge_by_host_lease_and_stop() -> None:
    workers = RunWorkers(
        controller="here:1:a",
        holders=frozenset({"there:2:b", "there:3:c", "here:4:d", "gone:5:e", "ghost:6:f"}),
        known={
            "here:1:a": worker("here:1:a", "here"),
            "there:2:b": worker("there:2:b", "there"),
            "there:3:c": worker("there:3:c", "there", lapsed=True),
            "here:4:d": worker("here:4:d", "here"),
            "gone:5:e": worker("gone:5:e", "there", stopped=True),
        },
        unleased=frozenset(),
    )
    assert set(local_pids(workers, hostname="here")) == {"here:1:a", "here:4:d"}
    verdict = judge(workers, hostname="here", gone={"here:1:a": "no process 1", "here:4:d": None})
    assert verdict.dead == {"here:1:a", "there:3:c", "gone:5:e"}
    alive = "\n".join(verdict.alive)
    assert "there:2:b on host there (pid 4242) still holds its lease" in alive
    assert "here:4:d is alive: process 4242 on this host" in alive
    assert "ghost:6:f holds step runs whose leases have not lapsed" in alive


def test_a_holder_without_a_heartbeat_is_judged_by_its_leases() -> None:
    workers = RunWorkers(
        controller=None, holders=frozenset({"w"}), known={}, unleased=frozenset({"w"})
    )
    assert judge(workers, hostname="here").dead == {"w"}
