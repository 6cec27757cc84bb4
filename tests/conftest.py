"""Shared fixtures.

``store_url`` is parametrised over the backends (sqlite always; Postgres and MariaDB when
their servers answer, and always in CI): every engine test runs on each, in a database of its
own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

import aeventor as evr

from .backends import BACKEND_PARAMS, backend_url

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(params=BACKEND_PARAMS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store on each backend."""
    with backend_url(request.param, tmp_path) as url:
        yield url


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
