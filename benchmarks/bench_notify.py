"""Bare ``NOTIFY`` -> :class:`~aeventor.backends.stores.pg_listener.PgListener` callback latency.

One connection sends ``SELECT pg_notify(...)`` (autocommit, so it is delivered at once) and
the clock runs until the listener's ``on_notify`` sees that payload; notifications are sent
one at a time, so this is latency, not throughput. A ``SELECT 1`` round trip on the sending
connection is measured the same way as a floor for comparison.

Run with ``python -m benchmarks.bench_notify [-n 500]``; the server comes from
``AEVENTOR_PG_URL`` (default ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import time
import uuid

import asyncpg
import structlog

from aeventor.backends.stores.pg_listener import PgListener, asyncpg_dsn

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
WARMUP = 20


def _summary(samples: list[float]) -> tuple[float, float, float, float]:
    """Median, p95, min and max, in milliseconds."""
    ms = [s * 1000 for s in samples]
    return statistics.median(ms), statistics.quantiles(ms, n=100)[94], min(ms), max(ms)


async def measure(dsn: str, n: int) -> tuple[list[float], list[float], str]:
    channel = f"bench_{uuid.uuid4().hex[:12]}"
    waiting: dict[str, asyncio.Future[float]] = {}

    def on_notify(_channel: str, payload: str) -> None:
        received = time.perf_counter()
        fut = waiting.pop(payload, None)
        if fut is not None and not fut.done():
            fut.set_result(received)

    listener = PgListener(dsn=dsn, channels=[channel], on_notify=on_notify)
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    notify_rtt: list[float] = []
    select_rtt: list[float] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run(task_status=ready))
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            sender = await asyncpg.connect(dsn)
            try:
                version = await sender.fetchval("SHOW server_version")
                for i in range(WARMUP + n):
                    payload = str(i)
                    fut: asyncio.Future[float] = loop.create_future()
                    waiting[payload] = fut
                    sent = time.perf_counter()
                    await sender.execute("SELECT pg_notify($1, $2)", channel, payload)
                    async with asyncio.timeout(5):
                        received = await fut
                    if i >= WARMUP:
                        notify_rtt.append(received - sent)
                for i in range(WARMUP + n):
                    sent = time.perf_counter()
                    await sender.fetchval("SELECT 1")
                    if i >= WARMUP:
                        select_rtt.append(time.perf_counter() - sent)
            finally:
                await sender.close(timeout=5)
        finally:
            task.cancel()
    return notify_rtt, select_rtt, str(version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=500, help="notifications to time (default 500)")
    args = parser.parse_args()
    # A program may configure logging: keep the listener's info lines out of the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    dsn = asyncpg_dsn(os.environ.get("AEVENTOR_PG_URL", DEFAULT_URL))
    notify_rtt, select_rtt, version = asyncio.run(measure(dsn, args.n))

    print(f"platform     {platform.platform()}")
    print(f"cpu count    {os.cpu_count()}")
    print(f"python       {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"asyncpg      {asyncpg.__version__}")
    print(f"server       PostgreSQL {version}")
    print(f"samples      {args.n} (after {WARMUP} warm-up)")
    print()
    print(f"{'round trip (ms)':<28}{'median':>9}{'p95':>9}{'min':>9}{'max':>9}")
    for name, samples in (
        ("NOTIFY -> on_notify", notify_rtt),
        ("SELECT 1 (floor)", select_rtt),
    ):
        median, p95, low, high = _summary(samples)
        print(f"{name:<28}{median:>9.3f}{p95:>9.3f}{low:>9.3f}{high:>9.3f}")


if __name__ == "__main__":
    main()
