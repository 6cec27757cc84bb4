"""NOTIFY per queue on the real Postgres: an agent wakes only for work it may take.

One store object listens (as an agent's process would), another sends (as the process that
makes work ready). Postgres delivers one session's notifications in commit order, so a
probe sent after a notification proves that notification arrived (or was not delivered to
this subscriber) without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from aeventor.backends.stores import open_store
from aeventor.backends.stores.pg_listener import asyncpg_dsn
from aeventor.backends.stores.postgres import (
    CHANNEL,
    PostgresDatabase,
    queue_channel,
)

from .. import backends

pytestmark = pytest.mark.postgres

DEADLINE = 10.0


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with backends.backend_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
async def listener(pg_url: str) -> AsyncIterator[PostgresDatabase]:
    db = open_store(pg_url, program="queues")
    assert isinstance(db, PostgresDatabase)
    async with db:
        yield db


@pytest.fixture
async def sender(pg_url: str) -> AsyncIterator[PostgresDatabase]:
    db = open_store(pg_url, program="queues")
    assert isinstance(db, PostgresDatabase)
    async with db:
        yield db


async def send(db: PostgresDatabase, run_id: str, queues: Collection[str | None] = ()) -> None:
    async with db.transaction() as conn:
        await db._notify_work(conn, run_id, queues)


async def wait_set(event: asyncio.Event) -> None:
    async with asyncio.timeout(DEADLINE):
        await event.wait()


async def listening(*subscriptions: asyncio.Event) -> None:
    """Wait until the listener LISTENs on new subscriptions' channels: it wakes them then
    (to rescan), and clear them."""
    for event in subscriptions:
        await wait_set(event)
        event.clear()


def test_queue_channels_are_valid_distinct_names() -> None:
    names = {queue_channel(q) for q in ("s1", "s2", "x" * 200, "é ü;--", None)}
    assert len(names) == 5
    assert all(len(name.encode()) <= 63 and name.isidentifier() for name in names)
    assert CHANNEL not in names


async def test_a_queue_subscriber_wakes_for_its_queue_only(
    listener: PostgresDatabase, sender: PostgresDatabase
) -> None:
    with (
        listener.notifier.subscribe_queues(["s1"]) as s1,
        listener.notifier.subscribe_queues(["probe"]) as probe,
    ):
        await listening(s1, probe)

        await send(sender, "run-a", queues=["s2"])
        await send(sender, "run-a", queues=["probe"])
        await wait_set(probe)
        assert not s1.is_set(), "woken by work for another queue"

        await send(sender, "run-b", queues=["s2", "s1"])
        await wait_set(s1)


async def test_run_followers_still_hear_every_change_of_their_run(
    listener: PostgresDatabase, sender: PostgresDatabase
) -> None:
    with (
        listener.notifier.subscribe("run-a") as run_a,
        listener.notifier.subscribe("run-b") as run_b,
        listener.notifier.subscribe_queues(["s1"]) as s1,
    ):
        await listening(s1)
        await send(sender, "run-b")
        await send(sender, "run-a", queues=[None])
        await wait_set(run_a)
        assert run_b.is_set()
        assert not s1.is_set(), "a queue subscriber woke for a run change without work for it"


async def test_a_process_ignores_its_own_queue_notifications(listener: PostgresDatabase) -> None:
    with (
        listener.notifier.subscribe_queues(["s1"]) as s1,
        listener.notifier.subscribe("probe-run") as probe,
    ):
        await listening(s1)
        await send(listener, "run-a", queues=["s1"])
        # Notifications arrive in commit order: a probe from another sender, after it.
        async with listener.transaction() as conn:
            await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, "probe-run other")))
        await wait_set(probe)
        assert not s1.is_set()


async def test_queue_channels_are_listened_on_again_after_a_reconnect(
    pg_url: str, listener: PostgresDatabase, sender: PostgresDatabase
) -> None:
    with listener.notifier.subscribe_queues(["s1"]) as s1:
        await listening(s1)
        assert listener.listener is not None
        before = listener.listener.reconnects
        link = listener.listener._link
        assert link is not None
        pid = link.conn.get_server_pid()
        # End the listener's session, as a server-side disconnect would.
        conn = await asyncpg.connect(asyncpg_dsn(sa.make_url(pg_url)))
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await listening(s1)  # the reconnect wakes everyone once, to rescan
        assert listener.listener.reconnects == before + 1
        await send(sender, "run-a", queues=["s1"])
        await wait_set(s1)
