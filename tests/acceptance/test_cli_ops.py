"""``aeventor cancel`` and ``aeventor cleanup`` through the installed console script, on
sqlite, Postgres and MariaDB, and ``--store``'s default ``$AEVENTOR_STORE``; with the library's
``aeventor.cancel`` / ``aeventor.cleanup`` they stand on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import aeventor as evr
from aeventor.records import run_log_dir
from tests.acceptance import distprog
from tests.backends import backend_url
from tests.waiting import pid_alive, wait_until, within

AEVENTOR = str(Path(sys.executable).with_name("aeventor"))


async def ok() -> str:
    return "fine"


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "AEVENTOR_STORE"}
    return subprocess.run(
        [AEVENTOR, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


async def acli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        AEVENTOR, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await within(proc.communicate(), what=f"aeventor {' '.join(argv)}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store: a sqlite file path, a (migrated) Postgres URL, or a MariaDB URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "runs.db")
        return
    with backend_url(request.param, tmp_path) as url:
        yield url


def make_run(store: str, logs: Path, name: str) -> str:
    ev = evr.Eventor(name=name, store=store, log_dir=logs)
    go = ev.add_event("go")
    ev.add_step("only", func=ok)
    ev.add_assoc(go, "only")
    ev.trigger_event(go, 1)
    return ev.run_sync().run_id


def sql(store: str, statement: str, **values: object) -> None:
    url = store if "://" in store else f"sqlite+aiosqlite:///{store}"

    async def update() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(statement), values)
        finally:
            await engine.dispose()

    asyncio.run(update())


def age(store: str, run_id: str, days: int, *, running: bool = False) -> None:
    """Make a run look as if it ended ``days`` ago (or is still running since then)."""
    when = datetime.now(UTC) - timedelta(days=days)
    sql(
        store,
        "UPDATE aeventor_run SET created = :when, ended = :ended, status = "
        "CASE WHEN :running THEN 'running' ELSE status END WHERE id = :id",
        when=when,
        ended=None if running else when,
        running=running,
        id=run_id,
    )


def count(store: str, table: str, run_ids: list[str]) -> int:
    url = store if "://" in store else f"sqlite+aiosqlite:///{store}"

    async def query() -> int:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                column = "id" if table == "aeventor_run" else "run_id"
                stmt = (
                    sa.select(sa.func.count())
                    .select_from(sa.table(table))
                    .where(sa.column(column).in_(run_ids))
                )
                return int((await conn.execute(stmt)).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(query())


# -- --store defaults to $AEVENTOR_STORE ------------------------------------------------------


def test_store_from_the_environment(store: str, tmp_path: Path) -> None:
    run_id = make_run(store, tmp_path / "logs", "envy")
    proc = cli("runs", "--json", env={"AEVENTOR_STORE": store})
    assert proc.returncode == 0, proc.stderr
    assert [r["run_id"] for r in json.loads(proc.stdout)] == [run_id]
    assert cli("show", run_id[:8], env={"AEVENTOR_STORE": store}).returncode == 0
    # --store wins over the variable.
    proc = cli("runs", "--store", store, env={"AEVENTOR_STORE": str(tmp_path / "none.db")})
    assert proc.returncode == 0, proc.stderr

    for argv in (["runs"], ["show", "abc"], ["cancel", "abc"], ["db", "upgrade"],
                 ["cleanup", "--older-than", "30d"], ["agent"]):  # fmt: skip
        proc = cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "--store STORE" in proc.stderr and "$AEVENTOR_STORE" in proc.stderr, argv
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "$AEVENTOR_STORE" in cli("runs", "--help").stdout
    assert "$AEVENTOR_STORE" in cli("--help").stdout


# -- aeventor cancel --------------------------------------------------------------------------


async def test_cancel_terminates_a_standalone_run_of_another_process(
    store: str, tmp_path: Path
) -> None:
    report = tmp_path / "sleeper.json"
    ev = evr.Eventor(name="sleepy", store=store, log_dir=tmp_path / "logs", lease=1.5)
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("sleep", func=distprog.sleep_long, kwargs={"report": str(report)}))
    ev.trigger_event(go, 1)
    handle = ev.start()
    await wait_until(report.exists, what="the step to start sleeping")
    pids = json.loads(report.read_text())
    try:
        code, out, err = await acli("cancel", handle.run_id[:8], "--store", store)
        assert code == 0, err
        assert out == (
            f"run {handle.run_id} of sleepy cancelled; its workers terminate its running "
            "steps at their next heartbeat\n"
        )
        result = await within(handle.wait(), what="the cancelled run")
        await wait_until(
            lambda: not pid_alive(pids["pid"]) and not pid_alive(pids["child"]),
            what="the cancelled step's processes to be gone",
        )
    finally:
        for pid in (pids["child"], pids["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert result.status is evr.RunStatus.cancelled, result
    assert result.reason == "cancelled by aeventor cancel"
    assert result.step("sleep", 1).status is evr.StepStatus.cancelled

    # Once more: the run has ended, nothing changes.
    code, out, err = await acli("cancel", handle.run_id, "--store", store)
    assert (code, out) == (6, "")
    assert err == (
        f"aeventor: run {handle.run_id} of sleepy has already ended: cancelled; nothing to cancel\n"
    )


def test_cancel_an_ended_or_unknown_run(store: str, tmp_path: Path) -> None:
    run_id = make_run(store, tmp_path / "logs", "done")
    proc = cli("cancel", run_id, "--store", store)
    assert proc.returncode == 6
    assert "has already ended: success" in proc.stderr
    assert evr.RunStatus.success is asyncio.run(evr.run_result(store, run_id)).status
    proc = cli("cancel", run_id[:8], "--store", store, "--json")
    assert proc.returncode == 6
    shown = json.loads(proc.stdout)
    assert (shown["cancelled"], shown["run_id"], shown["status"]) == (False, run_id, "success")
    proc = cli("cancel", "zz", "--store", store)
    assert proc.returncode == 2 and "no run 'zz'" in proc.stderr
    assert "6  the run had already ended" in cli("cancel", "--help").stdout

    with pytest.raises(evr.RunEnded) as info:
        asyncio.run(evr.cancel(store, run_id[:6]))
    assert info.value.result.status is evr.RunStatus.success


# -- aeventor cleanup -------------------------------------------------------------------------


def test_cleanup_deletes_old_ended_runs_with_their_logs(store: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    old_a = [make_run(store, logs, "alpha") for _ in range(2)]
    old_b = make_run(store, logs, "beta")
    recent = make_run(store, logs, "alpha")
    running = make_run(store, logs, "alpha")
    for run_id in [*old_a, old_b]:
        age(store, run_id, 40)
    age(store, running, 90, running=True)
    old = [*old_a, old_b]
    assert all(run_log_dir(logs, p, r).is_dir() for p, r in [("alpha", old_a[0]), ("beta", old_b)])

    proc = cli("cleanup", "--older-than", "30d", "--dry-run", "-v", "--log-dir", str(logs),
               "--store", store)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "alpha: would delete 2 runs" in lines and "beta: would delete 1 run" in lines
    assert lines[-1].startswith("would delete 3 runs that ended before 20")
    assert lines[-1].endswith(" UTC and 3 log directories")
    assert sorted(line.split()[3] for line in lines if line.startswith("would delete run")) == (
        sorted(old)
    )
    proc = cli("cleanup", "--older-than", "30d", "--dry-run", "--json", "--log-dir", str(logs),
               "--store", store)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed["dry_run"] and listed["per_program"] == {"alpha": 2, "beta": 1}
    assert sorted(r["run_id"] for r in listed["runs"]) == sorted(old)
    assert len(listed["log_dirs"]) == 3
    assert count(store, "aeventor_run", old) == 3  # a dry run deletes nothing
    assert run_log_dir(logs, "beta", old_b).is_dir()

    proc = cli("cleanup", "--older-than", "30d", "--program", "beta", "--log-dir", str(logs),
               env={"AEVENTOR_STORE": store})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "beta: deleted 1 run"
    assert proc.stdout.splitlines()[1].startswith("deleted 1 run that ended before ")
    assert proc.stdout.splitlines()[1].endswith(" UTC and 1 log directory")
    assert not run_log_dir(logs, "beta", old_b).exists()

    proc = cli("cleanup", "--older-than", "30d", "--log-dir", str(logs), "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "alpha: deleted 2 runs"
    for table in ("aeventor_run", "aeventor_step_run", "aeventor_trigger"):
        assert count(store, table, old) == 0, table
        assert count(store, table, [recent, running]) > 0, table
    assert not any(run_log_dir(logs, "alpha", r).exists() for r in old_a)
    assert run_log_dir(logs, "alpha", recent).is_dir()
    shown = asyncio.run(evr.run_result(store, running))
    assert shown.status is evr.RunStatus.running

    proc = cli("cleanup", "--older-than", "soon", "--store", store)
    assert proc.returncode == 2 and "--older-than: 'soon': write" in proc.stderr


def test_cleanup_library_in_batches(store: str, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    runs = [make_run(store, logs, "many") for _ in range(5)]
    for run_id in runs:
        age(store, run_id, 2)
    seen = asyncio.run(
        evr.cleanup(store, older_than=timedelta(days=1), dry_run=True, log_dir=logs, batch=2)
    )
    assert sorted(r.run_id for r in seen.runs) == sorted(runs) and seen.dry_run
    assert seen.per_program() == {"many": 5}
    assert abs(seen.before - (datetime.now(UTC) - timedelta(days=1))) < timedelta(minutes=5)
    done = asyncio.run(evr.cleanup(store, older_than=timedelta(days=1), batch=2))
    assert sorted(r.run_id for r in done.runs) == sorted(runs)
    # Each run recorded where its logs are: those go with it, without a log_dir.
    assert sorted(done.log_dirs) == sorted(run_log_dir(logs, "many", r) for r in runs)
    assert not any(path.exists() for path in done.log_dirs)
    assert count(store, "aeventor_run", runs) == 0
    with pytest.raises(evr.ConfigurationError):
        asyncio.run(evr.cleanup(store, older_than=timedelta(days=-1)))
