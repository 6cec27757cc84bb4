"""The store's hot queries on an empty database and beside a million finished step runs.

For Postgres and MariaDB, in a scratch database ``aev_bench_<pid>_<n>`` (dropped at the end):

1. time each hot operation through the real :class:`~aeventor.backends.stores.base.Database` code
   on the empty schema;
2. fill it server-side with 1,000,000 finished step runs and as many triggers, spread over
   10,000 finished runs (``generate_series`` on Postgres, a cross-joined recursive CTE on
   MariaDB), then ``ANALYZE``;
3. time the same operations again, and show how the server executes each statement they
   sent: ``EXPLAIN ANALYZE`` (and the generic plan that prepared statements may switch to)
   on Postgres, ``EXPLAIN`` on MariaDB. The statements are captured from the real calls, so
   they cannot drift from the code.

Operations (median and p95 over ``--repeats`` repetitions, after a warm-up):

- ``claim(run_id=...)``: a dispatcher taking the 3 ready step runs of its run (limit 64).
- ``claim(hosts=[...])``: an agent taking the 3 ready step runs of its host; the finished
  rows of that host (100,000 once filled) must not be read.
- ``complete -> fire``: a step of a new small run ends: lock the run, end the step, look up
  which facts fired (``StoreTx.fired``), insert the trigger and the next step run.
- ``complete -> settle``: the run's last step ends: ``StoreTx.pending`` counts pending step
  runs and the run ends.
- ``tx.fired lookup`` and ``tx.pending count``: those two reads alone, through
  :class:`~aeventor.backends.stores.base.SqlTx` on a read connection.
- ``floor: SELECT 1``: a round trip on a read connection, the floor of every row; and each
  operation on the filled database beside itself on the empty one.

Run: ``.venv/bin/python -m benchmarks.bench_hot_queries`` (``--skip-mysql``,
``--skip-postgres``, ``--repeats N``, ``--rows N``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as t
from aeventor.backends.stores.base import Database, SqlTx
from aeventor.dispatch import Graph
from aeventor.dispatch.store import Claim, Taker
from benchmarks._common import PG_ADMIN, PG_DSN, machine, scratch_database

WORKER = "bench:1"
#: Step runs and triggers per finished run of the fill (10,000 runs for a million rows).
PER_RUN = 100
#: Finished rows are spread over this many hosts; the agent claims for host ``h0``.
HOSTS = 10
LIVE_HOST = "h0"
WARMUP = 10
#: Ready step runs a claim takes each time.
READY = 3

S = evr.StepStatus


# -- programs and live runs ------------------------------------------------------------


def _program(name: str, *, host: str | None = None, chain: bool = False) -> Graph:
    ev = evr.Eventor(name=name)
    start = ev.add_event("start")
    if chain:
        e1 = ev.add_event("e1")
        ev.add_step("s1", triggers={S.success: e1})
        ev.add_step("s2")
        ev.add_assoc(start, "s1")
        ev.add_assoc(e1, "s2")
    else:
        for i in range(READY):
            ev.add_step(f"r{i}", host=host)
            ev.add_assoc(start, f"r{i}")
    return Graph(ev.program)


@dataclass
class Fixture:
    """The live runs the timed operations work on (made anew in each phase)."""

    by_run: str
    by_host: str
    chain: Graph
    chain_id: int


async def make_fixture(db: Database) -> Fixture:
    runs = []
    for graph, mode in (
        (_program("claim_run"), "standalone"),
        # Distributed: the step runs are queued for their host's agents.
        (_program("claim_host", host=LIVE_HOST), "distributed"),
    ):
        program_id = await db.register_program(graph.program)
        run_id, advance = await db.create_run(
            graph, program_id=program_id, triggers=[("start", "1")], mode=mode
        )
        assert advance.ready == READY, advance
        runs.append(run_id)
    chain = _program("chain", chain=True)
    return Fixture(runs[0], runs[1], chain, await db.register_program(chain.program))


async def reset_ready(db: Database, run_id: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            t.step_run.update()
            .where(t.step_run.c.run_id == run_id)
            .values(status=S.ready.value, worker=None, started=None, lease_until=None)
        )


async def claim_one(db: Database, run_id: str) -> Claim:
    [claim] = await db.claim(worker=WORKER, limit=64, run_id=run_id)
    return claim


# -- timing ----------------------------------------------------------------------------


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def timed(self, label: str, keep: bool) -> Iterator[None]:
        begun = time.perf_counter()
        yield
        if keep:
            self.values.setdefault(label, []).append(time.perf_counter() - begun)


SELECT_1 = "floor: SELECT 1"
FIRED = "tx.fired lookup"
PENDING = "tx.pending count"
LABELS = (
    "claim(run_id=...)",
    "claim(hosts=[...])",
    "complete -> fire",
    "complete -> settle",
    FIRED,
    PENDING,
    SELECT_1,
)


async def measure(db: Database, fx: Fixture, repeats: int, capture: Capture) -> Samples:
    samples = Samples()
    taker = Taker(worker=WORKER, budget=64)
    for i in range(WARMUP + repeats):
        keep = i >= WARMUP
        with capture.label("claim(run_id=...)"), samples.timed("claim(run_id=...)", keep):
            claims = await db.claim(worker=WORKER, limit=64, run_id=fx.by_run)
        assert len(claims) == READY, claims
        await reset_ready(db, fx.by_run)

        with capture.label("claim(hosts=[...])"), samples.timed("claim(hosts=[...])", keep):
            claims = await db.claim(worker=WORKER, limit=64, hosts=[LIVE_HOST])
        assert len(claims) == READY, claims
        await reset_ready(db, fx.by_host)

        # A new small run: s1 (claimed) -> e1 -> s2.
        run_id, advance = await db.create_run(
            fx.chain, program_id=fx.chain_id, triggers=[("start", "1")], take=taker
        )
        s1 = advance.claims[0] if advance.claims else await claim_one(db, run_id)
        with capture.label("complete -> fire"), samples.timed("complete -> fire", keep):
            advance = await db.complete(fx.chain, s1, status=S.success, take=taker)
        s2 = advance.claims[0] if advance.claims else await claim_one(db, run_id)

        # The two reads alone, through the store's own primitives on a read connection.
        with capture.label(FIRED), samples.timed(FIRED, keep):
            async with db.reading() as conn:
                fired = await SqlTx(db, conn).fired(run_id, "1", 0, [frozenset({"e1"})])
        assert fired == {"e1"}, fired
        with capture.label(PENDING), samples.timed(PENDING, keep):
            async with db.reading() as conn:
                pending = await SqlTx(db, conn).pending(run_id)
        assert pending == 1, pending
        # The floor of those reads: a round trip on the same kind of connection.
        with samples.timed(SELECT_1, keep):
            async with db.reading() as conn:
                await conn.execute(sa.text("SELECT 1"))

        with capture.label("complete -> settle"), samples.timed("complete -> settle", keep):
            advance = await db.complete(fx.chain, s2, status=S.success, take=taker)
        assert advance.run_status is evr.RunStatus.success, advance
    return samples


def _ms(values: list[float]) -> tuple[float, float]:
    ms = sorted(v * 1000 for v in values)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.95))]


# -- capturing the statements each operation sends ---------------------------------------


class Capture:
    """Records the SELECT and UPDATE statements (and their parameters) each operation sends."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.enabled = False
        self.statements: dict[str, list[tuple[str, Any]]] = {}

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        self.current = name
        try:
            yield
        finally:
            self.current = None

    def distinct(self) -> list[tuple[str, str, Any]]:
        """Each statement once, with the operations that sent it, in the order of LABELS."""
        found: dict[str, tuple[list[str], Any]] = {}
        for label in LABELS:
            for statement, parameters in self.statements.get(label, []):
                found.setdefault(statement, ([], parameters))[0].append(label)
        return [(", ".join(labels), s, p) for s, (labels, p) in found.items()]

    def attach(self, db: Database) -> None:
        sa.event.listen(db.engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not self.enabled or self.current is None:
            return
        head = statement.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE") or "pg_notify" in statement:
            return
        seen = self.statements.setdefault(self.current, [])
        if all(s != statement for s, _ in seen):
            seen.append((statement, parameters))


# -- filling ---------------------------------------------------------------------------


async def fill_postgres(db: Database, rows: int) -> None:
    runs = rows // PER_RUN
    async with db.transaction() as conn:
        program_id = (
            await conn.execute(
                t.program.insert()
                .values(name="filler", version="v1", definition="{}", created=t.utcnow())
                .returning(t.program.c.id)
            )
        ).scalar_one()
        params = {
            "program_id": program_id,
            "runs": runs,
            "rows": rows,
            "per_run": PER_RUN,
            "hosts": HOSTS,
        }
        # Run ids look like real ones (32 random hex digits), so the indexes grow as in use.
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_run (id, program_id, program_name, status, stopped, "
                "recovery, created, ended, mode) "
                "SELECT md5('run' || g), :program_id, 'filler', 'success', false, 0, now(), "
                "now(), 'distributed' FROM generate_series(0, :runs - 1) AS g"
            ),
            params,
        )
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_step_run (run_id, step, sequence, recovery, attempt, "
                "status, host, queue, worker, pid, result, created, started, ended) "
                "SELECT md5('run' || (g / :per_run)), 's' || (g % :per_run), '1', 0, 1, "
                "'success', 'h' || (g % :hosts), 'h' || (g % :hosts), 'filler:1', 1, 'null', "
                "now(), now(), now() FROM generate_series(0, :rows - 1) AS g"
            ),
            params,
        )
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_trigger (run_id, event, sequence, recovery, created) "
                "SELECT md5('run' || (g / :per_run)), 'e' || (g % :per_run), '1', 0, now() "
                "FROM generate_series(0, :rows - 1) AS g"
            ),
            params,
        )
    async with db.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text("ANALYZE"))


# MariaDB: numbers 0..999,999 from a 1,000-row recursive CTE joined with itself.
_MY_NUMBERS = (
    "WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < 999), "
    "n(g) AS (SELECT a.i * 1000 + b.i FROM d a CROSS JOIN d b) "
)


async def fill_mysql(db: Database, rows: int) -> None:
    runs = rows // PER_RUN
    params = {"runs": runs, "rows": rows, "per_run": PER_RUN, "hosts": HOSTS}
    async with db.transaction() as conn:
        # Bulk load: the filler's rows are consistent by construction.
        await conn.execute(sa.text("SET SESSION foreign_key_checks = 0, unique_checks = 0"))
        inserted = await conn.execute(
            t.program.insert().values(
                name="filler", version="v1", definition="{}", created=t.utcnow()
            )
        )
        assert inserted.inserted_primary_key is not None
        program_id = inserted.inserted_primary_key[0]
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_run (id, program_id, program_name, status, stopped, "
                "recovery, created, ended, mode) "
                + _MY_NUMBERS
                + "SELECT md5(concat('run', g)), :program_id, 'filler', 'success', 0, 0, "
                "utc_timestamp(6), utc_timestamp(6), 'distributed' FROM n WHERE g < :runs"
            ),
            params | {"program_id": program_id},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_step_run (run_id, step, sequence, recovery, attempt, "
                "status, host, queue, worker, pid, result, created, started, ended) "
                + _MY_NUMBERS
                + "SELECT md5(concat('run', g DIV :per_run)), concat('s', g MOD :per_run), "
                "'1', 0, 1, 'success', concat('h', g MOD :hosts), concat('h', g MOD :hosts), "
                "'filler:1', 1, 'null', utc_timestamp(6), utc_timestamp(6), utc_timestamp(6) "
                "FROM n WHERE g < :rows"
            ),
            params,
        )
        await conn.execute(
            sa.text(
                "INSERT INTO aeventor_trigger (run_id, event, sequence, recovery, created) "
                + _MY_NUMBERS
                + "SELECT md5(concat('run', g DIV :per_run)), concat('e', g MOD :per_run), "
                "'1', 0, utc_timestamp(6) FROM n WHERE g < :rows"
            ),
            params,
        )
        await conn.execute(sa.text("SET SESSION foreign_key_checks = 1, unique_checks = 1"))
    async with db.reading() as conn:
        await conn.execute(
            sa.text("ANALYZE TABLE aeventor_run, aeventor_step_run, aeventor_trigger")
        )


# -- plans -----------------------------------------------------------------------------


async def explain_postgres(capture: Capture, dsn: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    lines: list[str] = []
    try:
        for n, (labels, statement, parameters) in enumerate(capture.distinct()):
            lines.append(f"-- {labels}: {_one_line(statement)}")
            # In a transaction rolled back: EXPLAIN ANALYZE takes the locks and does the
            # updates it explains.
            tr = conn.transaction()
            await tr.start()
            try:
                # Values known: the custom plan, executed.
                plan = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + statement, *parameters
                )
                lines += [f"   custom   {r[0]}" for r in plan if _keep(r[0])]
                # A prepared statement (asyncpg prepares every statement) may switch to
                # the generic plan after five executions: the plan made without the values.
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.execute(f"PREPARE hot_{n} AS {statement}")
                # The generic plan does not depend on the values: NULLs will do.
                nulls = ", ".join(["NULL"] * len(parameters))
                plan = await conn.fetch(
                    "EXPLAIN (COSTS OFF) "
                    + (f"EXECUTE hot_{n}({nulls})" if parameters else f"EXECUTE hot_{n}")
                )
                lines += [f"   generic  {r[0]}" for r in plan]
                # And what it costs with the real values: run it as a protocol-level
                # prepared statement, which the forced mode plans generically too.
                prepared = await conn.prepare(statement)
                begun = time.perf_counter()
                await prepared.fetch(*parameters)
                elapsed = (time.perf_counter() - begun) * 1000
                lines.append(f"   generic  executed with the values: {elapsed:.2f} ms")
            finally:
                await tr.rollback()
    finally:
        await conn.close()
    return lines


async def explain_mysql(db: Database, capture: Capture) -> list[str]:
    lines: list[str] = []
    async with db.reading() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        for labels, statement, parameters in capture.distinct():
            lines.append(f"-- {labels}: {_one_line(statement)}")
            async with driver.cursor() as cursor:
                await cursor.execute("EXPLAIN " + statement, parameters)
                names = [d[0] for d in cursor.description]
                for row in await cursor.fetchall():
                    r = dict(zip(names, row, strict=True))
                    lines.append(
                        f"   {r['table']}: type={r['type']} key={r['key']} "
                        f"rows={r['rows']} extra={r['Extra']}"
                    )
    return lines


def _keep(line: str) -> bool:
    """Plan lines worth printing: nodes, conditions, rows removed and the execution time."""
    return not line.lstrip().startswith(("Buffers:", "Planning", "Heap Fetches"))


def _one_line(statement: str) -> str:
    text = " ".join(statement.split())
    return text if len(text) <= 150 else text[:147] + "..."


# -- databases -------------------------------------------------------------------------


async def pg_version() -> str:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        return str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_store(backend: str) -> AsyncIterator[tuple[Database, str, str]]:
    """A store on a scratch database (``aev_bench_<pid>_<n>``), dropped afterwards; with its
    server version and database name."""
    async with scratch_database("mariadb" if backend == "mysql" else backend) as scratch:
        db = open_store(scratch.url, program="bench")
        await db.open()
        try:
            async with db.reading() as conn:
                version = (await conn.execute(sa.text("SELECT version()"))).scalar_one()
            yield db, str(version), scratch.name
        finally:
            await db.aclose()


@dataclass
class Report:
    backend: str
    version: str
    fill_seconds: float
    empty: Samples
    full: Samples
    plans: list[str]


async def bench_backend(backend: str, rows: int, repeats: int) -> Report:
    fill: Callable[[Database, int], Awaitable[None]] = (
        fill_postgres if backend == "postgres" else fill_mysql
    )
    async with fresh_store(backend) as (db, version, name):
        capture = Capture()
        capture.attach(db)
        fixture = await make_fixture(db)
        empty = await measure(db, fixture, repeats, capture)
        # Their ready step runs would be claimed in the next phase.
        for run_id in (fixture.by_run, fixture.by_host):
            await db.cancel_run(run_id, reason="benchmark phase over")
        begun = time.perf_counter()
        await fill(db, rows)
        fill_seconds = time.perf_counter() - begun
        capture.enabled = True
        full = await measure(db, await make_fixture(db), repeats, capture)
        if backend == "postgres":
            plans = await explain_postgres(capture, PG_DSN.format(db=name))
        else:
            plans = await explain_mysql(db, capture)
    label = "mariadb" if "mariadb" in version.lower() else backend
    return Report(label, version, fill_seconds, empty, full, plans)


def table(reports: list[Report], rows: int, repeats: int) -> list[str]:
    big = f"{rows / 1e6:g}M" if rows >= 1_000_000 else f"{rows:,}"
    head1 = f"{'(ms, ' + str(repeats) + ' repetitions)':<26}"
    head2 = f"{'operation':<26}"
    for r in reports:
        head1 += f"| {r.backend + ' empty':^17}| {r.backend + ' ' + big:^17}"
        head2 += f"| {'median':>7} {'p95':>8} | {'median':>7} {'p95':>8} "
    lines = [head1, head2, "-" * len(head2)]
    for label in LABELS:
        line = f"{label:<26}"
        for r in reports:
            for samples in (r.empty, r.full):
                median, p95 = _ms(samples.values[label])
                line += f"| {median:>7.2f} {p95:>8.2f} "
        lines.append(line)
    return lines


async def main_async(args: argparse.Namespace) -> None:
    backends = [
        b for b, skip in (("postgres", args.skip_postgres), ("mysql", args.skip_mysql)) if not skip
    ]
    reports = [await bench_backend(b, args.rows, args.repeats) for b in backends]
    print("\n".join(machine()))
    for r in reports:
        print(f"{r.backend:<9} {r.version}")
    print()
    print(
        f"fill: {args.rows:,} finished step runs + {args.rows:,} triggers over "
        f"{args.rows // PER_RUN:,} finished runs, then ANALYZE"
    )
    for r in reports:
        print(f"  {r.backend}: {r.fill_seconds:.1f} s")
    print()
    print("\n".join(table(reports, args.rows, args.repeats)))
    for r in reports:
        print()
        print(f"== {r.backend}: plans of the statements sent, on the filled database")
        print("\n".join(r.plans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-mysql", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
