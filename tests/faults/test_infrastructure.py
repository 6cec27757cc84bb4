"""The fault injectors themselves: a cut commit is durable on the server and lost to the
client; refused and stalled connections; the private cluster's stop and start; the lost-ack
sqlite store. If these did not hold, the other fault tests would prove nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from aeventor.backends.stores import open_store, resolve_url
from aeventor.backends.stores import schema as _schema
from aeventor.exceptions import ConnectionLost

from .lostack import LostAckSqlite
from .pgcluster import PrivateCluster
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

Proxies = Callable[[str], Awaitable[tuple[FaultProxy, str]]]


async def _agent_ids(store: str) -> list[str]:
    async with open_store(store, program="probe") as db, db.reading() as conn:
        return list((await conn.execute(sa.select(_schema.agent.c.id))).scalars())


async def test_cut_commit_is_durable_but_unacknowledged(
    server_store: str, proxies: Proxies
) -> None:
    proxy, via_proxy = await proxies(server_store)
    async with open_store(via_proxy, program="probe") as db:
        cut = proxy.cut_after_commit(r"INSERT INTO aeventor_agent")
        with pytest.raises(ConnectionLost):
            async with db.transaction() as conn:
                await conn.execute(
                    _schema.agent.insert().values(
                        id="probe",
                        hostname="h",
                        pid=1,
                        hosts="[]",
                        started=_schema.utcnow(),
                        heartbeat=_schema.utcnow(),
                    )
                )
        assert cut.done.is_set() and proxy.cuts == 1
        # The store reconnects through the proxy and reads the committed row.
        async with db.reading() as conn:
            ids = list((await conn.execute(sa.select(_schema.agent.c.id))).scalars())
    assert ids == ["probe"]
    assert await _agent_ids(server_store) == ["probe"]


async def test_only_statements_that_changed_rows_are_picked(
    server_store: str, proxies: Proxies
) -> None:
    proxy, via_proxy = await proxies(server_store)
    async with open_store(via_proxy, program="probe") as db:
        cut = proxy.cut_after_commit(r"UPDATE aeventor_agent")
        async with db.transaction() as conn:  # changes nothing: not cut
            await conn.execute(_schema.agent.update().values(pid=2))
        assert not cut.done.is_set() and proxy.commits >= 1


@pytest.mark.postgres
async def test_refused_and_stalled_connections(pg_store: str, proxies: Proxies) -> None:
    proxy, via_proxy = await proxies(pg_store)
    db = open_store(via_proxy, program="probe")
    db.reconnect_deadline = 0.5
    async with proxy.refuse():
        with pytest.raises(ConnectionLost):
            await db.open()
    async with proxy.stall():
        opening = asyncio.ensure_future(db.open())
        done, _ = await asyncio.wait({opening}, timeout=0.3)
        assert not done, "a stalled proxy let a connection through"
    await asyncio.wait_for(opening, 30)
    await db.aclose()


async def test_private_cluster_stops_starts_and_restarts(
    pg_cluster: PrivateCluster, private_pg_store: str
) -> None:
    assert await pg_cluster.is_up()
    await pg_cluster.stop()
    assert not await pg_cluster.is_up()
    await pg_cluster.start()
    assert await pg_cluster.is_up()
    await pg_cluster.restart()
    assert await pg_cluster.is_up()
    assert await _agent_ids(private_pg_store) == []


async def test_lost_ack_sqlite_commits_then_raises(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    db = LostAckSqlite(url=resolve_url(str(path), program="probe"))
    async with db:
        cut = db.cut_after_commit(r"INSERT INTO aeventor_agent")
        with pytest.raises(ConnectionLost, match="injected"):
            async with db.transaction() as conn:
                await conn.execute(
                    _schema.agent.insert().values(
                        id="probe",
                        hostname="h",
                        pid=1,
                        hosts="[]",
                        started=_schema.utcnow(),
                        heartbeat=_schema.utcnow(),
                    )
                )
        assert cut.done.is_set() and db.cuts == 1
    assert await _agent_ids(str(path)) == ["probe"]
