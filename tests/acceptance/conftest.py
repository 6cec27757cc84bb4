"""Fixtures of the distributed acceptance tests: fresh shared stores, and real agents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.backends import backend_url

from .agents import Agents


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[str]:
    """A fresh Postgres store (skipped when the server is down, failed under CI=true)."""
    with backend_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def mysql_store(tmp_path: Path) -> Iterator[str]:
    """A fresh MariaDB store (skipped when the server is down, failed under CI=true)."""
    with backend_url("mysql", tmp_path) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def cli_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store for the CLI's tests: a sqlite file path, or a (migrated) Postgres URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "runs.db")
        return
    with backend_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    """Starts agent processes; on teardown SIGTERMs those still running and waits for them."""
    started = Agents(log_dir=tmp_path / "agents")
    try:
        yield started
    finally:
        await started.aclose()
