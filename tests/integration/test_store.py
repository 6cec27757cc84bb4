"""The store on every backend: atomic claims under a race, migrations, error translation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores import schema as _schema
from aeventor.backends.stores.base import Claim, Database
from aeventor.backends.stores.migrations import VERSION_TABLE, head_revision
from aeventor.dispatch._state import Graph
from aeventor.exceptions import SchemaVersionError, UniqueViolation


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

    opened = 0
    all_open = asyncio.Event()

    async def claim_all(index: int, db: Database) -> None:
        nonlocal opened
        async with db:
            # Start together: opening a store (a Postgres listener, the schema check) takes
            # longer than claiming every row in single-statement batches.
            opened += 1
            if opened == len(claimers):
                all_open.set()
            await all_open.wait()
            while batch := await db.claim(worker=f"w{index}", limit=7, run_id=run_id):
                taken[index].extend(batch)
                await asyncio.sleep(0)  # let the others interleave between batches

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
    from alembic import command

    from aeventor.backends.stores.migrations import _config

    engine = open_store(store_url, program="old")._create_engine()
    try:
        async with engine.begin() as conn:
            # Start from nothing (the Postgres test database is a copy of a migrated one).
            for table in (
                "aeventor_step_run",
                "aeventor_trigger",
                "aeventor_run",
                "aeventor_program",
                "aeventor_agent",
                VERSION_TABLE,
            ):
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(_config(c), "0001"))
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
