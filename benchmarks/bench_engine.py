"""Engine benchmarks, each beside its baseline in one run.

1. Wall time of a 20-step chain and a 50-step fan-out of no-op *subprocess* steps on sqlite,
   beside the floor: 20 sequential / 50 concurrent bare interpreter starts
   (``python -c pass``), and the original eventor's figures on this kind of machine.
2. Hop latency per backend: from one in-loop no-op step ending to the next one starting in
   a chain, median and p95, beside the bare Postgres NOTIFY round trip and ``SELECT 1``.
3. With the servers: :mod:`benchmarks.bench_worker`, the worker in its agent role (a fan-out
   of 1,000 no-op steps on Postgres, steps/s) beside a standalone run of the same fan-out.

Run: ``.venv/bin/python -m benchmarks.bench_engine`` (``--skip-servers`` for sqlite only,
``--skip-worker`` without 3). ``python -m benchmarks`` runs the side-by-side suite
(:mod:`benchmarks.suite`), which measures these and more.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import structlog

import aeventor as evr
from benchmarks._common import (
    PG_ADMIN,
    chain,
    fan_out,
    machine,
    median_p95,
    scratch_database,
    server_versions,
)
from benchmarks._steps import noop

# -- 1. subprocess steps on sqlite ------------------------------------------------------


async def timed_run(build: Callable[[evr.Eventor], None], store: str, logs: Path) -> float:
    ev = evr.Eventor(name="bench", store=store, log_dir=logs)
    build(ev)
    async with ev:
        started = time.perf_counter()
        result = await ev.run()
        elapsed = time.perf_counter() - started
    assert result, result.reason
    return elapsed


async def bare_starts(n: int, *, concurrent: bool) -> float:
    async def one() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await proc.wait()

    started = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(one() for _ in range(n)))
    else:
        for _ in range(n):
            await one()
    return time.perf_counter() - started


async def process_table(tmp: Path, repeats: int) -> list[str]:
    rows: list[tuple[str, list[float], str]] = []
    for label, build, floor, original in (
        ("chain of 20 process steps", lambda ev: chain(ev, 20, noop), (20, False), "~6 s"),
        ("fan-out of 50 process steps", lambda ev: fan_out(ev, 50, noop), (50, True), "~2 s"),
    ):
        times = []
        for i in range(repeats):
            store = str(tmp / f"proc-{label[:5]}-{i}.db")
            times.append(await timed_run(build, store, tmp / "logs"))
        floors = [await bare_starts(floor[0], concurrent=floor[1]) for _ in range(repeats)]
        rows.append((label, times, original))
        kind = "concurrent" if floor[1] else "sequential"
        rows.append((f"  floor: {floor[0]} {kind} `python -c pass`", floors, ""))
    lines = [f"{'sqlite, wall time (s)':<44}{'median':>8}{'min':>8}{'max':>8}  original eventor"]
    for label, times, original in rows:
        lines.append(
            f"{label:<44}{statistics.median(times):>8.3f}{min(times):>8.3f}{max(times):>8.3f}"
            f"  {original}"
        )
    return lines


# -- 2. hop latency per backend ----------------------------------------------------------


async def hop_latencies(store: str, hops: int, logs: Path) -> list[float]:
    marks: list[tuple[float, float]] = []

    async def step() -> None:
        begun = time.perf_counter()
        marks.append((begun, time.perf_counter()))

    ev = evr.Eventor(name="hops", store=store, log_dir=logs)
    chain(ev, hops + 1, step)
    async with ev:
        result = await ev.run()
    assert result, result.reason
    return [marks[i + 1][0] - marks[i][1] for i in range(len(marks) - 1)]


async def notify_floor(n: int) -> tuple[list[float], list[float]]:
    from aeventor.backends.stores.pg_listener import asyncpg_dsn
    from benchmarks.bench_notify import measure

    notify, select, _ = await measure(asyncpg_dsn(PG_ADMIN), n)
    return notify, select


def _stats(samples: list[float]) -> tuple[float, float]:
    return median_p95([x * 1000 for x in samples])


async def hop_table(tmp: Path, hops: int, servers: bool) -> list[str]:
    stores: list[tuple[str, Callable[[], AbstractAsyncContextManager[str]]]] = []

    @asynccontextmanager
    async def scratch(backend: str) -> AsyncIterator[str]:
        async with scratch_database(backend, str(tmp)) as db:
            yield db.url

    stores.append(("sqlite (file, WAL)", lambda: scratch("sqlite")))
    if servers:
        stores.append(("postgres (LISTEN/NOTIFY)", lambda: scratch("postgres")))
        stores.append(("mariadb (polling)", lambda: scratch("mariadb")))
    lines = [f"{'hop: step end -> next start (ms)':<44}{'median':>8}{'p95':>8}{'hops':>8}"]
    for label, make in stores:
        async with make() as store:
            samples = await hop_latencies(store, hops, tmp / "logs")
        median, p95 = _stats(samples)
        lines.append(f"{label:<44}{median:>8.3f}{p95:>8.3f}{len(samples):>8}")
    if servers:
        notify, select = await notify_floor(hops)
        for label, samples in (
            ("  floor: bare NOTIFY -> listener", notify),
            ("  floor: SELECT 1 round trip", select),
        ):
            median, p95 = _stats(samples)
            lines.append(f"{label:<44}{median:>8.3f}{p95:>8.3f}{len(samples):>8}")
    return lines


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="aeventor-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sections = []
        if not args.skip_process:
            sections.append(await process_table(tmp, args.repeats))
        sections.append(await hop_table(tmp, args.hops, not args.skip_servers))
        if not args.skip_servers and not args.skip_worker:
            from benchmarks.bench_worker import worker_table

            sections.append(await worker_table(tmp, args.worker_steps, args.worker_repeats))
    versions = [] if args.skip_servers else await server_versions()
    print("\n".join(machine() + versions))
    for lines in sections:
        print()
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--skip-servers", action="store_true", help="sqlite only")
    parser.add_argument("--skip-process", action="store_true", help="no subprocess steps")
    parser.add_argument("--skip-worker", action="store_true", help="no agent-worker fan-out")
    parser.add_argument("--worker-steps", type=int, default=1_000)
    parser.add_argument("--worker-repeats", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
