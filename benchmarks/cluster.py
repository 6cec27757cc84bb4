"""Agent processes for the scale-out and memory benchmarks, and the standalone memory child.

Agents are ``python -m aeventor.agent`` on loopback, one distinct ``--host`` name each, started
as the acceptance tests start them (``tests/acceptance/agents.py``): the cluster key in
``AEVENTOR_CLUSTER_KEY``, JSON logs to a file, ready once they logged ``agent.ready``, stopped
with SIGTERM. The programs they run are fan-outs of no-op steps without a function (an agent
runs an in-loop step as a subprocess, so a no-op without a function is what measures the
engine rather than interpreter starts).

``python -m benchmarks.cluster standalone --store URL --steps N`` is the standalone child of
the memory benchmark: it runs a fan-out of ``N`` in-loop no-op steps and prints one JSON line
with its peak RSS before and after the run; ``open --store URL`` times the first store open
of a new process (the open benchmark's cold row).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.submission import submit
from benchmarks._common import fan_out, noop_async

ROOT = Path(__file__).resolve().parents[1]
KEY = "benchmark-cluster-key-0123456789abcdef"
LISTENER = "aeventor listener"  # aeventor.backends.stores.postgres.LISTENER_APPLICATION_NAME


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEVENTOR_")}
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**env, "AEVENTOR_CLUSTER_KEY": KEY, "PYTHONPATH": path}


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of process ``pid`` (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class AgentProc:
    proc: asyncio.subprocess.Process
    log: Path

    def ready(self) -> bool:
        try:
            return b'"agent.ready"' in self.log.read_bytes()
        except FileNotFoundError:
            return False


@asynccontextmanager
async def agents(
    url: str, hosts: Sequence[str], logs: Path, *, concurrency: int | None
) -> AsyncIterator[list[AgentProc]]:
    """One agent per host name, all ready; SIGTERMed (then killed) on the way out."""
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    started: list[AgentProc] = []
    try:
        for host in hosts:
            argv = ["--store", url, "--host", host, "--json-logs", "--log-level", "WARNING"]
            argv += ["--log-dir", str(logs / "steps"), "--allow", "benchmarks.*"]
            if concurrency is not None:
                argv += ["--max-concurrency", str(concurrency)]
            log = logs / f"agent-{host}.log"
            with open(log, "wb") as fh:  # noqa: ASYNC230 - creating an empty file
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "aeventor.agent",
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=fh,
                    stderr=fh,
                    env=agent_env(),
                    cwd=ROOT,
                )
            started.append(AgentProc(proc, log))
        async with asyncio.timeout(60 + 5 * len(hosts)):
            for agent in started:
                while not agent.ready():
                    if agent.proc.returncode is not None:
                        raise RuntimeError(
                            f"agent exited with {agent.proc.returncode}:\n"
                            f"{agent.log.read_text(errors='replace')[-2000:]}"
                        )
                    await asyncio.sleep(0.05)
        yield started
    finally:
        for agent in started:
            if agent.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    agent.proc.send_signal(signal.SIGTERM)
        for agent in started:
            try:
                async with asyncio.timeout(30):
                    await agent.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    agent.proc.kill()
                await agent.proc.wait()


def distributed_fan_out(n: int, hosts: Sequence[str]) -> evr.Eventor:
    ev = evr.Eventor(name=f"fan-{n}", store=":memory:", mode="distributed", cluster_key=KEY)
    fan_out(ev, n, None, hosts=hosts)
    return ev


@dataclass
class ClusterRun:
    wall: float
    submit: float
    span: float
    steps: int
    peak_connections: int
    peak_listeners: int
    status: str
    #: Times the monitor's connection was lost and opened again (the server restarted).
    monitor_reconnects: int = 0


class Monitor:
    """A plain asyncpg connection to the benchmark's database, opened again if the server
    drops it (a CI run beside the benchmark may restart the shared server)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None
        self.reconnects = 0

    async def query(self, how: str, sql: str, *args: object) -> Any:
        for attempt in range(30):
            try:
                if self.conn is None:
                    self.conn = await asyncpg.connect(self.dsn)
                return await getattr(self.conn, how)(sql, *args)
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.exceptions._base.InternalClientError,
            ):
                if attempt == 29:
                    raise
                await self.aclose()
                self.reconnects += 1
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.terminate()


async def run_on_agents(url: str, dsn: str, n: int, hosts: Sequence[str]) -> ClusterRun:
    """Submit a fan-out of ``n`` no-op steps over ``hosts`` and wait for the agents to end it.

    The connections of the database are sampled while it runs (every 50 ms, on a plain
    asyncpg connection that is not counted); the submitter's store is closed before.
    """
    ev = distributed_fan_out(n, hosts)
    program = ev.program
    monitor = Monitor(dsn)
    try:
        await monitor.query("fetchval", "SELECT 1")
        began = time.perf_counter()
        async with open_store(url, program="bench-submit") as db:
            run_id = await submit(db, program, [("go", "1")], key=KEY.encode())
        submitted = time.perf_counter()
        peak = peak_listeners = 0
        status = "running"
        deadline = time.monotonic() + 300 + n / 10
        while status == "running":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agents did not end run {run_id} of {n} steps in time")
            row = await monitor.query(
                "fetchrow",
                "SELECT count(*) AS n, count(*) FILTER (WHERE application_name = $1) AS l"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                LISTENER,
            )
            peak, peak_listeners = max(peak, row["n"]), max(peak_listeners, row["l"])
            status = await monitor.query(
                "fetchval", "SELECT status FROM aeventor_run WHERE id = $1", run_id
            )
            if status == "running":
                await asyncio.sleep(0.05)
        wall = time.perf_counter() - began
        span_row = await monitor.query(
            "fetchrow",
            "SELECT count(*) AS n, extract(epoch FROM max(ended) - min(started)) AS s"
            " FROM aeventor_step_run WHERE run_id = $1",
            run_id,
        )
    finally:
        await monitor.aclose()
    return ClusterRun(
        wall=wall,
        submit=submitted - began,
        span=float(span_row["s"] or 0.0),
        steps=int(span_row["n"]),
        peak_connections=peak,
        peak_listeners=peak_listeners,
        status=str(status),
        monitor_reconnects=monitor.reconnects,
    )


# -- the standalone memory child -------------------------------------------------------------


def _rss_mb() -> float:
    # Not ru_maxrss: Linux carries the parent's high-water mark at fork over exec, so a
    # child of a large benchmark process would report at least the parent's size.
    return vm_hwm_mb(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _standalone(store: str, n: int, logs: str) -> dict[str, object]:
    ev = evr.Eventor(name=f"rss-{n}", store=store, log_dir=logs)
    fan_out(ev, n, noop_async)
    before = _rss_mb()
    began = time.perf_counter()
    result = await ev.run()
    return {
        "ok": bool(result),
        "steps": len(result.steps),
        "seconds": time.perf_counter() - began,
        "rss_before_mb": before,
        "rss_peak_mb": _rss_mb(),
    }


async def _first_open(store: str) -> dict[str, object]:
    db = open_store(store, program="bench")
    began = time.perf_counter()
    await db.open()
    opened = time.perf_counter() - began
    await db.aclose()
    return {"first_open_ms": opened * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description="the children of the memory and open benchmarks")
    parser.add_argument("mode", choices=["standalone", "baseline", "open"])
    parser.add_argument("--store", default=":memory:")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--log-dir", default=".")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.mode == "baseline":
        evr.Eventor  # noqa: B018 - import what a run imports before reading the peak
        from aeventor.backends.stores import postgres  # noqa: F401

        print(json.dumps({"rss_peak_mb": _rss_mb()}))
        return
    if args.mode == "open":
        # The first open of a new process: aeventor is imported, the backend and the
        # migrations are not yet (as in a CLI command or an agent starting).
        print(json.dumps(asyncio.run(_first_open(args.store))))
        return
    print(json.dumps(asyncio.run(_standalone(args.store, args.steps, args.log_dir))))


if __name__ == "__main__":
    main()
