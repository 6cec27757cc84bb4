"""Shared fixtures.

``store_url`` is parametrised over the backends (sqlite always; Postgres and MariaDB when
their servers answer, and always in CI): every engine test runs on each, in a database of its
own.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from blockbuster import BlockBuster, blockbuster_ctx

import aeventor as evr

from .backends import BACKEND_PARAMS, backend_url

IN_CI = os.environ.get("CI") == "true"
ACCEPTANCE = Path(__file__).parent / "acceptance"
#: Suites whose helpers still stat and read files in the loop (server restarts, sshd logs,
#: /proc fd tables of step processes): move those helpers to threads first.
_NOT_YET = {
    "test_pg_listener.py",
    "test_pg_resilience.py",
    "test_ssh.py",
    "test_process_lifetime.py",
}


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail an async test on any blocking call made in the event loop's thread (file and
    socket I/O, sleeps, sync sqlite, lock waits), wherever it comes from.

    Allow-lists are for a library that blocks once, at a place we cannot move off the loop.
    """
    if not inspect.iscoroutinefunction(getattr(request.node, "function", None)):
        yield None
        return
    # Not yet for the acceptance suite: its helpers (tests/acceptance, tests/sshd.py) still
    # poll files and logs in the loop (Path.exists/read_text); move them to threads first.
    if ACCEPTANCE in request.node.path.parents or request.node.path.name in _NOT_YET:
        yield None
        return
    with blockbuster_ctx() as bb:
        allow = bb.functions
        # The first import of a module reads its file, once per process (backends and
        # concurrent.futures' thread pool are imported lazily on purpose).
        allow["io.BufferedReader.read"].can_block_in(
            "<frozen importlib._bootstrap_external>", "get_data"
        )
        # asyncpg stats ~/.pgpass and client certificate paths on every connect.
        for func in ("os.stat", "os.path.abspath"):
            allow[func].can_block_in("asyncpg/connect_utils.py", "_parse_connect_arguments")
        # asyncssh reads the known_hosts file and the client keys on every connect (once
        # per host: the SSH executor reuses its connections).
        for func in ("io.TextIOWrapper.read", "io.BufferedReader.read"):
            allow[func].can_block_in("asyncssh/misc.py", "read_file")
        # pysqlite makes the file name absolute; open_store already did, so no syscall.
        allow["os.path.abspath"].can_block_in(
            "sqlalchemy/dialects/sqlite/pysqlite.py", "create_connect_args"
        )
        # asyncio's own subprocess start waits for the child's exec() (its error pipe and
        # the child watcher's lock): inherent to create_subprocess_exec.
        for func in ("os.read", "threading.Lock.acquire"):
            allow[func].can_block_in("asyncio/unix_events.py", "_make_subprocess_transport")
        # procfs reads by the test helpers that watch step processes: in memory, not disk.
        for func in ("io.TextIOWrapper.read", "io.BufferedReader.read", "os.listdir"):
            allow[func].can_block_in("tests/waiting.py", {"_stat", "session_members"})
        # Eventor(...) is built in coroutines; its default log_dir reads the working
        # directory once (a getcwd system call, no disk access).
        allow["os.getcwd"].can_block_in("aeventor/_eventor.py", "__init__")
        # Tests build stores with the sync open_store() inside their coroutines (it resolves
        # a sqlite path); Eventor and the agent call it through asyncio.to_thread.
        for func in ("os.stat", "os.path.abspath"):
            allow[func].can_block_in("aeventor/backends/stores/__init__.py", "_sqlite_path")
        # One byte into a pipe only the worker writes and nobody else fills: never waits.
        allow["os.write"].can_block_in("aeventor/backends/executors/local.py", "_spawn")
        yield bb


@pytest.fixture(params=BACKEND_PARAMS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store on each backend."""
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=BACKEND_PARAMS[1:])
def server_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store on each database server (Postgres, MariaDB): not sqlite."""
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=BACKEND_PARAMS[1:])
def empty_server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no aeventor table yet on each server (Postgres, MariaDB)."""
    with backend_url(request.param, tmp_path, migrated=False) as url:
        yield url


@pytest.fixture(params=BACKEND_PARAMS)
def empty_store_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh databases with no aeventor table yet (not even on Postgres), on each
    backend; dropped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield (
            stack.enter_context(backend_url(request.param, tmp_path, migrated=False)),
            stack.enter_context(backend_url(request.param, tmp_path, migrated=False)),
        )


@pytest.fixture
def make_eventor(store_url: str, tmp_path: Path) -> Callable[..., evr.Eventor]:
    """Build an Eventor on the test's store, logging under tmp_path."""

    def make(name: str = "prog", **kwargs: object) -> evr.Eventor:
        kwargs.setdefault("store", store_url)
        kwargs.setdefault("log_dir", tmp_path / "logs")
        return evr.Eventor(name=name, **kwargs)  # type: ignore[arg-type]

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from . import backends

    if backends._pg_template.cache_info().currsize:
        backends.pg_admin(f'DROP DATABASE IF EXISTS "{backends._pg_template()}" WITH (FORCE)')
