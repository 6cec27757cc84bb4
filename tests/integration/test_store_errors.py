"""What the database servers' errors become at the store's edge, and what is retried.

- A deadlock is a :class:`TransientError`: the store operation runs again and succeeds.
- A statement past the store's ``statement_timeout`` is cancelled by the server and fails
  at once with :class:`StatementTimeout`, naming the timeout.
- A refused login is an :class:`AuthenticationError`: the command line says so in one line
  and exits with code 3 at once, instead of retrying as if the server were down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import aeventor as evr
from aeventor.backends.stores import mysql, open_store, postgres
from aeventor.backends.stores import schema as t
from aeventor.backends.stores.base import Database
from aeventor.cli import EXIT_DATABASE
from aeventor.exceptions import StatementTimeout

from ..waiting import wait_until, within

CLUSTER_KEY = "k" * 43
# Imported here, not in a test's event loop: importing Alembic reads its plugins' metadata.
BACKENDS = (mysql, postgres)


def _program(name: str) -> evr.ProgramDef:
    ev = evr.Eventor(name=name, store=":memory:")
    ev.add_step("s")
    return ev.program


async def _lock_waiters(db: Database) -> int:
    """How many sessions of the test's database wait for a row lock."""
    if db.engine.dialect.name == "postgresql":
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    else:
        query = "SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
    async with db.reading() as conn:
        return int((await conn.execute(sa.text(query))).scalar_one())


async def test_a_deadlocked_store_operation_is_retried_and_succeeds(
    server_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two connections lock two rows in opposite order; the server kills the store's.

    The holder changes two rows and the operation only locks rows, so the server picks the
    operation as the deadlock's victim (Postgres: it waited first; InnoDB: it is the
    smaller transaction). ``write`` runs it again once the holder has committed.
    """
    db = open_store(server_store_url, program="deadlock")
    holder_store = open_store(server_store_url, program="deadlock")
    async with db, holder_store:
        a, b, c = [await db.register_program(_program(name)) for name in ("a", "b", "c")]
        attempts = 0
        holds_b = asyncio.Event()

        def lock(row: int) -> Any:
            return sa.select(t.program.c.id).where(t.program.c.id == row).with_for_update()

        async def operation(tx: Any) -> int:
            nonlocal attempts
            attempts += 1
            await tx.conn.execute(lock(b))
            holds_b.set()
            await tx.conn.execute(lock(a))  # waits for the holder
            return attempts

        async with holder_store.engine.begin() as holder:
            await holder.execute(
                t.program.update().where(t.program.c.id.in_([a, c])).values(signature="held")
            )
            task = asyncio.create_task(db.write(operation))
            await within(holds_b.wait(), what="the operation to lock row b")
            await wait_until(
                lambda: _lock_waiters(holder_store), what="the operation to wait for row a"
            )
            await within(holder.execute(lock(b)), what="the deadlock to be broken")
        assert await within(task, what="the retried operation") == 2

    retried = [r for r in caplog.records if r.name == "aeventor.store"]
    assert [r.event for r in retried] == ["store operation failed transiently; retrying"]  # type: ignore[attr-defined]
    assert "deadlock" in retried[0].fields["error"].lower()  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["url", "argument"])
async def test_a_statement_past_the_statement_timeout_fails_naming_it(
    server_store_url: str, how: str
) -> None:
    if how == "url":
        db = open_store(f"{server_store_url}?statement_timeout=0.2", program="timeout")
    else:
        db = open_store(server_store_url, program="timeout", statement_timeout=0.2)
    sleep = "SELECT pg_sleep(5)" if server_store_url.startswith("postgresql") else "SELECT SLEEP(5)"
    async with db:
        assert db.statement_timeout == 0.2
        started = time.monotonic()
        with pytest.raises(StatementTimeout, match=r"statement_timeout \(0\.2 s\)"):
            async with db.reading() as conn:
                await conn.execute(sa.text(sleep))
        elapsed = time.monotonic() - started
        # The store still works, within its timeout.
        assert await db.list_runs() == []
    assert elapsed < 3


# -- a refused login on the command line -----------------------------------------------------


def _refused(url: str) -> tuple[str, str]:
    """The store URL with credentials the server refuses, and the secret to keep hidden."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # Trust authentication takes any password: a role that does not exist is refused.
        secret = "pg-secret-1"
        parsed = parsed.set(username="aeventor_no_such_role", password=secret)
    else:
        secret = "my-secret-1"
        parsed = parsed.set(password=secret)
    return parsed.render_as_string(hide_password=False), secret


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "aeventor.agent", "--host", "h1", "--allow", "nothing.*"],
        ["-m", "aeventor", "runs"],
    ],
    ids=["agent", "runs"],
)
def test_a_refused_login_is_one_line_and_exit_code_3_at_once(
    server_store_url: str, command: list[str], tmp_path: Path
) -> None:
    url, secret = _refused(server_store_url)
    env = {**os.environ, "AEVENTOR_CLUSTER_KEY": CLUSTER_KEY}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *command, "--store", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started

    lines = proc.stderr.splitlines()
    assert proc.returncode == EXIT_DATABASE, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "the server refused the login" in lines[0]
    assert "check the user name and password" in lines[0]
    assert make_url(url).render_as_string(hide_password=True) in lines[0]
    assert secret not in proc.stderr + proc.stdout
    assert elapsed < 10, f"took {elapsed:.1f} s: retried as if the server were down?"


def test_the_exit_codes_are_documented() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aeventor", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "3  a database error: the server refused the store's user or password" in proc.stdout


@pytest.fixture(autouse=True)
def _store_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aeventor.store")
