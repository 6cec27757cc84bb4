"""Fixtures of the engine's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aeventor.backends.stores import open_store
from aeventor.backends.stores.base import Database


@pytest.fixture
async def store_db(store_url: str) -> AsyncIterator[Database]:
    """A second connection to the test's store, to look at what runs wrote (and when)."""
    db = open_store(store_url, program="inspector")
    await db.open()
    try:
        yield db
    finally:
        await db.aclose()
