"""Fixtures of the fault-injection suite.

- ``pg_store`` / ``mysql_store``: a fresh database on the shared servers (skipped when a
  server is down, failed under ``CI=true``), reached directly; a test puts a
  :class:`~.proxy.FaultProxy` in front with ``proxies``.
- ``pg_cluster``: the session's private Postgres cluster (:mod:`.pgcluster`), for outages;
  ``private_pg_store``: a fresh, migrated database on it.
- ``agents``: real ``python -m aeventor.agent`` processes (:mod:`tests.acceptance.agents`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.acceptance.agents import Agents
from tests.backends import IN_CI, backend_url

from .pgcluster import ClusterUnavailable, PrivateCluster, find_bin_dir
from .proxy import FaultProxy, Protocol, server_port

#: How to get the binaries of the private cluster (Debian).
PG_INSTALL = "apt-get install postgresql (initdb and pg_ctl under /usr/lib/postgresql/*/bin)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def pg_store(tmp_path: Path, _shared_template: None) -> Iterator[str]:
    """A fresh database on the shared Postgres server."""
    with backend_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def mysql_store(tmp_path: Path) -> Iterator[str]:
    """A fresh database on the shared MariaDB server."""
    with backend_url("mysql", tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def _shared_template() -> None:
    """Migrate the shared Postgres server's template database now, before any test's
    blockbuster is armed (it runs the migrations in a loop of its own, which imports and
    reads files). A server that is down is reported by ``backend_url``."""
    from tests import backends

    try:
        backends._pg_template()
    except (OSError, ConnectionError):
        pass


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", id="mariadb", marks=pytest.mark.mysql),
    ]
)
def server_store(
    request: pytest.FixtureRequest, tmp_path: Path, _shared_template: None
) -> Iterator[str]:
    """A fresh database on each shared server (Postgres, MariaDB)."""
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[str], Awaitable[tuple[FaultProxy, str]]]]:
    """``await proxies(url)`` -> a running proxy in front of ``url``'s server, and the URL
    that goes through it. Closed at teardown."""
    started: list[FaultProxy] = []

    async def make(url: str) -> tuple[FaultProxy, str]:
        protocol: Protocol = "postgres" if url.startswith("postgresql") else "mysql"
        proxy = FaultProxy(protocol, server_port(url))
        await proxy.__aenter__()
        started.append(proxy)
        return proxy, proxy.url(url)

    try:
        yield make
    finally:
        for proxy in started:
            await proxy.aclose()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PrivateCluster]:
    """The session's private Postgres cluster, started; deleted at the end of the session."""
    try:
        cluster = PrivateCluster(find_bin_dir())
        cluster.init()
        cluster.start_sync()
    except (ClusterUnavailable, OSError, Exception) as exc:  # noqa: BLE001 - reported below
        message = f"cannot start a private Postgres cluster ({type(exc).__name__}: {exc})"
        stderr = getattr(exc, "stderr", None)
        if stderr:
            message += f": {stderr.decode(errors='replace')}"
        message += f"; install it with: {PG_INSTALL}"
        if IN_CI:
            pytest.fail(f"CI=true requires the private cluster: {message}")
        pytest.skip(message)
    try:
        yield cluster
    finally:
        cluster.destroy()


_databases = itertools.count()


@pytest.fixture(scope="session")
def _private_template(pg_cluster: PrivateCluster) -> str:
    """A database migrated once per session, copied for each test."""
    from aeventor.backends.stores import open_store

    name = "aeventor_tpl"

    async def create() -> None:
        await pg_cluster.admin(f'CREATE DATABASE "{name}"')
        db = open_store(pg_cluster.url(name), program="template")
        await db.open()
        await db.aclose()

    asyncio.run(create())
    return name


@pytest.fixture
async def private_pg_store(
    pg_cluster: PrivateCluster, _private_template: str
) -> AsyncIterator[str]:
    """A fresh, migrated database on the private cluster (whose server may be down now and
    then: the test brings it back before it ends)."""
    name = f"aev_f{os.getpid()}_{next(_databases)}"
    await pg_cluster.admin(f'CREATE DATABASE "{name}" TEMPLATE "{_private_template}"')
    try:
        yield pg_cluster.url(name)
    finally:
        if not await pg_cluster.is_up():
            await pg_cluster.start()
        await pg_cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    """Starts agent processes; on teardown SIGTERMs those still running and waits for them."""
    started = Agents(log_dir=tmp_path / "agents")
    try:
        yield started
    finally:
        await started.aclose()
