"""Test databases for each backend: a file per test for sqlite, a database per test for servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BACKEND_PARAMS = [pytest.param("sqlite", id="sqlite")]


@contextmanager
def backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    raise AssertionError(backend)
