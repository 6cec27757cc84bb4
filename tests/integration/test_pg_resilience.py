"""No wake-up is lost on Postgres: across processes, lost connections and a server restart.

A Postgres store has no poll interval: a dispatcher sleeps until a step of its own ends or
a NOTIFY arrives on its LISTEN connection, and after every reconnect of that connection it
rescans (``on_connect`` -> ``Notifier.notify_all``). So a step run made ready by another
process must run within a deadline, or the test fails: nothing else would ever wake it.

"Another process" is a second store object on the same database (its own pool, its own
listener, its own NOTIFY sender token), which is exactly what the dispatcher can tell apart.
Each test gets a database of its own (``backend_url``); steps are in-loop, and every wait is
on an event or a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy.engine

import aeventor as evr
from aeventor.backends.stores import open_store
from aeventor.backends.stores.postgres import LISTENER_APPLICATION_NAME, PostgresDatabase
from aeventor.dispatch._state import Graph

from ..backends import IN_CI, PG_DB, PG_HOST, PG_PORT, PG_USER, backend_url, restart_postgres
from .helpers import DEADLINE, step_status, steps_of, wait_event, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

S = evr.StepStatus


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated Postgres database (skipped without a server, failed in CI)."""
    with backend_url("postgres", tmp_path) as value:
        yield value


@pytest.fixture
async def admin(url: str) -> AsyncIterator[Any]:
    """A connection to another database that inspects and terminates backends."""
    conn = await asyncpg.connect(
        host=PG_HOST,
        port=PG_PORT,
        user=PG_USER,
        database=PG_DB,
        timeout=5,
        server_settings={"application_name": "aeventor-test-admin"},
    )
    try:
        yield conn
    finally:
        await conn.close(timeout=5)


@pytest.fixture
async def other(url: str) -> AsyncIterator[PostgresDatabase]:
    """Database B: an independent store on the same database, standing for another process."""
    db = open_store(url, program="other-process")
    assert isinstance(db, PostgresDatabase)
    await db.open()
    try:
        yield db
    finally:
        await db.aclose()


def _database(url: str) -> str:
    name = sqlalchemy.engine.make_url(url).database
    assert name
    return name


def store_of(ev: evr.Eventor) -> PostgresDatabase:
    """The store an opened Eventor drives its runs through (A's pool and listener)."""
    db = ev._db
    assert isinstance(db, PostgresDatabase), db
    return db


async def backend_pids(admin: Any, url: str, *, listener: bool) -> set[int]:
    """Client backends of the test's database: its listeners, or everything else (pools)."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
        "AND backend_type = 'client backend' AND (application_name = $2) = $3",
        _database(url),
        LISTENER_APPLICATION_NAME,
        listener,
    )
    return {row["pid"] for row in rows}


async def terminate(admin: Any, pids: set[int]) -> None:
    """Terminate backends and wait until the server has ended them."""
    for pid in pids:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid), pid
    # A backend exits shortly after the signal; that is server state with no event to wait
    # on from here, so poll it under a deadline.
    await wait_until(lambda: _none_alive(admin, pids), what=f"backends {sorted(pids)} to exit")


async def _none_alive(admin: Any, pids: set[int]) -> bool:
    alive = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
    )
    return alive == 0


@asynccontextmanager
async def live(ev: evr.Eventor) -> AsyncIterator[evr.RunHandle]:
    """Start a run; if the test leaves while it still runs, cancel it and wait for it."""
    handle = ev.start()
    try:
        yield handle
    finally:
        if not handle.done():
            handle.cancel()
            waiter = asyncio.ensure_future(handle.wait())
            await asyncio.wait({waiter}, timeout=DEADLINE)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the test's own failure is what counts


async def finished(handle: evr.RunHandle) -> evr.RunResult:
    try:
        async with asyncio.timeout(DEADLINE):
            return await handle.wait()
    except TimeoutError:
        raise AssertionError(
            f"timed out after {DEADLINE} s waiting for run {handle.run_id} to end "
            f"(status {handle.status.value})"
        ) from None


class PokeProgram:
    """A run kept alive by ``block`` until the test releases it; event ``poke`` runs ``x``."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.release = asyncio.Event()
        self.blocking = asyncio.Event()
        self.x_ran = asyncio.Event()
        self.x_ran_while_blocked: bool | None = None
        self.ev = evr.Eventor(name="resilience", store=url, log_dir=tmp_path / "logs")
        start, poke = self.ev.add_event("start"), self.ev.add_event("poke")
        self.ev.add_step("block", func=self._block)
        self.ev.add_step("x", func=self._x)
        self.ev.add_assoc(start, "block")
        self.ev.add_assoc(poke, "x")
        self.ev.trigger_event(start, 0)

    async def _block(self) -> None:
        self.blocking.set()
        await self.release.wait()
        self.blocking.clear()

    async def _x(self) -> None:
        self.x_ran_while_blocked = self.blocking.is_set()
        self.x_ran.set()

    @property
    def graph(self) -> Graph:
        return Graph(self.ev.program)

    async def check_result(self, handle: evr.RunHandle) -> None:
        assert self.x_ran_while_blocked, "x ran only after the blocking step had ended"
        self.release.set()
        result = await finished(handle)
        assert result, result.reason
        assert steps_of(result) == [("block", "0", "success"), ("x", "1", "success")]


# -- cross-process wake-ups ------------------------------------------------------------


async def test_step_made_ready_by_another_process_runs(
    url: str, other: PostgresDatabase, tmp_path: Path
) -> None:
    prog = PokeProgram(url, tmp_path)
    async with prog.ev, live(prog.ev) as handle:
        assert store_of(prog.ev).poll_interval is None  # only NOTIFY can wake A
        await wait_event(prog.blocking, what="the blocking step to start")

        advance = await other.trigger(prog.graph, run_id=handle.run_id, event="poke", sequence="1")

        assert advance.ready == 1  # B made x ready and left it to claimers
        await wait_event(prog.x_ran, what="A to run x after B's NOTIFY")
        assert await step_status(other, handle.run_id, "block") is S.active
        await prog.check_result(handle)


@pytest.mark.parametrize("when", ["immediately", "while-disconnected"])
async def test_step_runs_after_listener_connection_is_terminated(
    url: str,
    other: PostgresDatabase,
    admin: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """A's listener loses its connection; B's trigger may come before it is back.

    ``immediately`` triggers right after the termination, racing the reconnect.
    ``while-disconnected`` holds A's listener in its back-off until B's trigger has
    committed, so the NOTIFY certainly finds nobody listening: only the rescan after the
    reconnect can wake A.
    """
    prog = PokeProgram(url, tmp_path)
    reopen, in_backoff = asyncio.Event(), asyncio.Event()
    b_listener = await backend_pids(admin, url, listener=True)
    assert len(b_listener) == 1, b_listener
    async with prog.ev, live(prog.ev) as handle:
        listener = store_of(prog.ev).listener
        assert listener is not None and listener.connected
        [a_listener] = await backend_pids(admin, url, listener=True) - b_listener
        await wait_event(prog.blocking, what="the blocking step to start")
        if when == "while-disconnected":

            async def held_backoff(_delay: float) -> None:
                in_backoff.set()
                await reopen.wait()

            monkeypatch.setattr(listener, "_sleep", held_backoff)

        await terminate(admin, {a_listener})
        if when == "while-disconnected":
            await wait_event(in_backoff, what="A's listener to notice the lost connection")
            assert not listener.connected
        await other.trigger(prog.graph, run_id=handle.run_id, event="poke", sequence="1")
        if when == "while-disconnected":
            # Committed, NOTIFY sent and lost: x waits, and A cannot know.
            assert await step_status(other, handle.run_id, "x", 1) is S.ready
            assert not prog.x_ran.is_set()
            reopen.set()

        await wait_event(prog.x_ran, what="A to run x after its listener reconnected")
        await wait_until(lambda: listener.reconnects >= 1, what="A's listener to reconnect")
        assert listener.connected
        assert await backend_pids(admin, url, listener=True) - b_listener - {a_listener}
        await prog.check_result(handle)


# -- lost store connections ------------------------------------------------------------


def _pg_ctlcluster() -> tuple[str, str]:
    """pg_ctlcluster and the local cluster's version; skips (fails in CI) without them."""
    ctl = shutil.which("pg_ctlcluster")
    etc = Path("/etc/postgresql")
    versions = sorted(p.name for p in etc.iterdir()) if etc.is_dir() else []
    if ctl is None or not versions or PG_HOST not in ("127.0.0.1", "localhost"):
        reason = "needs a local cluster that pg_ctlcluster can restart"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return ctl, versions[-1]


CHAIN = 30
RESTART_AT = 10


@pytest.mark.timeout(180)
async def test_run_survives_server_restart(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 10 of a 30-step chain restarts the server; every step still runs exactly once."""
    ctl, version = _pg_ctlcluster()
    calls = [0] * CHAIN
    restarted: list[str] = []

    async def restart_server() -> None:
        restarted.append(await restart_postgres(ctl, version))

    def make_step(i: int) -> Any:
        async def step() -> int:
            calls[i] += 1
            if i == RESTART_AT:
                await restart_server()
            return i

        return step

    ev = evr.Eventor(name="restart", store=url, log_dir=tmp_path / "logs")
    events = [ev.add_event(f"e{i}") for i in range(CHAIN + 1)]
    for i in range(CHAIN):
        ev.add_step(f"s{i:02d}", func=make_step(i), triggers={S.success: events[i + 1]})
        ev.add_assoc(events[i], f"s{i:02d}")
    ev.trigger_event(events[0], 1)

    async with ev:
        listener = store_of(ev).listener
        assert listener is not None
        with caplog.at_level(logging.WARNING, logger="aeventor.store"):
            result = await ev.run()
        assert listener.reconnects >= 1

    assert len(restarted) == 1, "step 10 never restarted the server"
    assert result, result.reason
    assert calls == [1] * CHAIN
    assert [(s.step, s.attempt, s.status) for s in result.steps] == [
        (f"s{i:02d}", 1, S.success) for i in range(CHAIN)
    ]
    retried = [
        r
        for r in caplog.records
        if r.name == "aeventor.store" and r.getMessage().startswith("store unreachable; retrying")
    ]
    assert retried, "no store operation hit the restart: it did not test anything"


async def test_run_survives_terminated_pool_connections(
    url: str, admin: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Between two steps, every pool connection of A is terminated; the listener is kept."""
    reached, go = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        reached.set()
        await go.wait()

    async def second() -> None:
        return None

    ev = evr.Eventor(name="pool", store=url, log_dir=tmp_path / "logs")
    start, done = ev.add_event("start"), ev.add_event("first_done")
    ev.add_step("first", func=first, triggers={S.success: done})
    ev.add_step("second", func=second)
    ev.add_assoc(start, "first")
    ev.add_assoc(done, "second")
    ev.trigger_event(start, 0)

    async with ev, live(ev) as handle:
        listener = store_of(ev).listener
        assert listener is not None
        await wait_event(reached, what="the first step to start")
        pool = await backend_pids(admin, url, listener=False)
        assert pool, "A holds no pool connection: nothing to terminate"
        with caplog.at_level(logging.WARNING, logger="aeventor.store"):
            await terminate(admin, pool)
            go.set()
            result = await finished(handle)
        assert listener.reconnects == 0  # only the pool's connections were hit

    assert result, result.reason
    assert steps_of(result) == [("first", "0", "success"), ("second", "0", "success")]
    retried = [
        r
        for r in caplog.records
        if r.name == "aeventor.store" and r.getMessage().startswith("store unreachable; retrying")
    ]
    assert retried, "no store operation met a terminated connection"
