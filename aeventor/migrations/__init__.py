"""Schema management: bring a database's schema to the version this aeventor expects."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from .. import _schema

__all__ = ("upgrade_to_head",)


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Create the tables that do not exist yet."""
    async with engine.begin() as conn:
        await conn.run_sync(_schema.metadata.create_all)
