"""``python -m benchmarks``: the side-by-side benchmark suite of issue 11.

Each benchmark prints one table, every figure beside its floor or peer measured in the same
run; targets are ratios of two figures of the run (or of a figure to the issue's absolute
limit), marked ``met`` or ``MISSED``, and collected at the end. Nothing asserts speed.

Benchmarks, in the order they run (the floors first, so the engine's tables can show them):

- ``open``: opening a store whose schema is current, beside a bare driver connect;
- ``floors``: (Postgres) a bare LISTEN/NOTIFY round trip, a minimal SKIP LOCKED queue in
  batches of 1 and 10, a minimal durable chain, pgqueuer's drain rate and latency;
- ``chain``: hop from a step's recorded end to the next one's recorded start in a chain, for
  each executor (in-loop, process; any executor added to ``CHAIN_EXECUTORS``);
- ``fanout``: a fan-out of in-loop no-op steps joined by an AND event: steps/s and engine
  CPU per step (``time.process_time``); also at a fifth of the size and without the join;
- ``runs``: concurrent runs of a 10-step chain in one database: runs/s;
- ``idle``: the chain's hop with idle pending step runs of other runs in the database, as a
  ratio to the empty database;
- ``scaleout``: (Postgres) 1..32 agent processes on one fan-out: steps/s, connections;
- ``rss``: peak RSS of a standalone process and of an agent running a large program.

``--quick`` shrinks every size so the whole suite takes a minute or two; each size also has
its own flag. ``--backends sqlite`` runs without the servers. Scratch databases are named
``aev_bench_<pid>_<n>`` and dropped at the end of each benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as t
from aeventor.program.model import EXECUTORS
from benchmarks import cluster, peers
from benchmarks._common import (
    BACKENDS,
    MY_ADMIN,
    Table,
    Target,
    chain,
    describe,
    fan_out,
    hops,
    machine,
    median_p95,
    ms,
    noop_async,
    ratio,
    recorded_span,
    scratch_database,
    server_up,
    server_versions,
)
from benchmarks._steps import noop

#: Executors the chain benchmark measures: name -> (label, step function). Only those in
#: aeventor.program.model.EXECUTORS run; a new executor (a warm process pool) is one line.
CHAIN_EXECUTORS: dict[str, tuple[str, Callable[..., object]]] = {
    "inloop": ("in-loop", noop_async),
    "warm": ("warm process", noop),
    "process": ("fresh process", noop),
}

#: Full and ``--quick`` sizes of every benchmark (each has its own flag too).
SIZES: dict[str, tuple[Any, Any]] = {
    "chain_steps": (200, 20),
    "process_chain_steps": (200, 10),
    "fanout_steps": (5_000, 200),
    "runs": (100, 10),
    "run_steps": (10, 5),
    "idle_rows": (10_000, 500),
    "jobs": (5_000, 500),
    "probes": (200, 20),
    "agents": ("1,2,4,8,16,32", "1,2"),
    "scaleout_steps": (20_000, 400),
    "rss_steps": (10_000, 300),
    "opens": (20, 5),
}

#: Connections of the shared Postgres the scale-out leaves to others (a CI run beside it).
SPARE_CONNECTIONS = 20


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    backends: list[str]
    #: Figures other tables show beside their own ("floors.pgq_rate", ...).
    figures: dict[str, float] = field(default_factory=dict)

    def size(self, name: str) -> Any:
        return getattr(self.args, name)

    @property
    def postgres(self) -> bool:
        return "postgres" in self.backends

    def logs(self, name: str) -> Path:
        path = self.tmp / "logs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


Bench = Callable[[Context], Awaitable[list[Table]]]


# -- open ------------------------------------------------------------------------------------


async def bare_connect(backend: str, url: str) -> None:
    if backend == "postgres":
        import asyncpg

        from aeventor.backends.stores.pg_listener import asyncpg_dsn

        conn = await asyncpg.connect(asyncpg_dsn(url))
        await conn.close()
    elif backend == "mariadb":
        import aiomysql

        my = await aiomysql.connect(**MY_ADMIN, db=url.rsplit("/", 1)[1])
        my.close()
    else:
        import aiosqlite

        async with aiosqlite.connect(url) as conn:
            await conn.execute("SELECT 1")


async def bench_open(ctx: Context) -> list[Table]:
    n = ctx.size("opens")
    table = Table(
        f"open a store whose schema is current (ms, median of {n} after a warm-up)",
        ["backend", "open()", "p95", "bare connect", "open / connect", "first open, new process"],
    )
    for backend in ctx.backends:
        async with scratch_database(backend, str(ctx.tmp)) as scratch:
            async with open_store(scratch.url, program="bench"):
                pass  # creates the schema
            opens, connects = [], []
            for i in range(n + 1):
                db = open_store(scratch.url, program="bench")
                began = time.perf_counter()
                await db.open()
                opened = time.perf_counter() - began
                await db.aclose()
                began = time.perf_counter()
                await bare_connect(backend, scratch.url)
                connected = time.perf_counter() - began
                if i:
                    opens.append(opened)
                    connects.append(connected)
            first = (await _child("open", "--store", scratch.url))["first_open_ms"]
        open_ms, open_p95 = median_p95(ms(opens))
        connect_ms = statistics.median(ms(connects))
        table.add(backend, open_ms, open_p95, connect_ms, ratio(open_ms, connect_ms), first)
        table.targets.append(Target(f"{backend} open / 50 ms", open_ms / 50, "<=", 1.0))
        table.targets.append(
            Target(f"{backend} first open in a new process / 50 ms", first / 50, "<=", 1.0)
        )
    table.notes.append(
        "first open, new process: aeventor imported, the backend module and the migrations "
        "not yet (a CLI command, an agent starting)"
    )
    return [table]


# -- floors and peer -------------------------------------------------------------------------


async def bench_floors(ctx: Context) -> list[Table]:
    if not ctx.postgres:
        return [_skipped("floors and peer", "needs Postgres (--backends postgres)")]
    from aeventor.backends.stores.pg_listener import asyncpg_dsn
    from benchmarks.bench_notify import measure

    jobs, probes = ctx.size("jobs"), ctx.size("probes")
    consumers = ctx.args.queue_consumers
    table = Table(
        "Postgres floors and peer (same server, same run)",
        ["what", "jobs/s", "median ms", "p95 ms", "samples"],
    )
    async with scratch_database("postgres") as scratch:
        notify, select, _ = await measure(asyncpg_dsn(scratch.url), probes)
        n_med, n_p95 = median_p95(ms(notify))
        s_med, s_p95 = median_p95(ms(select))
        table.add("LISTEN/NOTIFY round trip (2 connections)", None, n_med, n_p95, len(notify))
        table.add("SELECT 1 round trip", None, s_med, s_p95, len(select))
        ctx.figures["floors.notify_ms"] = n_med
        for batch in (1, 10):
            rate = await peers.skip_locked_queue(scratch.dsn, jobs, batch, consumers)
            table.add(
                f"SKIP LOCKED queue, batches of {batch}, {consumers} consumers, {jobs:,} jobs",
                rate,
                None,
                None,
                jobs,
            )
            ctx.figures[f"floors.queue_b{batch}"] = rate
        chain_hops = await peers.durable_chain(scratch.dsn, probes)
        c_med, c_p95 = median_p95(ms(chain_hops))
        table.add("minimal durable chain hop (1 process)", None, c_med, c_p95, len(chain_hops))
        ctx.figures["floors.durable_hop_ms"] = c_med
        pgq = await peers.pgqueuer(scratch.dsn, jobs, probes)
        if pgq.error is not None:
            table.add(f"pgqueuer: {pgq.error}", None, None, None, None)
        else:
            assert pgq.drain_rate is not None
            l_med, l_p95 = median_p95(ms(pgq.latencies))
            table.add(f"pgqueuer {pgq.version} drain, {jobs:,} no-op jobs", pgq.drain_rate)
            table.add(f"pgqueuer {pgq.version} enqueue -> start", None, l_med, l_p95, probes)
            ctx.figures["floors.pgq_rate"] = pgq.drain_rate
            ctx.figures["floors.pgq_latency_ms"] = l_med
    table.notes.append(
        "the queue: claim a batch with UPDATE .. SKIP LOCKED RETURNING, complete it in a 2nd "
        "transaction; the chain: complete i + insert i+1 in one transaction, claim i+1 in another"
    )
    return [table]


# -- chain -----------------------------------------------------------------------------------


async def bare_starts(n: int) -> list[float]:
    """Seconds per sequential ``python -c pass``."""
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await proc.wait()
        samples.append(time.perf_counter() - began)
    return samples


async def run_chain(
    store: str, n: int, func: Callable[..., object], executor: str, logs: Path
) -> evr.RunResult:
    ev = evr.Eventor(name=f"chain-{executor}", store=store, log_dir=logs)
    chain(ev, n, func, executor=executor)
    async with ev:
        result = await ev.run()
    if not result:
        raise RuntimeError(f"chain on {store}: {result.reason}")
    return result


async def bench_chain(ctx: Context) -> list[Table]:
    executors = {name: spec for name, spec in CHAIN_EXECUTORS.items() if name in EXECUTORS}
    table = Table(
        "chain of no-op steps: hop = next step's recorded start - previous step's recorded end",
        ["backend, executor", "steps", "hop median ms", "hop p95 ms", "step ms", "wall / step ms"],
    )
    process_per_step: dict[str, float] = {}
    for backend in ctx.backends:
        for name, (label, func) in executors.items():
            n = ctx.size("chain_steps" if name == "inloop" else "process_chain_steps")
            async with scratch_database(backend, str(ctx.tmp)) as scratch:
                result = await run_chain(scratch.url, n, func, name, ctx.logs("chain"))
            hop_med, hop_p95 = median_p95(ms(hops(result)))
            durations = [
                (s.ended - s.started).total_seconds() * 1000
                for s in result.steps
                if s.started and s.ended
            ]
            per_step = recorded_span(result) / n * 1000
            table.add(
                f"{backend}, {label}", n, hop_med, hop_p95, statistics.median(durations), per_step
            )
            ctx.figures[f"chain.{backend}.{name}.hop_ms"] = hop_med
            ctx.figures[f"chain.{backend}.{name}.link_ms"] = per_step
            if name != "inloop":
                process_per_step[f"{backend}.{name}"] = per_step
    starts = ms(await bare_starts(20))
    start_ms = statistics.median(starts)
    table.add("  floor: `python -c pass`, sequential", 20, None, None, start_ms, start_ms)
    durable = ctx.figures.get("floors.durable_hop_ms")
    notify = ctx.figures.get("floors.notify_ms")
    if durable is not None:
        table.add("  floor: minimal durable chain (Postgres)", None, durable, None, None, None)
    if notify is not None:
        table.add("  floor: LISTEN/NOTIFY round trip", None, notify, None, None, None)
    if "postgres" in ctx.backends:
        note = "" if durable is not None else "run `floors` too"
        for name, limit in (("inloop", 2.0), ("warm", 4.0)):
            if name not in executors:
                continue
            label = executors[name][0]
            for what, key in (("recorded hop", "hop_ms"), ("wall / step", "link_ms")):
                figure = ctx.figures.get(f"chain.postgres.{name}.{key}")
                table.targets.append(
                    Target(
                        f"postgres {label} {what} / durable chain hop",
                        ratio(figure, durable),
                        "<=",
                        limit,
                        note,
                    )
                )
    for key, per_step in process_per_step.items():
        backend, name = key.split(".")
        if backend == "postgres" or "postgres" not in ctx.backends:
            table.targets.append(
                Target(
                    f"{backend} {executors[name][0]} chain / bare `python -c pass` starts",
                    per_step / start_ms,
                    "<=",
                    0.3,
                )
            )
    table.notes.append(
        "step ms: a step's recorded end - its start; wall / step: first recorded start to last "
        "end / steps, the whole cost of one link (the 20-step target compares it to bare starts)"
    )
    table.notes.append(
        "the recorded hop starts at `ended` (stamped before the completing transaction commits) "
        "and stops at `started` (stamped before the claim commits): the durable chain's hop "
        "spans both commits, so wall / step is the like-for-like figure"
    )
    return [table]


# -- fan-out ---------------------------------------------------------------------------------


async def run_fan_out(store: str, n: int, logs: Path, *, join: bool) -> tuple[float, float]:
    """Wall seconds and engine CPU seconds of a fan-out of ``n`` in-loop no-ops (and a join)."""
    ev = evr.Eventor(name=f"fan-{n}", store=store, log_dir=logs)
    fan_out(ev, n, noop_async, join=join)
    ev.program  # noqa: B018 - build the program before the clocks run
    async with ev:
        cpu, began = time.process_time(), time.perf_counter()
        result = await ev.run()
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    if not result or len(result.steps) != n + join:
        raise RuntimeError(f"fan-out on {store}: {result.reason} ({len(result.steps)} steps)")
    return wall, cpu


async def bench_fanout(ctx: Context) -> list[Table]:
    n = ctx.size("fanout_steps")
    table = Table(
        "fan-out of in-loop no-op steps joined by an AND event (standalone, no limit)",
        ["backend", "join", "steps", "steps/s", "wall s", "CPU ms/step", "CPU / wall"],
    )
    for backend in ctx.backends:
        for size, join in ((max(1, n // 5), True), (n, True), (n, False)):
            try:
                async with scratch_database(backend, str(ctx.tmp)) as scratch:
                    async with open_store(scratch.url, program="bench"):
                        pass  # the schema is not what is timed
                    logs = ctx.logs("fanout")
                    wall, cpu = await run_fan_out(scratch.url, size, logs, join=join)
            except Exception as exc:  # noqa: BLE001 - the other rows still measure
                traceback.print_exception(exc, file=sys.stderr)
                table.add(backend, "AND" if join else "none", size + join, "failed")
                table.notes.append(f"{backend}, {size + join} steps failed: {describe(exc)}")
                continue
            steps = size + join
            cpu_ms = cpu / steps * 1000
            table.add(
                backend, "AND" if join else "none", steps, steps / wall, wall, cpu_ms, cpu / wall
            )
            if size == n:
                which = "" if join else "_nojoin"
                ctx.figures[f"fanout.{backend}.rate{which}"] = steps / wall
                ctx.figures[f"fanout.{backend}.cpu_ms{which}"] = cpu_ms
    for key, label in (
        ("floors.pgq_rate", "  peer: pgqueuer drain"),
        ("floors.queue_b10", "  floor: SKIP LOCKED queue, batches of 10"),
        ("floors.queue_b1", "  floor: SKIP LOCKED queue, batches of 1"),
    ):
        if key in ctx.figures:
            table.add(label, None, ctx.size("jobs"), ctx.figures[key])
    note = "" if "floors.pgq_rate" in ctx.figures else "run `floors` too"
    # The targets are for the joined fan-out; the same ratios without the join say
    # how much of the gap is the AND event over every step.
    for which, label in (("", "joined"), ("_nojoin", "no join")):
        if not ctx.postgres:
            break
        rate = ctx.figures.get(f"fanout.postgres.rate{which}")
        table.targets.append(
            Target(
                f"fan-out ({label}) / pgqueuer",
                ratio(rate, ctx.figures.get("floors.pgq_rate")),
                ">=",
                1.0,
                note,
            )
        )
        table.targets.append(
            Target(
                f"fan-out ({label}) / SKIP LOCKED queue (batches of 10)",
                ratio(rate, ctx.figures.get("floors.queue_b10")),
                ">=",
                0.5,
                note,
            )
        )
    for backend in ctx.backends:
        for which, label in (("", "joined"), ("_nojoin", "no join")):
            cpu_ms = ctx.figures.get(f"fanout.{backend}.cpu_ms{which}")
            table.targets.append(
                Target(
                    f"{backend} engine CPU per step ({label}) / 0.4 ms",
                    ratio(cpu_ms, 0.4),
                    "<=",
                    1.0,
                )
            )
    table.notes.append(
        "CPU: time.process_time() of this process over the run (the engine and its drivers) "
        "/ steps; at 1/5 of the size too (is CPU per step constant?) and without the join "
        "(what the AND event over every step costs); targets use the joined full size"
    )
    return [table]


# -- concurrent runs -------------------------------------------------------------------------


async def bench_runs(ctx: Context) -> list[Table]:
    runs, steps = ctx.size("runs"), ctx.size("run_steps")
    table = Table(
        f"{runs} concurrent runs of a {steps}-step chain of in-loop no-ops, one database",
        ["backend", "runs", "runs/s", "steps/s", "wall s", "CPU ms/step"],
    )
    for backend in ctx.backends:
        async with scratch_database(backend, str(ctx.tmp)) as scratch:
            ev = evr.Eventor(name="runs", store=scratch.url, log_dir=ctx.logs("runs"))
            chain(ev, steps, noop_async)
            ev.program  # noqa: B018 - build the program before the clocks run
            async with ev:
                await ev.run()  # registers the program; warms the pools
                cpu, began = time.process_time(), time.perf_counter()
                handles = [ev.start() for _ in range(runs)]
                results = [await handle.wait() for handle in handles]
                wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        failed = [r for r in results if not r]
        if failed:
            raise RuntimeError(f"{len(failed)} runs failed on {backend}: {failed[0].reason}")
        total = runs * steps
        table.add(backend, runs, runs / wall, total / wall, wall, cpu / total * 1000)
    for backend in ctx.backends:
        rate = ctx.figures.get(f"fanout.{backend}.rate")
        if rate is not None:
            table.add(f"  fan-out on {backend} (steps/s, this run)", None, None, rate, None, None)
    return [table]


# -- idle rows -------------------------------------------------------------------------------


async def insert_idle(url: str, rows: int) -> None:
    """``rows`` ready step runs in a queue nobody serves, over ``rows / 100`` runs."""
    ev = evr.Eventor(name="idle", store=":memory:")
    ev.add_step("s", func=None)
    async with open_store(url, program="bench") as db:
        program_id = await db.register_program(ev.program)
        now = t.utcnow()
        per_run = 100
        run_rows, step_rows = [], []
        for r in range((rows + per_run - 1) // per_run):
            run_id = f"idle{r:032d}"
            run_rows.append(
                {
                    "id": run_id,
                    "program_id": program_id,
                    "program_name": "idle",
                    "status": "running",
                    "stopped": False,
                    "recovery": 0,
                    "created": now,
                    "mode": "distributed",
                }
            )
            for i in range(min(per_run, rows - r * per_run)):
                step_rows.append(
                    {
                        "run_id": run_id,
                        "step": f"s{i}",
                        "sequence": "1",
                        "recovery": 0,
                        "attempt": 1,
                        "status": "ready",
                        "host": "nobody",
                        "queue": "nobody",
                        "created": now,
                    }
                )
        async with db.transaction() as conn:
            await conn.execute(sa.insert(t.run), run_rows)
            for i in range(0, len(step_rows), 1000):
                await conn.execute(sa.insert(t.step_run), step_rows[i : i + 1000])


async def bench_idle(ctx: Context) -> list[Table]:
    n, rows = ctx.size("chain_steps"), ctx.size("idle_rows")
    table = Table(
        f"chain of {n} in-loop no-ops beside {rows:,} idle ready step runs of other runs",
        ["backend", "empty hop ms", "p95", "idle-filled hop ms", "p95", "filled / empty"],
    )
    for backend in ctx.backends:
        async with scratch_database(backend, str(ctx.tmp)) as scratch:
            logs = ctx.logs("idle")
            await run_chain(scratch.url, 10, noop_async, "inloop", logs)  # warm-up
            empty = ms(hops(await run_chain(scratch.url, n, noop_async, "inloop", logs)))
            await insert_idle(scratch.url, rows)
            filled = ms(hops(await run_chain(scratch.url, n, noop_async, "inloop", logs)))
        e_med, e_p95 = median_p95(empty)
        f_med, f_p95 = median_p95(filled)
        table.add(backend, e_med, e_p95, f_med, f_p95, f_med / e_med)
        if backend == "postgres" or "postgres" not in ctx.backends:
            table.targets.append(
                Target(f"{backend} hop with {rows:,} idle rows / empty", f_med / e_med, "<=", 1.2)
            )
    table.notes.append(
        "idle rows: 'ready' step runs in a queue no agent serves, 100 per run, bulk-inserted"
    )
    return [table]


# -- scale-out -------------------------------------------------------------------------------


async def free_connections(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
        used = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    finally:
        await conn.close()
    return limit - used - reserved


async def bench_scaleout(ctx: Context) -> list[Table]:
    if not ctx.postgres:
        return [_skipped("scale-out", "needs Postgres (--backends postgres)")]
    n = ctx.size("scaleout_steps")
    sizes = [int(x) for x in str(ctx.size("agents")).split(",") if x]
    concurrency = ctx.args.agent_concurrency
    table = Table(
        f"scale-out: agents on loopback (distinct --host each) sharing one Postgres, fan-out "
        f"of {n:,} no-op steps (no function), distributed",
        ["agents", "steps/s", "recorded s", "submit s", "wall s", "conns / agent", "LISTEN"],
    )
    per_agent_estimate = 3.0
    rates: list[tuple[int, float]] = []
    for k in sizes:
        async with scratch_database("postgres") as scratch:
            free = await free_connections(scratch.dsn)
            need = int(k * per_agent_estimate) + 5
            # Leave room for whatever else uses the shared server (a CI run).
            if need + SPARE_CONNECTIONS > free:
                table.add(k, "skipped")
                table.notes.append(
                    f"{k} agents skipped: ~{need} connections needed at "
                    f"{per_agent_estimate:g} per agent, {free} free, {SPARE_CONNECTIONS} kept "
                    "spare for others (Postgres max_connections)"
                )
                continue
            async with open_store(scratch.url, program="bench"):
                pass  # the schema exists before the agents start
            hosts = [f"bench{i}" for i in range(k)]
            try:
                async with cluster.agents(
                    scratch.url, hosts, ctx.logs(f"agents-{k}"), concurrency=concurrency
                ):
                    result = await cluster.run_on_agents(scratch.url, scratch.dsn, n, hosts)
            except Exception as exc:  # noqa: BLE001 - the other sizes still measure
                traceback.print_exception(exc, file=sys.stderr)
                table.add(k, "failed")
                table.notes.append(f"{k} agents failed: {describe(exc)}")
                continue
        if result.monitor_reconnects:
            table.notes.append(
                f"{k} agents: the server dropped the monitor's connection "
                f"{result.monitor_reconnects} time(s) (restarted?): figures disturbed"
            )
        if result.status != "success" or result.steps != n:
            table.add(k, "failed")
            table.notes.append(
                f"{k} agents: the run ended {result.status} after {result.steps} steps"
            )
            continue
        rate = n / result.span if result.span else 0.0
        rates.append((k, rate))
        per_agent = result.peak_connections / k
        per_agent_estimate = max(per_agent_estimate, per_agent)
        table.add(
            k,
            rate,
            result.span,
            result.submit,
            result.wall,
            per_agent,
            result.peak_listeners / k,
        )
        table.targets.append(
            Target(f"{k} agents: connections per agent / (1 LISTEN + 4)", per_agent / 5, "<=", 1.0)
        )
    if rates:
        base = rates[0][1]
        table.notes.append(
            "steps/s over 1 agent: "
            + ", ".join(f"{k}: {rate / base:.2f}x" for k, rate in rates)
            + f" (target: growing up to the {__import__('os').cpu_count()} cores, flat beyond)"
        )
    fan = ctx.figures.get("fanout.postgres.rate")
    if fan is not None:
        table.notes.append(f"standalone in-loop fan-out on Postgres, this run: {fan:,.0f} steps/s")
    table.notes.append(
        "steps/s: steps / (last recorded end - first recorded start); conns: peak client "
        f"connections to the database sampled every 50 ms / agents; agent --max-concurrency "
        f"{concurrency if concurrency is not None else 'default (8)'}"
    )
    return [table]


# -- memory ----------------------------------------------------------------------------------


async def _child(*argv: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.cluster",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        env=cluster.agent_env(),
        cwd=cluster.ROOT,
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"benchmarks.cluster {' '.join(argv)} exited with {proc.returncode}")
    data: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return data


async def bench_rss(ctx: Context) -> list[Table]:
    n = ctx.size("rss_steps")
    backend = "postgres" if ctx.postgres else ctx.backends[0]
    table = Table(
        f"peak RSS (MB) running a {n:,}-step fan-out of no-op steps",
        ["process", "store", "peak RSS MB", "before run MB", "steps", "seconds"],
    )
    baseline = await _child("baseline")
    table.add("  floor: python + import aeventor", "-", baseline["rss_peak_mb"], None, None, None)
    async with scratch_database(backend, str(ctx.tmp)) as scratch:
        logs = ctx.logs("rss")
        data = await _child(
            "standalone", "--store", scratch.url, "--steps", str(n), "--log-dir", str(logs)
        )
    table.add(
        "standalone Eventor.run(), in-loop steps",
        backend,
        data["rss_peak_mb"],
        data["rss_before_mb"],
        data["steps"],
        data["seconds"],
    )
    table.targets.append(
        Target("standalone peak RSS / 100 MB", data["rss_peak_mb"] / 100, "<=", 1.0)
    )
    if ctx.postgres:
        async with scratch_database("postgres") as scratch:
            async with open_store(scratch.url, program="bench"):
                pass
            async with cluster.agents(
                scratch.url, ["rss0"], ctx.logs("rss-agent"), concurrency=ctx.args.agent_concurrency
            ) as procs:
                pid = procs[0].proc.pid
                before = cluster.vm_hwm_mb(pid)
                result = await cluster.run_on_agents(scratch.url, scratch.dsn, n, ["rss0"])
                peak = cluster.vm_hwm_mb(pid)
        table.add(
            "agent (one), steps without a function",
            "postgres",
            peak,
            before,
            result.steps,
            result.wall,
        )
        if peak is not None:
            table.targets.append(Target("agent peak RSS / 100 MB", peak / 100, "<=", 1.0))
    table.notes.append(
        "VmHWM from /proc/PID/status (the child's own ru_maxrss would include this process's "
        "size at fork); 'before run': after imports and defining the program"
    )
    return [table]


# -- the suite -------------------------------------------------------------------------------


def _skipped(title: str, why: str) -> Table:
    table = Table(title, ["skipped"])
    table.add(why)
    return table


BENCHMARKS: dict[str, tuple[str, Bench]] = {
    "open": ("opening a store whose schema is current, beside a bare connect", bench_open),
    "floors": (
        "Postgres floors and pgqueuer (LISTEN/NOTIFY, SKIP LOCKED queue, chain)",
        bench_floors,
    ),
    "chain": ("chain hop median/p95 per executor and backend", bench_chain),
    "fanout": ("fan-out joined by an AND event: steps/s, engine CPU per step", bench_fanout),
    "runs": ("concurrent runs of a 10-step program: runs/s", bench_runs),
    "idle": ("chain hop beside idle pending step runs, as a ratio to empty", bench_idle),
    "scaleout": ("agent processes sharing one Postgres: steps/s, connections", bench_scaleout),
    "rss": ("peak RSS of a standalone process and an agent", bench_rss),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="aeventor's benchmarks, each beside its floor or peer in the same run",
    )
    parser.add_argument("names", nargs="*", metavar="BENCHMARK", help="default: all (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated, of sqlite,postgres,mariadb (default: all that answer)",
    )
    for name, (full, quick) in SIZES.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=type(full),
            default=None,
            help=f"default {full} ({quick} with --quick)",
        )
    parser.add_argument("--queue-consumers", type=int, default=4, help="of the SKIP LOCKED queue")
    parser.add_argument(
        "--agent-concurrency", type=int, default=None, help="agents' --max-concurrency"
    )
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    wrong = [b for b in args.backends.split(",") if b and b not in BACKENDS]
    if wrong:
        parser.error(f"--backends {','.join(wrong)}: choose from {','.join(BACKENDS)}")
    return args


async def run_suite(args: argparse.Namespace, out: Callable[[str], None] = print) -> list[Table]:
    wanted = [b for b in args.backends.split(",") if b]
    backends = []
    for backend in wanted:
        if await server_up(backend):
            backends.append(backend)
        else:
            out(f"({backend} does not answer: skipped)")
    lines = machine()
    lines += await server_versions(postgres="postgres" in backends, mysql="mariadb" in backends)
    out("\n".join(lines))
    out(f"sizes     {'--quick' if args.quick else 'full'}; backends {', '.join(backends)}")
    names = args.names or list(BENCHMARKS)
    tables: list[Table] = []
    with tempfile.TemporaryDirectory(prefix="aeventor-bench-") as tmp:
        ctx = Context(args=args, tmp=Path(tmp), backends=backends)
        for name in BENCHMARKS:
            if name not in names:
                continue
            began = time.perf_counter()
            try:
                produced = await BENCHMARKS[name][1](ctx)
            except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the rest
                # Printed in its table (the traceback on stderr) and counted: main() exits 1.
                traceback.print_exception(exc, file=sys.stderr)
                failed = Table(name, ["failed"])
                failed.add(describe(exc))
                failed.failed = True
                produced = [failed]
            for table in produced:
                tables.append(table)
                out("")
                out(table.render())
            out(f"  ({name}: {time.perf_counter() - began:.1f} s)")
    targets = [target for table in tables for target in table.targets]
    if targets:
        summary = Table("targets", ["target", "ratio", "limit", ""])
        for target in targets:
            met = {True: "met", False: "MISSED", None: "n/a"}[target.met]
            summary.add(target.label, target.ratio, f"{target.op} {target.limit:g}x", met)
        out("")
        out(summary.render())
    return tables


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, (description, _) in BENCHMARKS.items():
            print(f"{name:<10} {description}")
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tables = asyncio.run(run_suite(args, out=lambda text: print(text, flush=True)))
    if any(table.failed for table in tables):
        sys.exit(1)
