"""``aeventor programs`` through the installed console script, on sqlite and Postgres, and
``Database.list_programs`` agreeing with ``InMemoryStore.list_programs`` on every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import aeventor as evr
from aeventor import queries
from aeventor.backends.stores import open_store
from aeventor.dispatch.store import Store
from aeventor.program.model import ProgramDef
from aeventor.records import ProgramSummary
from aeventor.submission import submit
from aeventor.testing import InMemoryStore
from tests.acceptance.cli import cli
from tests.acceptance.test_cli_queries import make_run, ok
from tests.backends import BACKEND_PARAMS, backend_url


async def _bad() -> None:
    raise RuntimeError("boom")


def test_programs_table_and_json(cli_store: str, tmp_path: Path) -> None:
    make_run(cli_store, tmp_path, "nightly", ok)
    last = make_run(cli_store, tmp_path, "nightly", _bad)  # a second version
    make_run(cli_store, tmp_path, "report", ok)

    proc = cli("programs", "--store", cli_store)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == [
        "PROGRAM",
        "VERSIONS",
        "LATEST",
        "REGISTERED",
        "(UTC)",
        "RUNS",
        "LAST",
        "RUN",
        "AT",
        "(UTC)",
    ]
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(rf"nightly  2 +[0-9a-f]{{8}}  {when}  2 +failure +{when}", rows[0])
    assert re.fullmatch(rf"report  +1 +[0-9a-f]{{8}}  {when}  1 +success +{when}", rows[1])

    proc = cli("programs", "--store", cli_store, "--json")
    assert proc.returncode == 0, proc.stderr
    nightly, report = json.loads(proc.stdout)
    assert {k: nightly[k] for k in ("name", "versions", "runs", "last_run_id", "last_status")} == {
        "name": "nightly",
        "versions": 2,
        "runs": 2,
        "last_run_id": last,
        "last_status": "failure",
    }
    assert re.fullmatch(r"[0-9a-f]+", nightly["latest_version"]) and report["runs"] == 1


def program(name: str, *steps: str) -> ProgramDef:
    ev = evr.Eventor(name=name, store=":memory:", mode="distributed")
    ev.add_event("go")
    for step in steps:
        ev.add_step(step, host="h1")
        ev.add_assoc("go", step)
    return ev.program


async def populate(store: Store) -> None:
    """Two versions of `nightly` with three runs (the newest cancelled), `report` without
    runs, `weekly` with one."""
    key = b"k" * 32
    await submit(store, program("nightly", "a"), [("go", "0")], key=key, run_id="n1")
    await submit(store, program("nightly", "a"), [("go", "0")], key=key, run_id="n2")
    await submit(store, program("nightly", "a", "b"), [("go", "0")], key=key, run_id="n3")
    await store.cancel_run("n3", reason="enough")
    await store.register_program(program("report", "x"))
    await submit(store, program("weekly", "w"), [("go", "0")], key=key, run_id="w1")


def timeless(found: list[ProgramSummary]) -> list[ProgramSummary]:
    return [dataclasses.replace(p, registered=None, last_run=None) for p in found]  # type: ignore[arg-type]


@pytest.fixture(params=BACKEND_PARAMS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


def test_list_programs_is_the_same_on_a_sql_store_and_in_memory(any_store: str) -> None:
    async def main() -> None:
        memory = InMemoryStore()
        await populate(memory)
        async with open_store(any_store, program="parity") as db:
            await populate(db)
            in_sql = await queries.programs(db)
            for summary in in_sql:
                assert summary.registered.tzinfo is not None
                assert summary.last_run is None or summary.last_run.tzinfo is not None
        assert timeless(in_sql) == timeless(await queries.programs(memory))
        assert [(p.name, p.versions, p.runs, p.last_run_id) for p in in_sql] == [
            ("nightly", 2, 3, "n3"),
            ("report", 1, 0, None),
            ("weekly", 1, 1, "w1"),
        ]
        assert in_sql[0].last_status is evr.RunStatus.cancelled

    asyncio.run(main())
