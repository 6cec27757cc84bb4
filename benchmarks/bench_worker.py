"""The one ``Worker`` in its agent role, beside a standalone run of the same program.

A fan-out of ``--steps`` (1,000) no-op steps on host ``h`` from one event, on Postgres (a scratch
database ``aev_bench_<pid>_<n>``, dropped at the end), timed two ways in the same run:

- **standalone**: ``await Eventor(store=pg).run()``: a worker scoped to the run, in this
  process (register, create the run, every step, load the result);
- **agent worker**: a :class:`~aeventor.dispatch.worker.Worker` with
  ``Scope(hosts=("h",))``, built as :class:`aeventor.agent.Agent` builds it
  (:class:`~aeventor.dispatch.trust.SignedPrograms` with a cluster key, the local executor,
  reaper on, the agent's lease and heartbeat), running in this process and already
  listening; the clock runs from :func:`aeventor.submission.submit` (on a second store
  object, as a submitter elsewhere would) until the worker has recorded the last step, and
  includes loading the result, as ``Eventor.run()`` in distributed mode does.

Both at the agent's default concurrency (8) and with no limit (the Eventor default); steps/s
is steps / wall time, the ratio is agent / standalone at the same concurrency. Standalone
and agent runs alternate, so drift on the shared machine hits both.

Run: ``.venv/bin/python -m benchmarks.bench_worker`` (``--steps N``, ``--repeats N``); also
part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Self

import structlog

import aeventor as evr
from aeventor.backends.executors.local import LocalExecutor
from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import Database
from aeventor.dispatch.executor import ExecResult, StepLaunch
from aeventor.dispatch.trust import SignedPrograms
from aeventor.dispatch.worker import Scope, Worker, WorkerConfig
from aeventor.program.model import StepDef
from aeventor.submission import submit
from benchmarks._common import machine, scratch_database, server_versions

HOST = "h"
KEY = b"benchmark-cluster-key"
#: The agent's defaults (aeventor.agent.AgentConfig).
AGENT_CONCURRENCY = 8
AGENT_LEASE = 30.0
AGENT_HEARTBEAT = 5.0


def define(
    n: int, *, distributed: bool, logs: Path, store: str, concurrency: int | None
) -> evr.Eventor:
    ev = evr.Eventor(
        name=f"fan-{n}",
        store=store,
        log_dir=logs,
        mode="distributed" if distributed else "standalone",
        max_concurrency=concurrency,
        cluster_key=KEY if distributed else None,
    )
    go = ev.add_event("go")
    steps = [ev.add_step(f"s{i}", host=HOST) for i in range(n)]
    ev.add_assoc(go, *steps)
    ev.trigger_event(go, 1)
    return ev


async def standalone(url: str, n: int, concurrency: int | None, logs: Path) -> float:
    ev = define(n, distributed=False, logs=logs, store=url, concurrency=concurrency)
    async with ev:
        began = time.perf_counter()
        result = await ev.run()
        elapsed = time.perf_counter() - began
    assert result, result.reason
    assert len(result.steps) == n, len(result.steps)
    return elapsed


class CountingExecutor:
    """The local executor, counting the step runs it finished."""

    def __init__(self) -> None:
        self.inner = LocalExecutor()
        self.done = 0

    async def run(self, launch: StepLaunch) -> ExecResult:
        result = await self.inner.run(launch)
        self.done += 1
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


class AgentWorker:
    """A worker scoped to host ``h``, as the agent builds it, running until closed."""

    def __init__(self, url: str, concurrency: int | None, logs: Path) -> None:
        self.db: Database = open_store(url, program="aeventor-agent")
        self.executor = CountingExecutor()
        self.worker = Worker(
            store=self.db,
            scope=Scope(hosts=(HOST,)),
            config=WorkerConfig(
                concurrency=concurrency,
                lease=AGENT_LEASE,
                heartbeat=AGENT_HEARTBEAT,
                grace=30.0,
                reap=True,
                record_abandoned=True,
                log_dir=logs,
            ),
            programs=SignedPrograms(self.db, key=KEY, allow=("*",)),
            route=self._route,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _route(self, step: StepDef) -> tuple[CountingExecutor, StepDef]:
        return self.executor, step

    async def __aenter__(self) -> Self:
        await self.db.open()
        ready = asyncio.Event()
        self.task = asyncio.create_task(self.worker.run(self.stop, ready=ready))
        async with asyncio.timeout(30):
            await ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        await self.executor.aclose()
        await self.db.aclose()


async def agent_run(agent: AgentWorker, submitter: Database, n: int, logs: Path) -> float:
    program = define(n, distributed=True, logs=logs, store=":memory:", concurrency=None).program
    done = agent.executor.done
    began = time.perf_counter()
    run_id = await submit(submitter, program, [("go", "1")], key=KEY)
    # The worker's tasks leave its table once their outcome is recorded. Polling two
    # in-process counters each millisecond touches no database (a follower reading the run
    # status at each NOTIFY would add a query per step to the measurement).
    while agent.executor.done - done < n or agent.worker.running:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    result = await submitter.load_result(run_id)
    elapsed = time.perf_counter() - began
    assert result, result.reason
    assert len(result.steps) == n, len(result.steps)
    return elapsed


async def worker_table(tmp: Path, n: int, repeats: int) -> list[str]:
    logs = tmp / "worker-logs"
    rows: list[tuple[str, list[float]]] = []
    async with scratch_database("postgres") as scratch:
        url = scratch.url
        # The schema exists before anything is timed.
        async with open_store(url, program="bench"):
            pass
        for concurrency in (AGENT_CONCURRENCY, None):
            alone: list[float] = []
            agent_times: list[float] = []
            submitter = open_store(url, program="bench-submit")
            async with submitter, AgentWorker(url, concurrency, logs) as agent:
                # One warm-up of each (first program verification, connection pools).
                await standalone(url, min(n, 50), concurrency, logs)
                await agent_run(agent, submitter, min(n, 50), logs)
                for i in range(repeats):
                    if i % 2:
                        agent_times.append(await agent_run(agent, submitter, n, logs))
                        alone.append(await standalone(url, n, concurrency, logs))
                    else:
                        alone.append(await standalone(url, n, concurrency, logs))
                        agent_times.append(await agent_run(agent, submitter, n, logs))
            limit = "no limit" if concurrency is None else f"concurrency {concurrency}"
            rows.append((f"standalone Eventor.run(), {limit}", alone))
            rows.append((f"agent worker Scope(hosts), {limit}", agent_times))
    head = f"postgres, fan-out of {n:,} no-op steps"
    lines = [
        f"{head:<44}{'steps/s':>9}{'wall s':>8}{'min s':>8}{'max s':>8}{'ratio':>7}",
    ]
    for i, (label, times) in enumerate(rows):
        median = statistics.median(times)
        peer = statistics.median(rows[i - 1][1]) if i % 2 else median
        ratio = f"{peer / median:>7.2f}" if i % 2 else f"{'1.00':>7}"
        lines.append(
            f"{label:<44}{n / median:>9.0f}{median:>8.3f}{min(times):>8.3f}{max(times):>8.3f}"
            f"{ratio}"
        )
    lines.append(
        f"  (median of {repeats}; ratio: agent steps/s over standalone steps/s at the same "
        "concurrency)"
    )
    return lines


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="aeventor-bench-") as tmp_name:
        lines = await worker_table(Path(tmp_name), args.steps, args.repeats)
    print("\n".join(machine() + await server_versions(mysql=False)))
    print()
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
