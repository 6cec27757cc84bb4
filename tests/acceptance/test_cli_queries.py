"""``aeventor runs`` and ``aeventor show`` through the installed console script, on sqlite and
Postgres: filters, tables and JSON, run id prefixes, exit codes per run status, read-only
opening (a missing file, an older schema) and a closed output pipe; and the library's
``aeventor.runs`` / ``aeventor.run_result`` they stand on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import aeventor as evr
from aeventor.backends.stores.migrations import VERSION_TABLE, load_scripts, migrate
from tests.backends import backend_url

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))


async def ok() -> str:
    return "fine"


async def bad() -> None:
    raise RuntimeError("boom")


def make_run(store: str, tmp_path: Path, name: str, func: object) -> str:
    ev = evr.Eventor(name=name, store=store, log_dir=tmp_path / "logs")
    go = ev.add_event("go")
    ev.add_step("only", func=func)  # type: ignore[arg-type]
    ev.add_assoc(go, "only")
    ev.trigger_event(go, 1)
    return ev.run_sync().run_id


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AEVENTOR, *argv], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated store: a sqlite file path, or a Postgres URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "runs.db")
        return
    with backend_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def three_runs(store: str, tmp_path: Path) -> tuple[str, str, str]:
    """nightly (success), nightly (failure), report (success), created in that order."""
    return (
        make_run(store, tmp_path, "nightly", ok),
        make_run(store, tmp_path, "nightly", bad),
        make_run(store, tmp_path, "report", ok),
    )


def set_status(store: str, run_id: str, status: str) -> None:
    """Put a run in ``status`` as a controller would have left it (running: not ended)."""
    url = store if "://" in store else f"sqlite+aiosqlite:///{store}"

    async def update() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "UPDATE aeventor_run SET status = :status, ended = NULL WHERE id = :id"
                    ),
                    {"status": status, "id": run_id},
                )
        finally:
            await engine.dispose()

    asyncio.run(update())


def test_runs_table_filters_and_json(store: str, three_runs: tuple[str, str, str]) -> None:
    good, failed, report = three_runs
    proc = cli("runs", "--store", store)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["RUN", "PROGRAM", "STATUS", "CREATED", "(UTC)", "DURATION"]
    assert [r.split()[:3] for r in rows] == [
        [report[:8], "report", "success"],
        [failed[:8], "nightly", "failure"],
        [good[:8], "nightly", "success"],
    ]
    # Aligned: every row's status starts in the header's STATUS column.
    column = header.index("STATUS")
    assert all(r[column:].split()[0] in ("success", "failure") for r in rows)

    proc = cli("runs", "--store", store, "--program", "nightly", "--status", "success")
    assert [r.split()[0] for r in proc.stdout.splitlines()[1:]] == [good[:8]]

    proc = cli("runs", "--store", store, "--since", "1h", "--limit", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["run_id"] for r in listed] == [report, failed]
    assert listed[1]["status"] == "failure" and listed[1]["duration"] >= 0
    assert "no failure trigger" in listed[1]["reason"]

    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    proc = cli("runs", "--store", store, "--since", tomorrow, "--json")
    assert json.loads(proc.stdout) == []
    proc = cli("runs", "--store", store, "--since", "soon")
    assert proc.returncode == 2 and "--since: 'soon': write" in proc.stderr


def test_show_by_prefix_with_exit_codes_per_status(
    store: str, three_runs: tuple[str, str, str]
) -> None:
    good, failed, report = three_runs
    proc = cli("show", good[:6], "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"run {good} of nightly: success")
    assert "only[1] success -> 'fine'" in proc.stdout

    proc = cli("show", failed, "--store", store, "--json")
    assert proc.returncode == 1, proc.stderr
    shown = json.loads(proc.stdout)
    assert (shown["run_id"], shown["status"]) == (failed, "failure")
    (step,) = shown["steps"]
    assert (step["step"], step["sequence"], step["status"], step["attempt"]) == (
        "only",
        "1",
        "failure",
        1,
    )
    assert "RuntimeError: boom" in step["error"]

    set_status(store, report, "cancelled")
    assert cli("show", report, "--store", store).returncode == 5

    proc = cli("show", "zz", "--store", store)
    assert proc.returncode == 2
    assert proc.stderr == "aeventor: no run 'zz' (no run id starts with it); " + (
        "`aeventor runs` lists the runs\n"
    )


def submit_runs(store: str, tmp_path: Path, *run_ids: str) -> None:
    """Runs submitted for agents (none here): they stay ``running``, with these ids."""
    from aeventor.backends.stores import open_store
    from aeventor.submission import submit

    ev = evr.Eventor(name="queued", store=store, log_dir=tmp_path / "logs")
    go = ev.add_event("go")
    ev.add_step("only", func=ok)
    ev.add_assoc(go, "only")

    async def main() -> None:
        async with open_store(store, program="queued") as db:
            for run_id in run_ids:
                await submit(db, ev.program, [("go", "1")], key=b"k" * 32, run_id=run_id)

    asyncio.run(main())


def test_a_running_run_and_an_ambiguous_prefix(store: str, tmp_path: Path) -> None:
    submit_runs(store, tmp_path, "abc1" + "0" * 28, "abc2" + "0" * 28, "abc" + "0" * 29)
    proc = cli("show", "abc1", "--store", store)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.startswith(f"run abc1{'0' * 28} of queued: running")

    proc = cli("show", "abc", "--store", store)
    assert proc.returncode == 2
    assert proc.stderr.startswith("aeventor: run id prefix 'abc' matches several runs (")
    assert proc.stderr.endswith("); give more of the id\n")
    for run_id in ("abc1" + "0" * 28, "abc2" + "0" * 28, "abc" + "0" * 29):
        assert run_id in proc.stderr
    # A whole id is that run's, even when it is the prefix of others.
    assert cli("show", "abc" + "0" * 29, "--store", store).returncode == 4
    assert cli("show", "", "--store", store).returncode == 2


def test_read_only_commands_never_create_a_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    for argv in (["runs"], ["show", "abc"]):
        proc = cli(*argv, "--store", str(missing))
        assert proc.returncode == 2
        assert proc.stderr == (
            f"aeventor: no sqlite store {str(missing)!r}: check the path "
            "(read-only commands never create a store)\n"
        )
    assert not missing.exists()


async def migrate_to(url: str, revision: str) -> None:
    scripts = await load_scripts()
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: migrate(c, scripts, revision))
    finally:
        await engine.dispose()


async def revision_of(url: str) -> str:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
            return str(rows.scalar_one())
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_older_schema_says_to_upgrade_and_is_left_alone(backend: str, tmp_path: Path) -> None:
    with backend_url(backend, tmp_path, migrated=False) as url:
        asyncio.run(migrate_to(url, "0001"))
        store = url.removeprefix("sqlite+aiosqlite:///")
        for argv in (["runs"], ["show", "abc"]):
            proc = cli(*argv, "--store", store)
            assert proc.returncode == 3, proc.stderr
            assert "has an older schema (revision '0001'" in proc.stderr
            assert proc.stderr.endswith(f"run `aeventor db upgrade --store {store}` first\n")
        assert asyncio.run(revision_of(url)) == "0001"
        if backend == "sqlite":  # as told: the upgrade brings it to head, and runs reads it
            assert cli("db", "upgrade", "--store", store).returncode == 0
            assert cli("runs", "--store", store).stdout.split() == [
                "RUN",
                "PROGRAM",
                "STATUS",
                "CREATED",
                "(UTC)",
                "DURATION",
            ]


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    store = str(tmp_path / "runs.db")
    for _ in range(3):
        make_run(store, tmp_path, "nightly", ok)
    # The reader is gone before the command writes: its first write fails.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run(
            [AEVENTOR, "runs", "--store", store, "--json"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert proc.stderr == ""
    assert proc.returncode == 141


# -- the library ------------------------------------------------------------------------------


def test_library_queries_on_a_url_or_an_open_store(
    store: str, three_runs: tuple[str, str, str]
) -> None:
    good, failed, report = three_runs

    async def main() -> None:
        assert [r.run_id for r in await evr.runs(store, program="nightly")] == [failed, good]
        assert [r.run_id for r in await evr.runs(store, status="failure")] == [failed]
        assert [r.run_id for r in await evr.runs(store, since=timedelta(hours=1), limit=1)] == [
            report
        ]
        future = datetime.now(UTC) + timedelta(minutes=5)
        assert await evr.runs(store, since=future) == []
        with pytest.raises(evr.ConfigurationError, match="one of running, success"):
            await evr.runs(store, status="done")

        result = await evr.run_result(store, failed[:7])
        assert (result.run_id, result.status, len(result.steps)) == (
            failed,
            evr.RunStatus.failure,
            1,
        )
        from aeventor.backends.stores import open_store

        async with open_store(store, program="x") as db:
            assert (await evr.run_result(db, good)).ok
            assert len(await evr.runs(db)) == 3
        with pytest.raises(evr.DatabaseError, match="no run 'nothere'"):
            await evr.run_result(store, "nothere")

    asyncio.run(main())
