"""Test databases for each backend.

- sqlite: a file per test.
- Postgres: a template database migrated once per test session, copied per test
  (``CREATE DATABASE ... TEMPLATE``), dropped afterwards.
- MariaDB/MySQL: a database per test (no templates there), dropped afterwards.

A server that does not answer skips its tests with the command that starts it, except in CI
(``CI=true``), where it fails them: CI must run every backend.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"

PG_HOST, PG_PORT, PG_USER, PG_DB = "127.0.0.1", 5432, "postgres", "test"
MY_HOST, MY_PORT, MY_USER, MY_DB = "127.0.0.1", 3306, "root", "test"

PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
MY_START = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"

BACKEND_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]

_counter = itertools.count()
_PREFIX = f"aev_t{os.getpid()}"


def pg_url(database: str = PG_DB) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def mysql_url(database: str = MY_DB) -> str:
    return f"mysql+aiomysql://{MY_USER}@{MY_HOST}:{MY_PORT}/{database}"


def _unavailable(service: str, start: str, error: BaseException) -> None:
    message = (
        f"{service} is not reachable ({type(error).__name__}: {error}); start it with: {start}"
    )
    if IN_CI:
        pytest.fail(f"CI=true requires {service}: {message}")
    pytest.skip(message)


async def _pg_admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_DB, timeout=5
    )
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def pg_admin(*statements: str) -> None:
    """Run admin statements (CREATE/DROP DATABASE) outside any test loop."""
    asyncio.run(_pg_admin(*statements))


@cache
def _pg_template() -> str:
    """Create and migrate the session's template database once."""
    from aeventor.backends import stores as backends

    name = f"{_PREFIX}_tpl"
    pg_admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')

    async def migrate() -> None:
        db = backends.open_store(pg_url(name), program="template")
        await db.open()
        await db.aclose()

    asyncio.run(migrate())
    return name


def mysql_admin(*statements: str) -> None:
    import pymysql

    conn = pymysql.connect(host=MY_HOST, port=MY_PORT, user=MY_USER, connect_timeout=5)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        conn.commit()
    finally:
        conn.close()


@contextmanager
def backend_url(backend: str, tmp_path: Path, *, migrated: bool = True) -> Iterator[str]:
    """A URL of a fresh database on ``backend``: without rows (and migrated, for Postgres),
    or with nothing at all when ``migrated`` is False (no aeventor table on any backend)."""
    name = f"{_PREFIX}_{next(_counter)}"
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
        return
    if backend == "postgres":
        try:
            template = _pg_template() if migrated else "template0"
        except (OSError, ConnectionError) as exc:
            _unavailable("PostgreSQL on 127.0.0.1:5432", PG_START, exc)
        try:
            pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        except (OSError, ConnectionError) as exc:
            _unavailable("PostgreSQL on 127.0.0.1:5432", PG_START, exc)
        try:
            yield pg_url(name)
        finally:
            pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    if backend == "mysql":
        import pymysql

        try:
            mysql_admin(f"CREATE DATABASE `{name}`")
        except pymysql.err.OperationalError as exc:
            _unavailable("MariaDB/MySQL on 127.0.0.1:3306", MY_START, exc)
        try:
            yield mysql_url(name)
        finally:
            mysql_admin(f"DROP DATABASE IF EXISTS `{name}`")
        return
    raise AssertionError(f"unknown backend {backend!r}")


async def restart_postgres(ctl: str, version: str) -> str:
    """Restart the local cluster with ``pg_ctlcluster`` and return its output.

    Raises:
        RuntimeError: the restart failed (its output is in the message).
    """
    proc = await asyncio.create_subprocess_exec(
        ctl,
        "--skip-systemctl-redirect",
        version,
        "main",
        "restart",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(60):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctlcluster restart failed: {text}")
    return text
