"""The floors and the peer the engine is measured beside, on Postgres, written here with asyncpg.

- a minimal ``SKIP LOCKED`` queue: ``jobs`` pre-enqueued rows drained by ``consumers``
  connections, each claiming a batch (``UPDATE .. WHERE id IN (SELECT .. FOR UPDATE SKIP
  LOCKED) RETURNING``), running nothing and completing the batch in a second transaction:
  two commits per batch, as a durable queue needs;
- a minimal durable chain in one process: one transaction completes job ``i`` and inserts
  job ``i + 1``, a second claims it with ``SKIP LOCKED``; the hop is from the start of the
  first to the commit of the second;
- pgqueuer (the ``bench`` extra) draining pre-enqueued no-op jobs (its ``drain`` mode, batch
  size 10, one asyncpg connection as its documentation sets it up), and its
  enqueue-to-start latency: one job enqueued at a time on a second connection, the clock
  running until the entrypoint starts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

QUEUE_SCHEMA = """
CREATE TABLE bench_job (
    id bigserial PRIMARY KEY,
    status text NOT NULL,
    payload text,
    started timestamptz,
    ended timestamptz
);
CREATE INDEX bench_job_ready ON bench_job (id) WHERE status = 'ready';
"""

CLAIM = """
UPDATE bench_job SET status = 'active', started = now()
WHERE id IN (
    SELECT id FROM bench_job WHERE status = 'ready' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
COMPLETE = "UPDATE bench_job SET status = 'done', ended = now() WHERE id = ANY($1::bigint[])"


async def skip_locked_queue(dsn: str, jobs: int, batch: int, consumers: int) -> float:
    """Jobs/s of a minimal SKIP LOCKED queue draining ``jobs`` pre-enqueued no-op jobs."""
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute("DROP TABLE IF EXISTS bench_job")
        await setup.execute(QUEUE_SCHEMA)
        await setup.execute(
            "INSERT INTO bench_job (status) SELECT 'ready' FROM generate_series(1, $1)", jobs
        )
        await setup.execute("VACUUM ANALYZE bench_job")
    finally:
        await setup.close()
    conns = [await asyncpg.connect(dsn) for _ in range(consumers)]

    async def consume(conn: Any) -> None:
        while True:
            async with conn.transaction():
                ids = [r[0] for r in await conn.fetch(CLAIM, batch)]
            if not ids:
                return
            async with conn.transaction():
                await conn.execute(COMPLETE, ids)

    try:
        began = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for conn in conns:
                tg.create_task(consume(conn))
        elapsed = time.perf_counter() - began
        left = await conns[0].fetchval("SELECT count(*) FROM bench_job WHERE status <> 'done'")
        assert left == 0, left
    finally:
        for conn in conns:
            await conn.close()
    return jobs / elapsed


async def durable_chain(dsn: str, hops: int) -> list[float]:
    """Seconds per hop of a minimal durable chain (see the module docstring)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_job")
        await conn.execute(QUEUE_SCHEMA)
        async with conn.transaction():
            current = await conn.fetchval(
                "INSERT INTO bench_job (status, started) VALUES ('active', now()) RETURNING id"
            )
        samples = []
        for _ in range(hops + 10):
            began = time.perf_counter()
            async with conn.transaction():
                await conn.execute(COMPLETE, [current])
                await conn.execute("INSERT INTO bench_job (status) VALUES ('ready')")
            async with conn.transaction():
                claimed = await conn.fetch(CLAIM, 1)
            samples.append(time.perf_counter() - began)
            assert len(claimed) == 1
            current = claimed[0][0]
        return samples[10:]
    finally:
        await conn.close()


@dataclass
class PgqResult:
    drain_rate: float | None
    latencies: list[float]
    version: str
    error: str | None = None


async def pgqueuer(dsn: str, jobs: int, probes: int) -> PgqResult:
    """pgqueuer's drain rate (jobs/s) and enqueue-to-start latencies (seconds)."""
    try:
        import pgqueuer as pgq
        from pgqueuer.domain.types import QueueExecutionMode
    except ImportError as exc:
        return PgqResult(None, [], "-", f"not installed ({exc}); pip install -e '.[bench]'")
    version = getattr(pgq, "__version__", "?")
    conn = await asyncpg.connect(dsn)
    try:
        queries = pgq.Queries(pgq.AsyncpgDriver(conn))
        await queries.install()
        # Drain: everything enqueued first, then one worker in drain mode.
        await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        qm = pgq.QueueManager(queries)
        done = 0

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        began = time.perf_counter()
        await qm.run(mode=QueueExecutionMode.drain, batch_size=10)
        rate = jobs / (time.perf_counter() - began)
        if done != jobs:
            return PgqResult(None, [], version, f"drained {done} of {jobs} jobs")
    finally:
        await conn.close()
    latencies = await _pgq_latency(dsn, probes)
    return PgqResult(rate, latencies, version)


async def _pgq_latency(dsn: str, probes: int) -> list[float]:
    import pgqueuer as pgq

    worker_conn = await asyncpg.connect(dsn)
    sender_conn = await asyncpg.connect(dsn)
    loop = asyncio.get_running_loop()
    waiting: dict[bytes, asyncio.Future[float]] = {}
    try:
        qm = pgq.QueueManager(pgq.Queries(pgq.AsyncpgDriver(worker_conn)))

        @qm.entrypoint("probe")
        async def probe(job: Any) -> None:
            fut = waiting.pop(job.payload, None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

        sender = pgq.Queries(pgq.AsyncpgDriver(sender_conn))
        samples = []
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(qm.run(batch_size=10))
            try:
                for i in range(probes + 10):
                    key = str(i).encode()
                    fut: asyncio.Future[float] = loop.create_future()
                    waiting[key] = fut
                    sent = time.perf_counter()
                    await sender.enqueue("probe", key)
                    async with asyncio.timeout(30):
                        started = await fut
                    if i >= 10:
                        samples.append(started - sent)
            finally:
                qm.shutdown.set()
            await task
        return samples
    finally:
        await worker_conn.close()
        await sender_conn.close()
