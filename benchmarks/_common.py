"""What every benchmark shares: the machine lines, scratch databases, program shapes, tables.

Scratch databases are named ``aev_bench_<pid>_<n>``: a benchmark creates its own and drops
only those, so it can run beside tests or other benchmarks on a shared server.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import re
import statistics
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aeventor as evr

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/{db}"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{db}"
MY_URL = "mysql+aiomysql://root@127.0.0.1:3306/{db}"
MY_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root"}
#: The backends a benchmark may run on, in the order tables show them.
BACKENDS = ("sqlite", "postgres", "mariadb")

_NAME = re.compile(r"^aev_bench_\d+_\d+$")
_counter = itertools.count(1)


# -- the machine ---------------------------------------------------------------------------


def machine() -> list[str]:
    mem = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = f", {int(fh.readline().split()[1]) // 1024 // 1024} GiB"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    try:
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return [
        f"machine   {platform.platform()}{load}",
        f"cpu       {cpu}, {os.cpu_count()} cores{mem}",
        f"python    {sys.version.split()[0]}, aeventor {getattr(evr, '__version__', '?')}",
    ]


async def server_versions(*, postgres: bool = True, mysql: bool = True) -> list[str]:
    """The servers' versions, for the machine lines (a server that does not answer says so)."""
    lines = []
    if postgres:
        try:
            import asyncpg

            conn = await asyncpg.connect(PG_ADMIN, timeout=5)
            try:
                lines.append(f"postgres  {await conn.fetchval('SHOW server_version')}")
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            lines.append(f"postgres  unavailable ({exc})")
    if mysql:
        try:
            import aiomysql

            my = await aiomysql.connect(**MY_ADMIN)
            try:
                async with my.cursor() as cursor:
                    await cursor.execute("SELECT version()")
                    row = await cursor.fetchone()
                lines.append(f"mariadb   {row[0] if row else '?'}")
            finally:
                my.close()
        except (OSError, aiomysql.Error) as exc:
            lines.append(f"mariadb   unavailable ({exc})")
    return lines


async def server_up(backend: str) -> bool:
    """Whether ``backend``'s server answers (sqlite always does)."""
    if backend == "postgres":
        import asyncpg

        try:
            conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return False
        await conn.close()
    elif backend == "mariadb":
        import aiomysql

        try:
            my = await aiomysql.connect(**MY_ADMIN, connect_timeout=5)
        except (OSError, TimeoutError, aiomysql.Error):
            return False
        my.close()
    return True


# -- scratch databases ---------------------------------------------------------------------


def scratch_name() -> str:
    """A database name no other process uses: ``aev_bench_<pid>_<n>``."""
    return f"aev_bench_{os.getpid()}_{next(_counter)}"


async def _admin(backend: str, *statements: str) -> None:
    # Identifiers cannot be bound; every name here is checked against _NAME first.
    if backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
        return
    import aiomysql

    my = await aiomysql.connect(**MY_ADMIN)
    try:
        async with my.cursor() as cursor:
            for statement in statements:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", aiomysql.Warning)
                    await cursor.execute(statement)
    finally:
        my.close()


@dataclass(frozen=True)
class Scratch:
    """A scratch database: its name, the store URL and (Postgres) the asyncpg DSN."""

    backend: str
    name: str
    url: str

    @property
    def dsn(self) -> str:
        return PG_DSN.format(db=self.name)


@asynccontextmanager
async def scratch_database(backend: str, tmp: str | None = None) -> AsyncIterator[Scratch]:
    """A new database on ``backend`` (a sqlite file under ``tmp``), dropped afterwards."""
    name = scratch_name()
    assert _NAME.match(name), name
    if backend == "sqlite":
        directory = tmp or "."
        yield Scratch(backend, name, os.path.join(directory, f"{name}.db"))
        return
    if backend == "postgres":
        create, drop = f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        url = PG_URL.format(db=name)
    else:
        create, drop = f"CREATE DATABASE `{name}`", f"DROP DATABASE IF EXISTS `{name}`"
        url = MY_URL.format(db=name)
    await _admin(backend, create)
    try:
        yield Scratch(backend, name, url)
    finally:
        await asyncio.shield(_admin(backend, drop))


# -- program shapes ------------------------------------------------------------------------


async def noop_async() -> None:
    """An in-loop step that does nothing: what is measured is the engine around it."""


def chain(ev: evr.Eventor, n: int, func: Callable[..., object] | None, **step: object) -> None:
    """Steps ``s0 .. s{n-1}``, each started by the success of the one before."""
    events = [ev.add_event(f"e{i}") for i in range(n)]
    for i in range(n):
        triggers: dict[evr.StepStatus | str, Any] = {}
        if i + 1 < n:
            triggers[evr.StepStatus.success] = (events[i + 1],)
        ev.add_step(f"s{i}", func=func, triggers=triggers, **step)  # type: ignore[arg-type]
        ev.add_assoc(events[i], f"s{i}")
    ev.trigger_event(events[0], 1)


def fan_out(
    ev: evr.Eventor,
    n: int,
    func: Callable[..., object] | None,
    *,
    hosts: Sequence[str] = (),
    join: bool = False,
) -> None:
    """``n`` steps started by one event (spread over ``hosts`` in turn); with ``join``,
    a last step started by the AND of their successes."""
    go = ev.add_event("go")
    done = []
    for i in range(n):
        triggers: dict[evr.StepStatus | str, Any] = {}
        if join:
            done.append(ev.add_event(f"d{i}"))
            triggers[evr.StepStatus.success] = (done[-1],)
        host = hosts[i % len(hosts)] if hosts else None
        ev.add_step(f"s{i}", func=func, triggers=triggers, host=host)
        ev.add_assoc(go, f"s{i}")
    if join:
        joined = ev.add_event("joined", expr=tuple(done))
        ev.add_step("join", func=func, host=hosts[0] if hosts else None)
        ev.add_assoc(joined, "join")
    ev.trigger_event(go, 1)


def hops(result: evr.RunResult) -> list[float]:
    """Seconds from each chain step's recorded end to the next one's recorded start."""
    steps = sorted(result.steps, key=lambda s: int(s.step[1:]) if s.step[1:].isdigit() else -1)
    out = []
    for before, after in itertools.pairwise(steps):
        if before.ended is not None and after.started is not None:
            out.append((after.started - before.ended).total_seconds())
    return out


def recorded_span(result: evr.RunResult) -> float:
    """Seconds from the first recorded start to the last recorded end of a run's steps."""
    starts = [s.started for s in result.steps if s.started is not None]
    ends = [s.ended for s in result.steps if s.ended is not None]
    return (max(ends) - min(starts)).total_seconds()


# -- figures and tables --------------------------------------------------------------------


def median_p95(samples: Sequence[float]) -> tuple[float, float]:
    """Median and 95th percentile (nearest rank) of ``samples``, in their unit."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def ms(samples: Sequence[float]) -> list[float]:
    return [s * 1000 for s in samples]


@dataclass
class Target:
    """A target as a ratio of two figures of the same run (``ratio <= limit`` or ``>=``)."""

    label: str
    ratio: float | None
    op: str
    limit: float
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        return self.ratio <= self.limit if self.op == "<=" else self.ratio >= self.limit

    def line(self) -> str:
        if self.ratio is None:
            return f"{self.label} = n/a (target {self.op} {self.limit:g}x){self._note()}"
        mark = "met" if self.met else "MISSED"
        return (
            f"{self.label} = {self.ratio:.3g}x (target {self.op} {self.limit:g}x)  {mark}"
            f"{self._note()}"
        )

    def _note(self) -> str:
        return f"  [{self.note}]" if self.note else ""


@dataclass
class Table:
    """One benchmark's table: a title, columns, rows, then notes and targets."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    #: The benchmark raised instead of measuring (its one row says what).
    failed: bool = False

    def add(self, *cells: object) -> None:
        self.rows.append(cells)

    def render(self) -> str:
        cells = [[_cell(c) for c in row] for row in self.rows]
        widths = [len(c) for c in self.columns]
        for row in cells:
            for i, c in enumerate(row):
                widths[i] = max(widths[i], len(c))
        lines = [f"== {self.title}"]
        header = "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(self.columns)
        )
        lines += [header, "-" * len(header)]
        for row in cells:
            lines.append(
                "  ".join(
                    c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
                )
            )
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  target: {t.line()}" for t in self.targets]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def describe(exc: BaseException) -> str:
    """One line per distinct leaf of ``exc`` (exception groups flattened)."""
    leaves: list[str] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            line = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if line not in leaves:
                leaves.append(line)

    walk(exc)
    return "; ".join(leaves)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
