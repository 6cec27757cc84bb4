"""The store on every backend: atomic claims under a race, migrations, error translation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as _schema
from aeventor.backends.stores.base import Database
from aeventor.backends.stores.migrations import VERSION_TABLE, head_revision
from aeventor.dispatch._state import Graph
from aeventor.dispatch.store import Claim
from aeventor.exceptions import SchemaVersionError, UniqueViolation

from ..waiting import within


def fan_out_program(width: int) -> evr.ProgramDef:
    ev = evr.Eventor(name="race", store=":memory:")
    go = ev.add_event("go")
    for i in range(width):
        ev.add_step(f"s{i}")
        ev.add_assoc(go, f"s{i}")
    return ev.program


async def test_racing_claimers_never_share_a_step_run(store_url: str) -> None:
    """Six claimers, each with its own connections, take 240 step runs: each exactly once."""
    graph = Graph(fan_out_program(40))
    setup = open_store(store_url, program="race")
    async with setup:
        program_id = await setup.register_program(graph.program)
        run_id, advance = await setup.create_run(
            graph, program_id=program_id, triggers=[("go", str(seq)) for seq in range(6)]
        )
    assert advance.ready == 240

    claimers = [open_store(store_url, program="race") for _ in range(6)]
    taken: list[list[Claim]] = [[] for _ in claimers]

    # Each claimer's first batch happens before anyone's second (240 rows cover 6 x 7), so
    # the claims interleave whatever the scheduler does.
    first_round = asyncio.Barrier(len(claimers))

    async def claim_all(index: int, db: Database) -> None:
        first = True
        while batch := await db.claim(worker=f"w{index}", limit=7, run_id=run_id):
            taken[index].extend(batch)
            if first:
                first = False
                await first_round.wait()
            await asyncio.sleep(0)  # let the others interleave between batches

    # Every claimer is open before any claims: none can take everything while the others
    # are still connecting.
    async with contextlib.AsyncExitStack() as stack:
        for db in claimers:
            await stack.enter_async_context(db)
        async with asyncio.TaskGroup() as tg:
            for index, db in enumerate(claimers):
                tg.create_task(claim_all(index, db))

    ids = [c.id for batch in taken for c in batch]
    assert len(ids) == 240
    assert len(set(ids)) == 240
    assert sum(1 for batch in taken if batch) >= 2, "the claimers did not actually race"
    async with open_store(store_url, program="race") as db:
        result = await db.load_result(run_id)
    owners = {s.id: s.worker for s in result.steps}
    for index, batch in enumerate(taken):
        for claim in batch:
            assert owners[claim.id] == f"w{index}"
    assert {s.status for s in result.steps} == {evr.StepStatus.active}


async def test_migrations_produce_the_declared_schema(store_url: str) -> None:
    db = open_store(store_url, program="schema")
    async with db:

        def diff(connection: sa.Connection) -> list[object]:
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE, "compare_type": False}
            )
            return list(compare_metadata(context, _schema.metadata))

        async with db.engine.connect() as conn:
            differences = await conn.run_sync(diff)
            version = (
                await conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
            ).scalar_one()
    assert differences == []
    assert version == head_revision()


async def test_opening_again_and_concurrently_is_harmless(store_url: str) -> None:
    stores = [open_store(store_url, program="schema") for _ in range(4)]
    await asyncio.gather(*(db.open() for db in stores))
    for db in stores:
        await db.aclose()
    async with open_store(store_url, program="schema"):
        pass


async def _schema_diff(url: str) -> tuple[list[object], str]:
    """The differences between the database's schema and the declared one, and its revision."""
    async with open_store(url, program="schema") as db, db.engine.connect() as conn:

        def diff(connection: sa.Connection) -> list[object]:
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE, "compare_type": False}
            )
            return list(compare_metadata(context, _schema.metadata))

        differences = await conn.run_sync(diff)
        version = (
            await conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
        ).scalar_one()
    return differences, version


async def test_stores_opened_at_once_on_fresh_databases(
    empty_store_urls: tuple[str, str],
) -> None:
    """Four stores on each of two new databases, opened at the same moment in one process.

    Each database is migrated once, whatever the interleaving: Alembic's module-level
    proxies belong to one migration at a time (two databases migrating at once used to run
    each other's operations: ``KeyError: 'config'``, "table already exists").
    """
    urls = empty_store_urls
    stores = [open_store(url, program="fresh") for url in urls for _ in range(4)]
    try:
        await within(asyncio.gather(*(db.open() for db in stores)), what="eight stores to open")
    finally:
        for db in stores:
            await db.aclose()
    for url in urls:
        assert await _schema_diff(url) == ([], head_revision())


async def test_processes_opening_a_fresh_database_at_once_migrate_it_once(
    empty_store_urls: tuple[str, str],
) -> None:
    """Four processes open the same new database at the same moment: each succeeds.

    The cross-process lock (Postgres advisory lock, MySQL named lock, sqlite's write lock)
    spans reading the revision and the upgrade's commit: no process reads the revision of
    a half-applied upgrade and applies a migration again.
    """
    url = empty_store_urls[0]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.storeproc",
            url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await within(proc.stdout.readline(), what="a store process to be ready")
            assert line == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        outcomes = await within(
            asyncio.gather(*(proc.communicate() for proc in procs)),
            what="four store processes to open the database",
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    errors = [
        err.decode() for (_, err), proc in zip(outcomes, procs, strict=True) if proc.returncode
    ]
    assert errors == []
    assert await _schema_diff(url) == ([], head_revision())


async def test_the_upgrade_lock_is_held_until_the_upgrade_has_committed(
    empty_server_url: str,
) -> None:
    """The cross-process lock spans the upgrade's commit.

    Released earlier (as MySQL's named lock once was, before the final commit), the next
    process could read the revision before the last one and apply a migration twice.
    """
    from aeventor.backends.stores import mysql, postgres
    from aeventor.backends.stores.migrations import upgrade_to_head

    db = open_store(empty_server_url, program="lock")
    if isinstance(db, mysql.MySQLDatabase):
        real = db._named_lock
        held = sa.select(
            sa.func.is_used_lock(mysql._lock_name(db.url.database or "")) == sa.func.connection_id()
        )
    else:
        real = postgres._advisory_lock
        held = sa.text(
            "SELECT count(*) = 1 FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
        )
    observed: list[tuple[bool, bool]] = []

    @contextlib.contextmanager
    def spy(connection: sa.Connection) -> Iterator[None]:
        with real(connection):
            yield
            # The upgrade's transaction has ended: the lock must still be held.
            observed.append((connection.in_transaction(), bool(connection.execute(held).scalar())))

    engine = db._create_engine()
    try:
        await upgrade_to_head(engine, lock=spy)
    finally:
        await engine.dispose()
    assert observed == [(False, True)]
    assert await _schema_diff(empty_server_url) == ([], head_revision())


async def test_a_newer_schema_is_refused(store_url: str) -> None:
    async with open_store(store_url, program="schema") as db, db.engine.begin() as conn:
        await conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(SchemaVersionError, match="newer aeventor"):
        async with open_store(store_url, program="schema"):
            pass


async def test_duplicate_run_id_is_a_unique_violation(store_url: str) -> None:
    graph = Graph(fan_out_program(1))
    async with open_store(store_url, program="race") as db:
        program_id = await db.register_program(graph.program)
        await db.create_run(graph, program_id=program_id, triggers=[], run_id="r1")
        with pytest.raises(UniqueViolation):
            await db.create_run(graph, program_id=program_id, triggers=[], run_id="r1")


async def test_registering_a_program_twice_keeps_one_version(store_url: str) -> None:
    program = fan_out_program(3)
    async with open_store(store_url, program="race") as db:
        first = await db.register_program(program)
        second = await db.register_program(program)
        assert first == second
        assert await db.load_program(first) == program


async def test_unreachable_server_is_connection_lost(tmp_path: Path) -> None:
    db = open_store("postgresql+asyncpg://postgres@127.0.0.1:1/test", program="x")
    db.reconnect_deadline = 0
    with pytest.raises(evr.DatabaseError) as info:
        await db.open()
    assert type(info.value).__name__ == "ConnectionLost"


async def test_a_database_at_an_older_revision_is_upgraded_keeping_its_rows(
    store_url: str,
) -> None:
    """A store made by the first schema (0001) is brought to head on open; rows survive."""
    from aeventor.backends.stores.migrations import load_scripts, migrate

    scripts = await load_scripts()
    engine = open_store(store_url, program="old")._create_engine()
    try:
        async with engine.begin() as conn:
            # Start from nothing (the Postgres test database is a copy of a migrated one).
            for table in (
                "aeventor_slot",
                "aeventor_pool",
                "aeventor_delay",
                "aeventor_step_run",
                "aeventor_trigger",
                "aeventor_run",
                "aeventor_program",
                "aeventor_agent",
                VERSION_TABLE,
            ):
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: migrate(c, scripts, "0001"))
            await conn.execute(
                sa.text(
                    "INSERT INTO aeventor_program (name, version, definition, created) "
                    "VALUES ('old', 'v1', '{}', :now)"
                ),
                {"now": _schema.utcnow().replace(tzinfo=None)},
            )
    finally:
        await engine.dispose()
    async with open_store(store_url, program="old") as db, db.engine.connect() as conn:
        version = (
            await conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
        ).scalar_one()
        names = (await conn.execute(sa.text("SELECT name FROM aeventor_program"))).scalars().all()
        agents = (await conn.execute(sa.text("SELECT count(*) FROM aeventor_agent"))).scalar_one()
    assert version == head_revision() != "0001"
    assert names == ["old"]
    assert agents == 0


async def test_leases_and_fencing_on_the_servers_clock(store_url: str) -> None:
    """The heartbeat renews only held step runs under their token and reports the rest; a
    worker's own completion is not a revocation; requeue only what never started; leases are
    set with the server's clock (a lapsed one is lapsed for every client)."""
    graph = Graph(fan_out_program(4))
    async with open_store(store_url, program="fencing") as db:
        program_id = await db.register_program(graph.program)
        run_id, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "1")])
        lease = timedelta(seconds=30)
        a, b, c, d = await db.claim(worker="w", limit=4, run_id=run_id, lease=lease)
        assert len({claim.token for claim in (a, b, c, d)}) == 1

        assert await db.launching(c)  # c is about to start: never requeued from now on
        assert not await db.launching(dataclasses.replace(d, token="0" * 32))  # stale token

        await db.complete(graph, a, status=evr.StepStatus.success, result=1)
        beat = {"worker": "w", "hostname": "h", "pid": 1, "hosts": [], "lease": lease}
        held = {claim.id: claim.token for claim in (a, b, c, d)}
        assert await db.heartbeat(**beat, held=held) == {}  # a ended by its own holder

        assert (await db.requeue(b)).recorded
        assert not (await db.requeue(c)).recorded  # it may have started
        assert await db.heartbeat(**beat, held=held) == {b.id: evr.StepStatus.ready}
        late = await db.complete(graph, b, status=evr.StepStatus.success, result=2)
        assert not late.recorded  # b's claim was taken: the stale outcome is refused

        await db.cancel_run(run_id, reason="test")
        revoked = await db.heartbeat(**beat, held={c.id: c.token, d.id: d.token})
        assert revoked == {c.id: evr.StepStatus.cancelled, d.id: evr.StepStatus.cancelled}

        # The server's clock decides: a lease of -1 s has lapsed for everyone.
        run2, _ = await db.create_run(graph, program_id=program_id, triggers=[("go", "2")])
        [e] = await db.claim(worker="x", limit=1, run_id=run2, lease=timedelta(seconds=-1))
        assert [claim.id for claim in await db.lapsed_leases(run_id=run2)] == [e.id]
        await db.heartbeat(
            worker="x", hostname="h", pid=1, hosts=[], lease=lease, held={e.id: e.token}
        )
        assert await db.lapsed_leases(run_id=run2) == []


async def noop() -> None:
    """An in-loop step that does nothing."""


async def test_a_wide_fan_out_is_inserted_and_read_back_in_batches_whole_and_in_order(
    store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Step runs are inserted ROWS_PER_INSERT per statement and read back ROWS_PER_FETCH at
    a time: every one of them, in creation order, with its outcome."""
    from aeventor.backends.stores import base

    monkeypatch.setattr(base, "ROWS_PER_INSERT", 7)
    monkeypatch.setattr(base, "ROWS_PER_FETCH", 5)
    ev = evr.Eventor(name="wide", store=store_url, log_dir=tmp_path)
    go = ev.add_event("go")
    for i in range(23):
        ev.add_step(f"s{i}", func=noop)
        ev.add_assoc(go, f"s{i}")
    ev.trigger_event(go, 1)
    result = await ev.run()

    assert result.ok
    assert [s.id for s in result.steps] == sorted(s.id for s in result.steps)
    assert sorted(s.step for s in result.steps) == sorted(f"s{i}" for i in range(23))
    assert all(
        (s.status, s.run_id, s.sequence) == (evr.StepStatus.success, result.run_id, "1")
        for s in result.steps
    )
    async with open_store(store_url, program="inspector") as db:
        again = await db.load_result(result.run_id)
    assert again.steps == result.steps
